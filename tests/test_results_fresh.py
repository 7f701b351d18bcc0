"""The README's measured figures and their results files: every results file the README cites records where its
figures come from (bench/provenance.py: commit, machine, date, command and the code it measured), and no commit after
the measured one changed that code; otherwise the figures may no longer describe the code, and the test names the
commits and the command that measures again. Where the checkout has no git history (an exported tree, a shallow clone
without the measured commit) the freshness check is skipped with the reason."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from bench import provenance
from tests.conftest import ROOT

README = ROOT / "README.md"
# cited results files whose figures another issue is measuring again (issue 28: the recipe and sampler studies)
PENDING = {"eval.md": "the sampler table of the earlier eps default (2026-12-04): no provenance line; issue 28 measures "
                      "the sampler study again on the flow default",
           "recipe.md": "the recipe study (hours of CPU) was measured row by row at several commits (2b4fa82 to "
                        "4181cfb, before and after the glue refactor), each named in recipe.json and the table's "
                        "footer; bench_recipe writes no provenance line yet (issue 28)",
           "sampler_choice.md": "the flow default's guidance chosen with `ldm-eval --prompt-set tuning` (the command and "
                                "commit are in the file; on the model at lr 5e-4), not by a bench script; issue 28 "
                                "moves the choice into bench_recipe, which will write the provenance line"}


def cited() -> list[str]:
    """The results files with figures (JSON, Markdown, text) that the README cites."""
    names = set(re.findall(r"bench/results/([\w.-]+\.(?:json|md|txt))", README.read_text(encoding="utf-8")))
    return sorted(names)


def test_the_readme_cites_its_results_files():
    assert {"cache.json", "samplers_mixture.txt", "transformers.md"} <= set(cited())
    for name in cited():
        assert (ROOT / "bench" / "results" / name).is_file(), name


@pytest.mark.parametrize("name", cited())
def test_results_record_where_they_come_from(name):
    if name in PENDING:
        pytest.skip(PENDING[name])
    records = provenance.read(ROOT / "bench" / "results" / name)
    assert records, f"bench/results/{name} has no provenance record (bench/provenance.py)"
    for prov in records:
        assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]), prov["commit"]
        machine = prov["machine"]
        assert machine["cpu"] and machine["cores"] >= 1 and re.match(r"\d{4}-\d\d-\d\dT", prov["date"]), prov
        assert prov["command"].startswith("python -m bench.") and prov["measures"], prov
        assert prov["uncommitted"] == [], f"bench/results/{name} was measured with uncommitted changes: {prov}"


def _history() -> bool:
    """Whether this checkout is shallow; skips when there is no git history at all."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the results' freshness is read from the history")
    try:
        shallow = provenance._git("rev-parse", "--is-shallow-repository")
    except subprocess.CalledProcessError:
        pytest.skip(f"{ROOT} is not a git checkout: the results' freshness is read from the history")
    return shallow == "true"


@pytest.mark.parametrize("name", cited())
def test_results_are_newer_than_the_code_they_measure(name):
    if name in PENDING:
        pytest.skip(PENDING[name])
    shallow = _history()
    records = provenance.read(ROOT / "bench" / "results" / name)
    assert records, f"bench/results/{name} has no provenance record"
    for prov in records:
        try:
            changes = provenance.changes_since(prov)
        except LookupError as e:
            if shallow:
                pytest.skip(f"shallow clone: {e} (git fetch --unshallow to check bench/results/{name})")
            raise AssertionError(f"bench/results/{name}: {e}") from None
        assert not changes, (f"bench/results/{name} was measured at {prov['commit'][:10]}; since then the code it "
                             f"measures ({', '.join(prov['measures'])}) changed in {changes}: run `{prov['command']}` "
                             "again and update the README's figures")


def test_a_change_to_the_measured_code_makes_results_stale(tmp_path):
    """The check itself, on a repository made here: a change to a measured file after the measured commit is found,
    a change to another file is not, and a commit that is not in the history is an error."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "other.py").write_text("y = 1\n")
    git("add", ".")
    git("commit", "-qm", "code")
    prov = provenance.record(["code.py"], cwd=tmp_path)
    assert prov["uncommitted"] == [] and provenance.changes_since(prov, tmp_path) == []
    (tmp_path / "other.py").write_text("y = 2\n")
    git("commit", "-qam", "other")
    assert provenance.changes_since(prov, tmp_path) == []
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.record(["code.py"], cwd=tmp_path)["uncommitted"] == [" M code.py"]
    git("commit", "-qam", "faster code")
    changes = provenance.changes_since(prov, tmp_path)
    assert len(changes) == 1 and changes[0].endswith(" faster code")
    (tmp_path / "results.txt").write_text(f"table\n{provenance.line(prov)}\n")
    assert provenance.read(tmp_path / "results.txt") == [prov]
    with pytest.raises(LookupError):
        provenance.changes_since({**prov, "commit": "0" * 40}, tmp_path)
