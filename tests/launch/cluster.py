"""Real cluster parts for the `cluster` tests: two "hosts" (network namespaces with their own hostnames and
link-local addresses), a SLURM cluster on them (munged, slurmctld, one slurmd per host), and the checks shared by the
tests (weights of an export or checkpoint, processes that must all exit).

Everything is created under a temp folder and removed by the fixtures in tests/launch/conftest.py, also after a
failure: daemons are stopped by PID, every process left in a namespace is killed by PID, then the namespaces (and
with them the veth pair) are deleted. The only addresses used are 127.0.0.1 and the 169.254.25.x pair assigned here;
a namespace has no route anywhere else.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, tiny_ldm_overrides

CONFIG = str(ROOT / "configs/ldm/emoji.yaml")
STEPS = 8  # the cluster runs: 8 steps of the tiny model, a checkpoint every 2 (all kept), ZeRO-1 (per-rank shards)
SUBNET = "169.254.25"  # link-local, only ever inside the two namespaces created here
TOOLS = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "taskset": "util-linux", "mount": "mount",
         "munged": "munge", **dict.fromkeys(("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun", "sinfo"),
                                            "slurm-wlm"), "mpirun": "openmpi-bin", "ompi_info": "openmpi-bin"}


def cluster_args(shards: Path, autoencoder: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", CONFIG, *tiny_ldm_overrides(shards, autoencoder, out, None), f"train.max_steps={STEPS}",
            "train.ckpt_every=2", "train.keep_last=10", "train.zero_stage=1", *extra]


def train_env(**extra: str) -> dict[str, str]:
    """The environment of every training process: this one without launcher variables, one thread per rank (two ranks
    share the two cores here), this project first on the path (slurmd and mpirun pass it on)."""
    from tests.launch.test_launch import clean_env

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return clean_env(OMP_NUM_THREADS="1", PYTHONPATH=path, PYTHONUNBUFFERED="1", LDM_ROOT=str(ROOT), **extra)


def unavailable(reason: str) -> None:
    """Skip with the reason; on CI (CI=true) the cluster tests must run, so fail instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"cluster test cannot run on CI: {reason}")
    pytest.skip(reason)


def require(*tools: str) -> None:
    """Root and the given programs (with the Debian package that has each), else skip (fail on CI)."""
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces, mounts, SLURM daemons)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        packages = sorted({TOOLS.get(t, t) for t in missing})
        unavailable(f"missing {', '.join(missing)}: apt-get install {' '.join(packages)}")


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a daemon we started, SIGKILL it after `timeout`, reap it."""
    if proc.poll() is None:
        kill_pid(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_pid(proc.pid)
            proc.wait()


@dataclass
class Host:
    """One "machine": a network namespace, its hostname, address and CPU."""

    netns: str
    name: str
    addr: str
    veth: str
    cpu: int
    hosts_file: Path

    def argv(self, *cmd: str, cpus: str | None = None) -> list[str]:
        """`cmd` run on this host: in its network namespace, with its own hostname (a UTS namespace) and /etc/hosts
        (a mount namespace), pinned to its CPU (or `cpus`). No process is added: nsenter, unshare and sh exec the
        next one."""
        script = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "--mount", "--propagation", "private",
                "--", "sh", "-c", script, str(self.hosts_file), self.name, "taskset", "-c", cpus or str(self.cpu), *cmd]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def link(self, up: bool) -> None:
        subprocess.run(["ip", "-n", self.netns, "link", "set", "dev", self.veth, "up" if up else "down"], check=True)


def remove_stale_namespaces() -> None:
    """Namespaces of an earlier test session whose process is gone (killed before its teardown): their processes are
    killed and the namespaces deleted."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in re.findall(r"^(ldm25-(\d+)-\d)\b", listed, flags=re.M):
        if not Path(f"/proc/{name[1]}").exists():
            pids = subprocess.run(["ip", "netns", "pids", name[0]], capture_output=True, text=True).stdout.split()
            for pid in pids:
                kill_pid(int(pid))
            subprocess.run(["ip", "netns", "del", name[0]], capture_output=True)


