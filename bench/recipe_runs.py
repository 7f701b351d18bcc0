"""One run of the recipe study: ours (``ldm-train`` in a subprocess, the real system) or the peer (diffusers' loop,
``bench/diffusers_recipe.py``), trained on the same cached latents and text embeddings, its weights kept at the curve
marks, its final (and on request earlier) weights scored by the evaluation protocol. Also the step-time calibration:
every distinct cost (network shape, batch size, power-EMA tracking, the peer's implementation) timed in one process,
interleaved, so that ratios between them do not depend on what else the machine was doing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/ldm/emoji.yaml"
MARKS = (0.25, 0.5, 0.75, 1.0)  # curve points: fractions of a run's steps whose weights are kept
# the peer's config: eps on the DDPM chain (its data, null condition and evaluation settings come from here)
PEER_CONFIG = ["diffusion.process=discrete", "diffusion.prediction=eps", "diffusion.time_sampling=uniform",
               "eval.sampler=dpmpp_2m", "eval.steps=20"]
COST_KEYS = ("model.", "data.batch_size", "train.power_ema", "train.grad_accum")  # overrides that change s/step


def machine() -> dict[str, Any]:
    """What a result was measured on: CPU model, cores, threads used, commit, date."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
            "commit": commit, "date": date.today().isoformat()}


def cost_key(overrides: list[str]) -> str:
    """The overrides that change a step's cost (the rest change only numbers): recipes sharing it share a step time."""
    return ",".join(sorted(o for o in overrides if o.startswith(COST_KEYS))) or "default"


def base_overrides(ctx, name: str, run_dir: Path) -> list[str]:
    return [f"data.train={ctx.data}", f"data.val={ctx.data}", f"data.latents={ctx.latents}",
            f"data.text_cache={ctx.text_cache}", f"autoencoder.path={ctx.autoencoder}", f"run.output_dir={run_dir}",
            f"run.name=recipe-{name}", f"tracking.uri={ctx.tracking_uri}", "tracking.experiment=recipe-study",
            "eval.every=0", "eval.final=false", "train.sample_every=0", "train.val_every=0"]


def load(overrides: list[str]):
    from ldm.config import LDMConfig, load_config

    return load_config(LDMConfig, CONFIG, overrides)


# --- step-time calibration -------------------------------------------------------------------------------------
def calibrate(ctx, classes: dict[str, list[str]], peer: bool, rounds: int = 6, steps: int = 10) -> dict[str, float]:
    """Median seconds per optimizer step of each cost class (class -> overrides) and of the peer ("diffusers"),
    timed in this process in ``rounds`` interleaved rounds of ``steps`` steps after a warm-up round."""
    import torch

    from bench.diffusers_recipe import PeerTrainer, peer_batches, peer_unet, with_our_hparams
    from ldm.train import Trainer

    timers = {}
    for name, overrides in classes.items():
        cfg = load([*base_overrides(ctx, f"calibrate-{name}", ctx.out / "calibration" / "run"), *overrides,
                    "tracking.enabled=false"])
        trainer = Trainer(cfg)
        stream, n = trainer._batches(), [0]

        def ours(trainer=trainer, stream=stream, n=n, accum=cfg.train.grad_accum):
            for _ in range(accum):
                trainer.micro_step(next(stream))
            n[0] += 1
            trainer.ema.update(n[0])
        timers[name] = ours
    if peer:
        cfg = load([*base_overrides(ctx, "calibrate-peer", ctx.out / "calibration" / "peer"), *PEER_CONFIG,
                    "tracking.enabled=false"])
        from ldm.assemble import assemble

        parts = assemble(cfg, "cpu", training=True)
        torch.manual_seed(cfg.run.seed)
        trainer = PeerTrainer(peer_unet(parts.unet()), parts.null_cond, with_our_hparams(cfg), 10**6)
        batches = peer_batches(cfg, parts)
        timers["diffusers"] = lambda: trainer.step(*next(batches)[:2])
    times: dict[str, list[float]] = {k: [] for k in timers}
    for r in range(rounds + 1):
        for name, step in timers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if r:  # round 0 warms up (allocator, caption memo, first-touch pages)
                times[name].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def budget_steps(base_steps: int, seconds: float, base_seconds: float) -> int:
    """Steps of a recipe at the wall-clock of ``base_steps`` default steps (equal steps within 3 %: timing noise),
    rounded down to a multiple of 4."""
    ratio = base_seconds / seconds
    steps = base_steps if abs(ratio - 1) < 0.03 else round(base_steps * ratio)
    return max(len(MARKS), steps - steps % len(MARKS))  # a multiple of 4: the curve marks are checkpoints


