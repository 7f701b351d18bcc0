"""Shared fixtures: the npm emoji cache, tiny real emoji shards, a tiny stage-1 autoencoder, environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def environment_defaults(cuda: bool) -> dict[str, str]:
    """What the tests set unless the environment has it: offline Hugging Face, DeepSpeed's op cache, and DeepSpeed's
    CPU accelerator only where there is no CUDA (with CUDA, DeepSpeed must pick its CUDA accelerator: the GPU tests
    train on the GPU, and a CPU-accelerator engine would keep the UNet on the CPU)."""
    env = {"TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    return env


for _key, _value in environment_defaults(torch.cuda.is_available()).items():
    os.environ.setdefault(_key, _value)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread when the CPU is shared; restores the thread count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained_steps(monkeypatch) -> list[int]:
    """The optimizer steps every Trainer of the test trains, in order (the step each micro-batch belongs to): a run
    that resumes from a step-k checkpoint trains k+1.. only, one that starts over trains 1.. again."""
    import ldm.train.trainer as trainer_mod

    steps: list[int] = []
    real = trainer_mod.Trainer.micro_step

    def micro_step(self, batch):
        steps.append(self.step + 1)
        return real(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "micro_step", micro_step)
    return steps


def resumed_line(checkpoints: Path, step: int) -> str:
    """What the trainer prints when it resumes from the checkpoint of ``step`` under ``checkpoints``."""
    return f"resumed from {checkpoints / f'step{step:08d}'} at step {step}"


@pytest.fixture(scope="session")
def npm_cache() -> Path:
    """The project's npm tarball cache ($LDM_CACHE/npm or ~/.cache/ldm/npm); the code fetches what is missing."""
    from ldm.data.emoji import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, npm_cache) -> Path:
    """12 real emoji (both styles) at 16 px: train/val shards of 6 samples and an index.json."""
    from ldm.data.shards import build_emoji_shards

    out = tmp_path_factory.mktemp("tiny_emoji")
    build_emoji_shards(out, image_size=16, samples_per_shard=6, val_fraction=0.2, limit=12, cache_dir=npm_cache)
    return out


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory, tiny_shards) -> Path:
    """A stage-1 autoencoder trained for a few steps through the real CLI (16 px -> 8x8x4 latents)."""
    from ldm.cli.train_autoencoder import main

    base = tmp_path_factory.mktemp("tiny_ae")
    rc = main(["--config", str(ROOT / "configs/autoencoder/emoji.yaml"), f"data.train={tiny_shards}",
               f"data.val={tiny_shards}", "data.image_size=16", "data.batch_size=4", "model.block_out_channels=[8,16]",
               "model.norm_num_groups=8", "model.latent_channels=4", "train.steps=3", "train.scale_batches=2", "train.log_every=1",
               f"run.output_dir={base / 'autoencoder'}", f"tracking.uri=sqlite:///{base / 'mlflow.db'}"])
    assert rc == 0
    return base / "autoencoder"


@pytest.fixture(scope="session")
def tiny_ldm_run(tmp_path_factory, tiny_shards, tiny_autoencoder) -> Path:
    """A tiny LDM trained 4 steps through the real CLI (no tracking): its run folder (checkpoints/, export/)."""
    from ldm.cli.train import main

    out = tmp_path_factory.mktemp("tiny_ldm") / "run"
    rc = main(["--config", str(ROOT / "configs/ldm/emoji.yaml"),
               *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, None)])
    assert rc == 0
    return out


# The DDPM chain with eps prediction: the tiny model most tests train and sample (its tools: the ELBO, the chain's step
# cap, DDPM/DDIM against diffusers' schedulers); the shipped default (rectified flow) runs with recipe="default".
CHAIN = ["diffusion.process=discrete", "diffusion.prediction=eps", "diffusion.time_sampling=uniform",
         "sampling.sampler=ddpm", "eval.sampler=dpmpp_2m", "eval.steps=20"]


def tiny_ldm_overrides(shards: Path, autoencoder: Path, out: Path, tracking_uri: str | None,
                       recipe: str = "chain") -> list[str]:
    """Overrides that shrink configs/ldm/emoji.yaml to seconds on a CPU; ``recipe`` "chain" trains on the DDPM chain
    (``CHAIN``), "default" keeps the config's own recipe."""
    if recipe not in ("chain", "default"):
        raise ValueError(f"recipe must be 'chain' or 'default', got {recipe!r}")
    return [*(CHAIN if recipe == "chain" else []), f"data.train={shards}", f"data.val={shards}", "data.image_size=16", "data.batch_size=4",
            "data.shuffle_buffer=8", f"autoencoder.path={autoencoder}", "model.preset=tiny", "text_encoder.max_length=8",
            "train.max_steps=4", "train.ckpt_every=2", "train.log_every=1", "train.warmup_steps=1",
            "train.lr=5.0e-4",  # the rate the tests' tolerances were set at, whatever the default's
            "sampling.steps=3", "sampling.images_per_prompt=1", "sampling.prompts=[red apple, dog face]",
            "train.val_every=0", "eval.final=false",
            f"run.output_dir={out}",
            f"tracking.uri={tracking_uri}" if tracking_uri else "tracking.enabled=false"]


def start_mlflow_server(base: Path, port: int | None = None):
    """Start a real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts) on ``port`` (default: a free
    one); returns (process, URI)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination", str(base / "artifacts")],
        stdout=open(base / "server.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=base,
        start_new_session=True)  # its own process group: the server forks workers that must die with it
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_mlflow_server(proc)
            raise RuntimeError(f"mlflow server did not start: {(base / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, uri


def stop_mlflow_server(proc) -> None:
    """Kill the server's whole process group (the server and its workers) and reap it."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` for the session; yields its URI, stops it by process group."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    yield uri
    stop_mlflow_server(proc)