@dataclass
class Hosts:
    """Two hosts joined by a veth pair: 169.254.25.1 and .2."""

    base: Path
    hosts: list[Host] = field(default_factory=list)

    @classmethod
    def create(cls, base: Path) -> "Hosts":
        remove_stale_namespaces()
        tag = f"{os.getpid()}"
        hosts_file = base / "hosts"
        made = cls(base)
        made.hosts = [Host(f"ldm25-{tag}-{i}", f"ldmnode{i}", f"{SUBNET}.{i + 1}", f"ldm{tag}v{i}", i % os.cpu_count(),
                           hosts_file) for i in range(2)]
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in made.hosts))
        try:
            for h in made.hosts:
                subprocess.run(["ip", "netns", "add", h.netns], check=True)
            a, b = made.hosts
            subprocess.run(["ip", "link", "add", a.veth, "type", "veth", "peer", "name", b.veth], check=True)
            for h in made.hosts:
                ip = ["ip", "-n", h.netns]
                subprocess.run(["ip", "link", "set", h.veth, "netns", h.netns], check=True)
                subprocess.run([*ip, "addr", "add", f"{h.addr}/24", "dev", h.veth], check=True)
                subprocess.run([*ip, "link", "set", "lo", "up"], check=True)
                subprocess.run([*ip, "link", "set", h.veth, "up"], check=True)
        except (subprocess.CalledProcessError, OSError):
            made.remove()
            raise
        return made

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def kill_all(self) -> None:
        """SIGKILL every process still in the namespaces (all of them were started by these tests)."""
        for _ in range(10):
            pids = [p for h in self.hosts for p in h.pids()]
            if not pids:
                return
            for p in pids:
                kill_pid(p)
            time.sleep(0.3)

    def remove(self) -> None:
        self.kill_all()
        for h in self.hosts:
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)  # deletes its end of the veth pair
        for h in self.hosts:  # a veth end still in this namespace (creation stopped half-way)
            subprocess.run(["ip", "link", "del", h.veth], capture_output=True)


SLURM_CONF = """\
ClusterName=ldmtest
SlurmctldHost={ctl.name}({ctl.addr})
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={base}/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=3600
KillWait=30
{nodes}
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    """A SLURM cluster on the hosts: munged (here), slurmctld on host 0, one slurmd per host (CPUs=1 each)."""

    base: Path
    hosts: Hosts
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.base / "slurm.conf")}

    @classmethod
    def start(cls, base: Path, hosts: Hosts) -> "Slurm":
        for sub in ("state", "log", *(f"spool/{h.name}" for h in hosts.hosts)):
            (base / sub).mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # munged wants the socket's folder searchable by all
        key = base / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs=1 RealMemory=4000 State=UNKNOWN"
                          for h in hosts.hosts)
        (base / "slurm.conf").write_text(SLURM_CONF.format(ctl=hosts[0], base=base, nodes=nodes))
        slurm = cls(base, hosts)
        env = {**os.environ, **slurm.env}
        try:
            slurm._daemon(["munged", "-F", "--force", f"--socket={base}/munge.socket", f"--key-file={key}",
                           f"--pid-file={base}/munged.pid", f"--log-file={base}/log/munged.log",
                           f"--seed-file={base}/munged.seed"], "munged", env)
            deadline = time.time() + 30
            while not (base / "munge.socket").exists():
                slurm._check_alive(deadline)
            slurm._daemon(hosts[0].argv("slurmctld", "-D", "-i"), "slurmctld", env)
            time.sleep(1)
            for h in hosts.hosts:
                slurm._daemon(h.argv("slurmd", "-D"), f"slurmd-{h.name}", env)
            while "idle" not in (state := slurm.run(["sinfo", "-h", "-o", "%T %D"], check=False).stdout) \
                    or state.split()[-1] != str(len(hosts.hosts)):
                slurm._check_alive(deadline)
        except BaseException:
            slurm.stop()
            raise
        return slurm

    def _daemon(self, argv: list[str], name: str, env: dict[str, str]) -> None:
        out = open(self.base / "log" / f"{name}.out", "w")
        self.daemons.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL))

    def _check_alive(self, deadline: float) -> None:
        dead = [d.args for d in self.daemons if d.poll() is not None]
        if dead or time.time() > deadline:
            logs = "".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((self.base / "log").glob("*")))
            raise RuntimeError(f"SLURM did not start ({'exited: ' + str(dead) if dead else 'timeout'}):\n{logs}")
        time.sleep(0.3)

    def run(self, argv: list[str], check: bool = True, env: dict[str, str] | None = None, **kw):
        """A SLURM client command (sbatch, scontrol, scancel, ...) on host 0, the login node."""
        env = {**os.environ, **(env or {}), **self.env}
        proc = subprocess.run(self.hosts[0].argv(*argv), capture_output=True, text=True, env=env, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as KEY -> VALUE."""
        text = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        return dict(part.split("=", 1) for part in text.split() if "=" in part)

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while (info := self.job(job_id))["JobState"] not in states:
            if time.time() > deadline:
                self.run(["scancel", job_id], check=False)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s: {info}")
            time.sleep(1)
        return info

    def stop(self) -> None:
        for d in reversed(self.daemons):
            stop(d)


