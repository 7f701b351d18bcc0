"""Every CLI lets glibc keep freed memory (fewer page faults per training step); users' settings win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch, torch.nn.functional as F
from ldm.cli._common import retain_freed_memory
from ldm.models import UNet, unet_preset
applied = retain_freed_memory() if sys.argv[1] == "1" else None
torch.manual_seed(0)
unet = UNet(**unet_preset("tiny"))
x, ctx = torch.randn(32, 4, 8, 8), torch.randn(32, 8, unet.config["context_dim"])
def step():
    F.mse_loss(unet(x, torch.rand(32) * 999, ctx), x).backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(apply: bool, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", STEPS, "1" if apply else "0"], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_cuts_page_faults_of_training_steps():
    applied, faults = _run(True)
    _, default_faults = _run(False)
    assert applied == "True"
    # measured: ~6k vs ~18k minor faults for three forward+backward passes of the tiny UNet at batch 32
    assert faults < 0.6 * default_faults, (faults, default_faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_users_malloc_settings_take_precedence():
    applied, _ = _run(True, MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
