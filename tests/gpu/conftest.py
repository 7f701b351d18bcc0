"""GPU tests (marker `gpu`): skipped without CUDA. They make their own inputs (bench/offline_assets.py), so they
run on a machine with no network and no shipped data: bench/gpu_check.sh runs them there.

LDM_GPU_TESTS_ON_CPU=1 runs them on the CPU instead (the same code paths with the device chosen at run
time), to check the tests themselves where no GPU is at hand: `./run.sh test` (what CI runs) sets it, so bf16 ZeRO-2
training, its exact resume and bf16 vs fp32 run in every CI run; the tests that need CUDA kernels or inductor's
compile of the UNet skip themselves on the CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (exact-resume test)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.conftest import ROOT  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("LDM_GPU_TESTS_ON_CPU") == "1" else None)
CONFIG = str(ROOT / "configs/ldm/emoji.yaml")
IMAGE_SIZE = 16
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs CUDA (LDM_GPU_TESTS_ON_CPU=1: on CPU)")]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """Shape shards, a random tiny BERT text encoder and a tiny autoencoder (16 px -> 8x8x4), made here."""
    if DEVICE is None:
        pytest.skip("needs CUDA")
    from bench.offline_assets import shapes_dataset, tiny_autoencoder, tiny_text_encoder

    base = tmp_path_factory.mktemp("gpu_assets")
    shards = shapes_dataset(base / "shapes", count=48, image_size=IMAGE_SIZE)
    return {"shards": shards, "text_encoder": tiny_text_encoder(base / "text_encoder"),
            "autoencoder": tiny_autoencoder(shards, base / "autoencoder", IMAGE_SIZE)}
