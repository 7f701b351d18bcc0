"""./run.sh setup installs from the lock (constraints.txt) and re-installs exactly when its inputs change:
pyproject.toml, the lock, or the extras. A stand-in venv interpreter records what pip was asked to do."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.launch.test_launch import shellcheck_binary

FAKE_PYTHON = """#!/usr/bin/env bash
# venv python stand-in: record pip calls; `-c` probes (is CUDA there?) answer no; pytest exits $FAKE_PYTEST_RC
case "$1" in
  -m) echo "$*" >> "$(dirname "$0")/../pip.log"
      if [[ "$2" == pytest ]]; then
        echo "LDM_GPU_TESTS_ON_CPU=${LDM_GPU_TESTS_ON_CPU-unset} $*" >> "$(dirname "$0")/../pytest.log"
        exit "${FAKE_PYTEST_RC:-0}"
      fi ;;
  -c) exit 1 ;;
esac
"""


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of run.sh, pyproject.toml and constraints.txt with a stand-in venv beside them."""
    for name in ("run.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    return tmp_path


def setup(project: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    proc = subprocess.run(["bash", str(project / "run.sh"), "setup"], capture_output=True, text=True, timeout=60,
                          env={**environ, "LDM_VENV": "venv", **env})
    log = project / "venv" / "pip.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return proc, [c for c in calls if "install" in c and "--upgrade pip" not in c]


def test_setup_installs_from_the_lock_and_only_when_inputs_change(project):
    proc, calls = setup(project)
    assert proc.returncode == 0, proc.stderr
    assert calls == ["-m pip install --quiet --constraint constraints.txt -e .[test]"]
    assert setup(project)[1] == []  # nothing changed: no install
    with open(project / "constraints.txt", "a") as f:
        f.write("tqdm==4.70.1\n")  # the lock changed
    assert len(setup(project)[1]) == 1 and setup(project)[1] == []
    with open(project / "pyproject.toml", "a") as f:
        f.write("\n# a comment\n")
    assert len(setup(project)[1]) == 1
    assert setup(project, LDM_EXTRAS="")[1] == ["-m pip install --quiet --constraint constraints.txt -e ."]
    assert setup(project, LDM_EXTRAS="", LDM_CONSTRAINTS="")[1] == ["-m pip install --quiet -e ."]


def test_the_test_command_runs_the_cpu_capable_gpu_tests(project):
    """./run.sh test (what CI runs) runs tests/gpu on the CPU where there is no CUDA, unless told not to."""
    stubs = project / "stubs"
    stubs.mkdir()
    (stubs / "apt-get").write_text("#!/usr/bin/env bash\nexit 0\n")  # run.sh test installs chromium as root
    (stubs / "apt-get").chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    environ["PATH"] = f"{stubs}{os.pathsep}{environ['PATH']}"
    for env, expected in (({}, "1"), ({"LDM_GPU_TESTS_ON_CPU": "0"}, "0")):
        proc = subprocess.run(["bash", str(project / "run.sh"), "test", "-x"], capture_output=True, text=True,
                              timeout=60, env={**environ, "LDM_VENV": "venv", **env})
        assert proc.returncode == 0, proc.stderr
        log = project / "venv" / "pytest.log"
        assert log.read_text().splitlines() == [f"LDM_GPU_TESTS_ON_CPU={expected} -m pytest -q -x"]
        log.unlink()


def test_the_whole_suite_runs_the_cluster_tests_after_a_failed_main_suite(project):
    """./run.sh test without arguments (what .ci/run calls) runs the main suite, then the cluster tests even when the
    main suite failed, and exits with the first failure's code."""
    stubs = project / "stubs"
    stubs.mkdir()
    (stubs / "apt-get").write_text("#!/usr/bin/env bash\nexit 0\n")
    (stubs / "apt-get").chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    environ["PATH"] = f"{stubs}{os.pathsep}{environ['PATH']}"
    for rc, expected in (("0", 0), ("1", 1), ("5", 1)):  # 5: pytest collected nothing, a failure too
        proc = subprocess.run(["bash", str(project / "run.sh"), "test"], capture_output=True, text=True, timeout=60,
                              env={**environ, "LDM_VENV": "venv", "FAKE_PYTEST_RC": rc})
        assert proc.returncode == expected, (rc, proc.stderr)
        log = project / "venv" / "pytest.log"
        assert log.read_text().splitlines() == ["LDM_GPU_TESTS_ON_CPU=1 -m pytest -q -m not cluster",
                                                "LDM_GPU_TESTS_ON_CPU=1 -m pytest -q -m cluster"], rc
        log.unlink()


def test_setup_refuses_a_missing_lock(project):
    proc, calls = setup(project, LDM_CONSTRAINTS="nope.txt")
    assert proc.returncode == 2 and "constraints file 'nope.txt' not found" in proc.stderr and calls == []


def test_lock_pins_what_the_project_needs():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for name in ("torch", "torchvision", "deepspeed", "webdataset", "mlflow", "transformers", "pytest"):
        assert name in pins, name
    assert all(v and "*" not in v for v in pins.values())


def test_run_sh_and_ci_scripts_pass_shellcheck():
    proc = subprocess.run([shellcheck_binary(), "run.sh", ".ci/run"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