def marks_of(steps: int) -> list[int]:
    return sorted({max(1, round(f * steps)) for f in MARKS})


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- ours ----------------------------------------------------------------------------------------------------
def train_ours(ctx, name: str, overrides: list[str], steps: int) -> dict[str, Any]:
    """``ldm-train`` for ``steps`` steps with checkpoints at the curve marks; wall and CPU seconds measured."""
    folder = ctx.out / name
    run_dir = folder / "run"
    marks = marks_of(steps)
    every = math.gcd(*marks)  # every mark is a checkpoint
    cmd = [sys.executable, "-m", "ldm.cli.train", "--config", str(CONFIG), *base_overrides(ctx, name, run_dir),
           *overrides, f"train.max_steps={steps}", f"train.ckpt_every={every}",
           f"train.keep_last={steps // every + 1}"]
    folder.mkdir(parents=True, exist_ok=True)
    cpu0, wall0 = _children_cpu(), time.time()
    with open(folder / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: ldm-train failed ({proc.returncode}); see {folder / 'train.log'}")
    return {"train_wall_s": time.time() - wall0, "train_cpu_s": _children_cpu() - cpu0, "marks": marks,
            "command": " ".join(["ldm-train", "--config", "configs/ldm/emoji.yaml", *overrides,
                                 f"train.max_steps={steps}"])}


def ours_pipeline(ctx, name: str, step: int, ema: bool = True):
    """The pipeline of a run's weights at ``step`` (EMA or raw) and its config."""
    from ldm.assemble import from_weights
    from ldm.config import LDMConfig, load_config
    from ldm.io import load_tensors
    from ldm.train.checkpoint import read_weights, tag_for

    run_dir = ctx.out / name / "run"
    cfg = load_config(LDMConfig, run_dir / "config.yaml")
    raw, averaged, _ = read_weights(run_dir / "checkpoints", tag_for(step))
    null = load_tensors(run_dir / "null_condition.safetensors")
    return from_weights(cfg, averaged if ema else raw, null, "cpu"), cfg


def phema_row(ctx, name: str, sigma_rel: float) -> dict[str, Any]:
    """A row for run ``name``'s power EMA of width ``sigma_rel`` reconstructed post hoc (``ldm-export
    --ema-sigma-rel``) from the snapshots it kept, scored like every other row."""
    from ldm.assemble import load_exported

    row_name = f"{name}@phema{sigma_rel:g}"
    row = cached(ctx, row_name)
    if row is not None:
        return row
    base = cached(ctx, name)
    export = ctx.out / row_name / "export"
    export.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "ldm.cli.export", str(ctx.out / name / "run"), "--ema-sigma-rel",
                    str(sigma_rel), "--out", str(export)], check=True, cwd=ROOT, capture_output=True)
    pipe, cfg = load_exported(export)
    print(f"{row_name}:", flush=True)
    metrics = evaluate(ctx, pipe, base["sampling"])
    row = {**{k: base[k] for k in ("impl", "overrides", "seconds_per_step", "steps", "train_wall_s", "train_cpu_s",
                                   "sampling", "machine", "marks")}, "name": row_name,
           "overrides": [*base["overrides"], f"post-hoc power EMA sigma_rel {sigma_rel:g}"],
           "points": [{"step": base["steps"], "seconds": base["steps"] * base["seconds_per_step"], **metrics}],
           **metrics}
    save(ctx, row)
    return row


def sampler_row(ctx, name: str, sampler: str, steps: int) -> dict[str, Any]:
    """A row for run ``name``'s final weights sampled with another sampler (its guidance kept)."""
    row_name = f"{name}[{sampler}x{steps}]"
    row = cached(ctx, row_name)
    if row is not None:
        return row
    base = cached(ctx, name)
    final = base["steps"]
    pipe, _ = (peer_pipeline if base["impl"] == "diffusers" else ours_pipeline)(ctx, name, final)
    settings = {**base["sampling"], "sampler": sampler, "steps": steps}
    print(f"{row_name}:", flush=True)
    metrics = evaluate(ctx, pipe, settings)
    row = {**base, "name": row_name, "sampling": settings,
           "points": [{"step": final, "seconds": final * base["seconds_per_step"], **metrics}], **metrics}
    (ctx.out / row_name).mkdir(parents=True, exist_ok=True)
    save(ctx, row)
    return row


