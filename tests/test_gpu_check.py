"""bench/gpu_check.sh (the one prepared GPU check) and bench/gpu_wheels.sh: shellcheck, and a CPU dry run that
skips the GPU parts cleanly and still writes the whole report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.launch.test_launch import shellcheck_binary

SCRIPTS = ["bench/gpu_check.sh", "bench/gpu_wheels.sh"]


def test_scripts_pass_shellcheck_and_document_themselves():
    proc = subprocess.run([shellcheck_binary(), *SCRIPTS], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    for script in SCRIPTS:
        assert os.access(ROOT / script, os.X_OK)
        shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert shown.returncode == 0 and script in shown.stdout, shown.stderr
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--bogus"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown argument")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU dry run (with a GPU the check is real)")
def test_cpu_dry_run_writes_the_report(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "pytest-1.0-py3-none-any.whl").write_bytes(b"")  # installed here: not to be installed
    (wheels / "not_installed_here_xyz-1.0-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("LDM_GPU_TESTS_ON_CPU", None)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--wheels", str(wheels), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "gpu_report.md").read_text()
    for heading in ("## Machine", "## Install", "## GPU tests", "## Benchmark", "## Summary"):
        assert heading in report, heading
    assert "no CUDA device: a CPU dry run" in report
    assert "not installed here: 1" in report and "- would install not_installed_here_xyz-1.0-py3-none-any.whl" in report
    assert "skipped" in report and "failed" not in report.split("## Summary")[0].split("## GPU tests")[1]
    assert "every step passed" in report
    bench = json.loads((out / "bench_gpu.json").read_text())
    assert bench["tiny"] and {r["model"] for r in bench["rows"]} == {"ours", "diffusers"}
    assert bench["trainer"].get("img_per_s", 0) > 0, bench["trainer"]
