"""A rank whose peer goes silent fails after the one collective timeout in every process group, ZeRO's included.

DeepSpeed sets DEEPSPEED_TIMEOUT on the default group only; ZeRO's data-parallel group kept torch's 30 minutes
under gloo, so after a cut link a rank waiting in ZeRO's all-gather outlived the timeout (the cluster test
test_link_cut_mid_run found it). build_engine now aligns every group."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SECONDS = 3


@pytest.mark.distributed
def test_zero_group_gets_the_collective_timeout_and_fails_on_a_silent_peer():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.train.timeout_worker", str(SECONDS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
                          start_new_session=True)
    log = proc.stdout + proc.stderr
    # build_engine gave ZeRO's group DeepSpeed's timeout (torch's own default for a new gloo group is 30 minutes)
    groups = re.findall(r"rank \d: ZeRO group timeout (\S+), DeepSpeed's (\S+)", log)
    assert len(groups) == 2 and all(ours == theirs for ours, theirs in groups), log[-3000:]
    failed = re.search(r"rank 0: the all-gather failed after ([\d.]+) s", log)
    assert failed, log[-3000:]
    assert SECONDS - 0.5 <= float(failed.group(1)) < SECONDS + 20, log[-3000:]
    assert proc.returncode != 0