# --- the peer ------------------------------------------------------------------------------------------------
def train_peer_run(ctx, name: str, recipe, steps: int) -> dict[str, Any]:
    """diffusers' loop for ``steps`` steps on our trainer's batches; EMA weights saved at the curve marks."""
    import torch

    from bench.diffusers_recipe import PeerTrainer, peer_batches, peer_unet, train_peer
    from ldm.assemble import assemble
    from ldm.io import save_tensors

    folder = ctx.out / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load([*base_overrides(ctx, name, folder / "run"), *PEER_CONFIG])
    parts = assemble(cfg, "cpu", training=True)
    torch.manual_seed(recipe.seed)
    unet = peer_unet(parts.unet())
    marks = marks_of(steps)

    def keep(step: int, cpu: float, ema_unet) -> None:
        save_tensors(ema_unet.state_dict(), folder / f"ema-{step:08d}.safetensors")
        cpu_at[step] = cpu

    cpu_at: dict[int, float] = {}
    wall0 = time.time()
    train_peer(PeerTrainer(unet, parts.null_cond, recipe, steps), peer_batches(cfg, parts), steps, keep, tuple(marks))
    return {"train_wall_s": time.time() - wall0, "train_cpu_s": cpu_at[steps], "marks": marks,
            "recipe": recipe.__dict__, "command": f"bench.diffusers_recipe {recipe.describe()}, {steps} steps"}


def peer_pipeline(ctx, name: str, step: int):
    """Our pipeline (same autoencoder, text encoder, null condition, samplers) over the peer's EMA UNet at ``step``."""
    from bench.diffusers_recipe import peer_denoiser, peer_unet
    from ldm.assemble import assemble
    from ldm.io import load_tensors

    cfg = load([*base_overrides(ctx, name, ctx.out / name / "run"), *PEER_CONFIG])
    parts = assemble(cfg, "cpu")
    unet = peer_unet(parts.unet())
    unet.load_state_dict(load_tensors(ctx.out / name / f"ema-{step:08d}.safetensors"))
    pipe = parts.pipeline(unet)
    pipe.denoiser = peer_denoiser(pipe.unet)
    return pipe, cfg


# --- evaluation ---------------------------------------------------------------------------------------------
def evaluate(ctx, pipe, sampling: dict[str, Any]) -> dict[str, float]:
    from ldm.eval import summary

    result = ctx.evaluator.evaluate(pipe, **sampling)
    print(f"  {summary(result.metrics)}", flush=True)
    return result.metrics


def sampling_of(cfg) -> dict[str, Any]:
    """The evaluation settings a run is scored with (its config's eval section)."""
    e = cfg.eval
    return {"sampler": e.sampler, "steps": e.steps, "guidance": e.guidance}


def score(ctx, result: dict[str, Any], steps_to_score: list[int]) -> dict[str, Any]:
    """Evaluate the run at each of ``steps_to_score`` not yet scored; points are kept sorted by step."""
    done = {p["step"] for p in result["points"]}
    for step in steps_to_score:
        if step in done:
            continue
        print(f"{result['name']} step {step}:", flush=True)
        if result["impl"] == "diffusers":
            pipe, cfg = peer_pipeline(ctx, result["name"], step)
        else:
            pipe, cfg = ours_pipeline(ctx, result["name"], step)
        settings = result.setdefault("sampling", sampling_of(cfg))
        metrics = evaluate(ctx, pipe, settings)
        result["points"].append({"step": step, "seconds": step * result["seconds_per_step"], **metrics})
    result["points"].sort(key=lambda p: p["step"])
    final = next(p for p in result["points"] if p["step"] == result["steps"])
    result.update({k: v for k, v in final.items() if k not in ("step", "seconds")})
    return result


def save(ctx, result: dict[str, Any]) -> None:
    (ctx.out / result["name"] / "result.json").write_text(json.dumps(result, indent=2))


def cached(ctx, name: str) -> dict[str, Any] | None:
    file = ctx.out / name / "result.json"
    return json.loads(file.read_text()) if file.is_file() else None
