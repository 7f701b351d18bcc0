"""The Dockerfile stays in sync with the project: what it copies exists, it installs with the README's
`./run.sh setup`, and the commands it (and the docs) run in the image are the project's console scripts."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


def arguments(rest: str) -> list[str]:
    """The arguments of COPY/ENTRYPOINT/CMD in exec (JSON) or shell form."""
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def copies() -> list[tuple[int, list[str]]]:
    """(instruction index, source paths) of every COPY/ADD from the build context."""
    out = []
    for i, (word, rest) in enumerate(instructions()):
        if word in ("COPY", "ADD"):
            args = [a for a in arguments(rest) if not a.startswith("--")]
            if any(a.startswith("--from") for a in arguments(rest)):
                continue  # from another stage, not from the project
            assert len(args) >= 2, f"{word} {rest}"
            out.append((i, args[:-1]))
    return out


def setup_index() -> int:
    for i, (word, rest) in enumerate(instructions()):
        if word == "RUN" and re.search(r"(^|\s)\./run\.sh setup(\s|$)", rest):
            return i
    pytest.fail("the Dockerfile has no `RUN ... ./run.sh setup` step")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_copied_path_exists():
    found = copies()
    assert found, "the Dockerfile copies nothing from the project"
    for _, sources in found:
        for src in sources:
            matches = list(ROOT.glob(src)) if any(c in src for c in "*?[") else [ROOT / src]
            assert matches and all(m.exists() for m in matches), f"COPY source {src!r} is not in the project"


def test_installs_with_the_readmes_setup_command():
    readme = (ROOT / "README.md").read_text()
    assert "./run.sh setup" in readme, "the README does not mention ./run.sh setup"
    run_sh = (ROOT / "run.sh").read_text()
    assert re.search(r"^\s*setup\)", run_sh, re.M), "run.sh has no `setup` target"
    setup_at = setup_index()
    # everything `pip install -e .` needs is copied before the set-up step runs
    before = {src.rstrip("/") for i, sources in copies() if i < setup_at for src in sources}
    project = pyproject()
    needed = {"pyproject.toml", "run.sh", project["project"]["readme"]}
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()
                and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)}
    assert packages, "no package folder matches [tool.setuptools.packages.find] include"
    missing = sorted((needed | packages) - before)
    assert not missing, f"copied only after `./run.sh setup` (or never): {missing}"


def test_entrypoint_runs_console_scripts_from_the_venv():
    scripts = set(pyproject()["project"]["scripts"])
    steps = instructions()
    workdir = [rest for word, rest in steps if word == "WORKDIR"][-1]
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert f"{workdir.rstrip('/')}/.venv/bin" in env, "the venv's bin folder (console scripts) is not on PATH"
    entry = arguments([rest for word, rest in steps if word == "ENTRYPOINT"][-1])
    assert 'exec "$@"' in " ".join(entry), f"the entrypoint does not run its arguments: {entry}"
    cmd = arguments([rest for word, rest in steps if word == "CMD"][-1])
    assert cmd[0] in scripts, f"CMD runs {cmd[0]!r}, not one of {sorted(scripts)}"


def test_documented_docker_commands_are_console_scripts():
    scripts = set(pyproject()["project"]["scripts"])
    text = DOCKERFILE.read_text() + "\n" + (ROOT / "README.md").read_text()
    tag = re.search(r"docker build -t (\S+)", text)
    assert tag, "no `docker build -t IMAGE` example"
    image = re.escape(tag.group(1))
    commands = re.findall(rf"docker run\b.*?(?<=\s){image}\s+(\S+)", text)
    assert commands, "no `docker run ... IMAGE COMMAND` example"
    for command in commands:
        assert command in scripts, f"`docker run ... {tag.group(1)} {command}`: not a console script"


# --- the image for clusters: caching, no test extras, InfiniBand, driver, shared memory, any user --------
def run_steps() -> list[tuple[int, str]]:
    return [(i, rest) for i, (word, rest) in enumerate(instructions()) if word == "RUN"]


def test_dependencies_install_before_the_sources_are_copied():
    """Editing a source file must not re-install torch: only the manifest and the lock precede the big install."""
    first_source = min(i for i, sources in copies() if any(s.rstrip("/") in ("ldm", "autoencoder") for s in sources))
    deps = [i for i, rest in run_steps() if "--constraint constraints.txt" in rest and "-r " in rest]
    assert deps and deps[0] < first_source, "no dependency install from the lock before the sources are copied"
    before = {s for i, sources in copies() if i < deps[0] for s in sources}
    assert before == {"pyproject.toml", "constraints.txt"}, before


def test_no_test_extras_in_the_image():
    setup = instructions()[setup_index()][1]
    assert re.search(r"(^|\s)LDM_EXTRAS=(\s|$)", setup), f"the set-up step installs the default (test) extras: {setup}"
    assert not any("[test]" in rest for _, rest in run_steps())


def test_infiniband_libraries_and_driver_note():
    apt = " ".join(rest for _, rest in run_steps() if "apt-get install" in rest)
    for package in ("libibverbs1", "librdmacm1", "ibverbs-providers"):
        assert package in apt.split(), package
    text = DOCKERFILE.read_text()
    assert "driver is >= 580" in text and "ARG TORCH_INDEX_URL" in text
    assert any("$TORCH_INDEX_URL" in rest and "--index-url" in rest for _, rest in run_steps())


def test_every_gpu_docker_run_gets_shared_memory():
    text = DOCKERFILE.read_text() + "\n" + (ROOT / "README.md").read_text()
    runs = re.findall(r"docker run [^\n`]*", text)
    assert runs
    for line in runs:
        assert "--ipc=host" in line or "--shm-size" in line, line


def test_caches_and_outputs_writable_by_any_user():
    env = " ".join(rest for word, rest in instructions() if word == "ENV")
    caches = dict(re.findall(r"(HOME|LDM_CACHE|TORCH_EXTENSIONS_DIR|TORCHINDUCTOR_CACHE_DIR|TRITON_CACHE_DIR|"
                             r"XDG_CACHE_HOME|MPLCONFIGDIR|npm_config_cache)=(\S+)", env))
    assert {"HOME", "LDM_CACHE", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR"} <= set(caches), caches
    writable = [m for _, rest in run_steps() for m in re.findall(r"chmod -R a\+rwX ([^&]+)", rest)]
    folders = [f.rstrip("/") for group in writable for f in group.split()]
    for name, path in caches.items():
        assert any(path == f or path.startswith(f + "/") for f in folders), f"{name}={path} is not made writable"
    for out in ("/app/runs", "/app/data"):
        assert out in folders


def test_dockerignore_keeps_the_context_small_and_the_copied_paths():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for heavy in (".venv", ".git", "runs", "data", ".cache"):
        assert heavy in patterns, heavy
    for _, sources in copies():
        for src in sources:
            assert not any(fnmatch.fnmatch(src.rstrip("/"), p) for p in patterns), f"{src} is copied but ignored"