# --- checks -------------------------------------------------------------------------------------------
def export_weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {name: load_file(run / "export" / f"{name}.safetensors") for name in ("unet", "unet_ema")}


def checkpoint_weights(run: Path, tag: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    from ldm.train.checkpoint import read_weights

    raw, ema, _ = read_weights(run / "checkpoints", tag)
    return {"raw": raw, "ema": ema}


def bitwise_equal(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors that differ in any bit (or exist on one side only); empty when all are identical."""
    diff = []
    for group in a.keys() | b.keys():
        x, y = a.get(group, {}), b.get(group, {})
        for name in x.keys() | y.keys():
            if name not in x or name not in y or x[name].dtype != y[name].dtype or x[name].shape != y[name].shape \
                    or not torch.equal(x[name].view(torch.uint8) if x[name].dim() else x[name],
                                       y[name].view(torch.uint8) if y[name].dim() else y[name]):
                diff.append(f"{group}/{name}")
    return sorted(diff)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all tensors together (L2)."""
    num = sum(float((a[n].double() - b[n].double()).square().sum()) for n in a)
    return (num / sum(float(a[n].double().square().sum()) for n in a)) ** 0.5


def latest_tag(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def wait_for(predicate, timeout: float, what: str, procs: list[subprocess.Popen] = (), interval: float = 0.2):
    """Poll until predicate() is truthy; fail early when one of `procs` has exited."""
    deadline = time.time() + timeout
    while not (value := predicate()):
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: a process exited ({p.returncode}) first: {p.args}")
        if time.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return value


def seconds_until_all_exit(procs: list[subprocess.Popen], timeout: float) -> float:
    """Seconds until every process has exited (each reaped); fails after `timeout` and kills what is left."""
    start = time.time()
    try:
        for p in procs:
            p.wait(max(0.1, timeout - (time.time() - start)))
    except subprocess.TimeoutExpired:
        alive = [p.args for p in procs if p.poll() is None]
        raise AssertionError(f"still running {timeout:.0f} s after the fault: {alive}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                kill_pid(p.pid)
                p.wait()
    return time.time() - start


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run_processes(host: Host, out: Path) -> list[int]:
    """The processes of the run writing to `out` on `host` (its launchers and workers)."""
    return [p for p in host.pids() if f"run.output_dir={out} " in cmdline(p) + " "]


def workers(host: Host, out: Path) -> list[int]:
    """The training processes (torchrun's workers) of that run on `host`."""
    return [p for p in run_processes(host, out) if "-m ldm.cli.train" in cmdline(p)
            and "torch.distributed.run" not in cmdline(p)]
