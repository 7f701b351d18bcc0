"""Recipe study and the side-by-side against diffusers, at the demo's LDM budget, on the same machine, data and batches.

Every run trains from the same cached latents and cached text embeddings (made here if missing) and reads the same
stream: a recipe of ours is ``ldm-train`` on the emoji default (configs/ldm/emoji.yaml) with a few overrides; a peer
run is diffusers' text-to-image loop (``bench/diffusers_recipe.py``) on exactly our trainer's batches. The budget is
the demo's ``train.max_steps`` of default steps (``--steps``); a recipe that changes the cost of a step (network,
batch size, power-EMA tracking) and the peer get the steps that take the same time, from step times measured in one
process, interleaved (``calibration.json``), so the ratios do not depend on the machine's load. Each run also records
its own measured wall-clock and CPU seconds. Every model is scored by the evaluation protocol (``ldm.eval``: the same
1,000 prompts, seeds, reference set and classifier; intervals and floors are the protocol's), sampled with the
settings in its config's ``eval`` section, named in the table.

    python -m bench.bench_recipe --recipes default,v,flow                   # a few of ours, then the table
    python -m bench.bench_recipe --peers diffusers-ours,diffusers-defaults  # implementation parity, script defaults
    python -m bench.bench_recipe --peers sweep                              # the peer's tuning sweep
    python -m bench.bench_recipe --curve flow-ln,diffusers-best             # evaluate the kept curve points too
    python -m bench.bench_recipe --table                                    # only the tables from what is there

Runs and their results are kept under --out (runs/recipe-study; a re-run reuses them) and gathered in --results
(bench/results): recipe.md, recipe.json and recipe.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from bench import recipe_runs as rr

# the study's base learning rate, explicit so a row keeps its meaning when the default's changes (the default moved
# to the best rate the study measured)
LR = "train.lr=5.0e-4"
FLOW = ["diffusion.process=flow", "diffusion.prediction=velocity", "eval.sampler=heun_ode", "eval.steps=10",
        "sampling.sampler=heun_ode", "sampling.steps=25", LR]
EPS = ["diffusion.process=discrete", "diffusion.prediction=eps", "eval.sampler=dpmpp_2m", "eval.steps=20",
       "sampling.sampler=ddpm", "sampling.steps=50", "diffusion.time_sampling=uniform", LR]
RECIPES: dict[str, list[str]] = {
    "eps": EPS,
    "v": [*EPS, "diffusion.prediction=v"],
    "flow": [*FLOW, "diffusion.time_sampling=uniform"],
    "flow-ln": [*FLOW, "diffusion.time_sampling=logit_normal"],
    "flow-ln-shift2": [*FLOW, "diffusion.time_sampling=logit_normal", "diffusion.time_shift=2.0"],
    "flow-ln-lr1e-3": [*FLOW, "diffusion.time_sampling=logit_normal", "train.lr=1.0e-3"],
    "flow-ln-lr2e-3": [*FLOW, "diffusion.time_sampling=logit_normal", "train.lr=2.0e-3"],
    "flow-ln-lr2.5e-4": [*FLOW, "diffusion.time_sampling=logit_normal", "train.lr=2.5e-4"],
    "flow-ln-lr1e-3-ema0.999": [*FLOW, "diffusion.time_sampling=logit_normal", "train.lr=1.0e-3",
                                "train.ema_decay=0.999"],
    "flow-ln-lr1e-3-drop0.2": [*FLOW, "diffusion.time_sampling=logit_normal", "train.lr=1.0e-3",
                               "diffusion.cond_dropout=0.2"],
    "flow-ln-constant": [*FLOW, "diffusion.time_sampling=logit_normal", "train.lr_schedule=constant"],
    "flow-ln-warmup500": [*FLOW, "diffusion.time_sampling=logit_normal", "train.warmup_steps=500"],
    "flow-ln-batch64": [*FLOW, "diffusion.time_sampling=logit_normal", "data.batch_size=64"],
    "flow-ln-batch16": [*FLOW, "diffusion.time_sampling=logit_normal", "data.batch_size=16"],
    "flow-ln-ema0.999": [*FLOW, "diffusion.time_sampling=logit_normal", "train.ema_decay=0.999"],
    "flow-ln-ema0.99": [*FLOW, "diffusion.time_sampling=logit_normal", "train.ema_decay=0.99"],
    "flow-ln-wide": [*FLOW, "diffusion.time_sampling=logit_normal", "model.block_out_channels=[96,192]"],
    "flow-ln-narrow": [*FLOW, "diffusion.time_sampling=logit_normal", "model.block_out_channels=[48,96]",
                       "model.norm_num_groups=16", "model.head_dim=16"],
    "flow-ln-deep": [*FLOW, "diffusion.time_sampling=logit_normal", "model.layers_per_block=2"],
    "flow-ln-drop0.2": [*FLOW, "diffusion.time_sampling=logit_normal", "diffusion.cond_dropout=0.2"],
    "flow-ln-drop0.05": [*FLOW, "diffusion.time_sampling=logit_normal", "diffusion.cond_dropout=0.05"],
    # EMA widths post hoc (--phema): EDM2's power EMAs tracked, snapshots every 1/32 of the run
    "flow-ln-phema": [*FLOW, "diffusion.time_sampling=logit_normal", "train.power_ema=[0.05,0.15]",
                      "train.power_ema_snapshot_every={steps32}"],
    # the backbones at equal wall-clock (issue 27): PixArt-alpha's DiT and SD3's MMDiT at their emoji-cpu presets, the
    # default's flow recipe; the MMDiT embeds the MiniLM's mean-pooled vector (its own text cache)
    "dit-flow-ln": [*FLOW, "diffusion.time_sampling=logit_normal", "model.kind=dit", "model.preset=emoji-cpu"],
    "mmdit-flow-ln": [*FLOW, "diffusion.time_sampling=logit_normal", "model.kind=mmdit", "model.preset=emoji-cpu",
                      "text_encoder.pooled=true"],
    "default": [],  # configs/ldm/emoji.yaml as it stands
}
METRICS = ("fid", "kid", "class_acc")  # lower, lower, higher is better
TEXT_KEYS = ("text_encoder.", "data.text_cache")  # not a step's cost (text is cached), but its network needs them


def peers() -> dict:
    """Peer runs: the script's defaults, our hyper-parameters (implementation parity), the tuning sweep."""
    from bench.diffusers_recipe import SCRIPT_DEFAULTS, sweep, with_our_hparams

    return {"diffusers-defaults": SCRIPT_DEFAULTS, "diffusers-ours": with_our_hparams(rr.load(EPS)), **sweep()}


def ours_with_peer_hparams(recipe) -> list[str]:
    """Our trainer with a peer recipe's hyper-parameters (the fourth cell of implementation x recipe)."""
    return [*EPS, f"train.lr={recipe.lr}", f"train.lr_schedule={recipe.lr_schedule}",
            f"train.warmup_steps={recipe.warmup_steps if recipe.lr_schedule != 'constant' else 0}",
            f"train.weight_decay={recipe.weight_decay}", f"train.ema_decay={recipe.ema_decay}",
            f"diffusion.cond_dropout={recipe.proportion_empty_prompts}"]


class Context:
    """What every run shares: the data, caches, budget, step times and the evaluator (built on first use)."""

    def __init__(self, args):
        self.out, self.data, self.autoencoder = args.out, args.data, args.autoencoder
        self.tracking_uri, self.num_images = args.tracking_uri, args.num_images
        self.latents, self.text_cache = caches(args)
        self.steps = args.steps or rr.load([]).train.max_steps
        self._evaluator = None

    @property
    def evaluator(self):
        if self._evaluator is None:
            from ldm.assemble import build_evaluator

            self._evaluator = build_evaluator(rr.load([f"data.train={self.data}"]), "cpu", num_images=self.num_images)
        return self._evaluator


def caches(args) -> tuple[Path, Path]:
    """Latent shards of the data under the autoencoder, and their text embeddings (made once, checked every time)."""
    from ldm.data.latents import check_latent_cache, folder_hash

    latents, text = args.out / "latents", args.out / "text"
    try:
        check_latent_cache(str(latents), folder_hash(args.autoencoder))
    except (ValueError, FileNotFoundError):
        run_logged([sys.executable, "-m", "ldm.cli.shards", "latents", "--data", args.data, "--autoencoder",
                    args.autoencoder, "--out", str(latents), "--image-size", str(rr.load([]).data.image_size)],
                   args.out / "latents.log")
    if not (text / "index.json").is_file():
        run_logged([sys.executable, "-m", "ldm.cli.shards", "text", "--config", str(rr.CONFIG), "--data",
                    str(latents), "--out", str(text)], args.out / "text.log")
    return latents, text


def own_text_cache(ctx, overrides: list[str]) -> list[str]:
    """A recipe that changes the text encoder reads its own text cache (made here if missing): the override of
    data.text_cache it needs, after the shared one."""
    text = sorted(o for o in overrides if o.startswith("text_encoder."))
    if not text:
        return []
    folder = ctx.out / ("text-" + "-".join(o.split(".", 1)[1].replace("=", "_") for o in text))
    if not (folder / "index.json").is_file():
        run_logged([sys.executable, "-m", "ldm.cli.shards", "text", "--config", str(rr.CONFIG), "--data",
                    str(ctx.latents), "--out", str(folder), *text], folder.parent / f"{folder.name}.log")
    return [f"data.text_cache={folder}"]


def run_logged(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=rr.ROOT, env=os.environ.copy())
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:5])}... failed ({proc.returncode}); see {log}")


def step_times(ctx, ours: dict[str, list[str]], peer: bool) -> dict[str, float]:
    """Seconds per step of every cost class needed, measured in one process, interleaved, and kept in
    calibration.json; classes measured later are scaled by the default's time in both measurements."""
    file = ctx.out / "calibration.json"
    known = json.loads(file.read_text()) if file.is_file() else {"times": {}}
    need = {rr.cost_key(o): [x.replace("{steps32}", "50") for x in o if x.startswith(rr.COST_KEYS + TEXT_KEYS)]
            for o in ours.values()}
    missing = {k: v for k, v in need.items() if k not in known["times"]}
    want_peer = peer and "diffusers" not in known["times"]
    if missing or want_peer or "default" not in known["times"]:
        missing["default"] = []  # every calibration times the default too: the ratios come from one measurement
        print(f"calibrating step times: {', '.join(missing)}{' + diffusers' if want_peer else ''}", flush=True)
        times = rr.calibrate(ctx, missing, want_peer)
        first = known["times"].get("default", times["default"])
        known["times"].update({k: v * first / times["default"] for k, v in times.items()})
        known["machine"] = rr.machine()
        file.write_text(json.dumps(known, indent=2))
    return known["times"]


def run_ours(ctx, name: str, overrides: list[str], times: dict[str, float]) -> dict:
    result = rr.cached(ctx, name)
    if result is None:
        seconds = times[rr.cost_key(overrides)]
        steps = rr.budget_steps(ctx.steps, seconds, times["default"])
        overrides = [o.replace("{steps32}", str(max(1, steps // 32))) for o in overrides]
        print(f"{name}: {steps} steps ({seconds:.3f} s/step calibrated)", flush=True)
        result = {"name": name, "impl": "ours", "overrides": overrides, "seconds_per_step": seconds, "steps": steps,
                  "points": [], "machine": rr.machine(), **rr.train_ours(ctx, name, overrides, steps)}
        rr.save(ctx, result)
    return result


def run_peer(ctx, name: str, recipe, times: dict[str, float], equal_steps: bool) -> dict:
    """A peer run: equal steps for the parity run (per-step quality), equal wall-clock for the others."""
    result = rr.cached(ctx, name)
    if result is None:
        seconds = times["diffusers"]
        steps = ctx.steps if equal_steps else rr.budget_steps(ctx.steps, seconds, times["default"])
        print(f"{name}: {steps} steps ({seconds:.3f} s/step calibrated; {recipe.describe()})", flush=True)
        result = {"name": name, "impl": "diffusers", "overrides": [recipe.describe()], "seconds_per_step": seconds,
                  "steps": steps, "points": [], "machine": rr.machine(),
                  **rr.train_peer_run(ctx, name, recipe, steps)}
        rr.save(ctx, result)
    return result


def finish(ctx, result: dict, curve: bool) -> dict:
    """Score the final weights (and every kept mark for a curve run)."""
    rr.score(ctx, result, result["marks"] if curve else [result["steps"]])
    rr.save(ctx, result)
    return result


# --- tables ---------------------------------------------------------------------------------------------------
def time_to_reach(points: list[dict], target: float, metric: str, bound: str = "") -> float | None:
    """Seconds of training at which a curve first reaches ``target`` (linear between evaluations); None: never.
    ``bound`` "_lo"/"_hi" follows that end of each point's interval instead of the value."""
    better = (lambda v: v >= target) if metric == "class_acc" else (lambda v: v <= target)
    key, previous = metric + bound, None
    for p in points:
        if better(p[key]):
            if previous is None:
                return p["seconds"]
            t0, v0, t1, v1 = previous["seconds"], previous[key], p["seconds"], p[key]
            return t0 + (t1 - t0) * (target - v0) / (v1 - v0) if v1 != v0 else t1
        previous = p
    return None


def reach_row(ours: dict, peer: dict, metric: str) -> str:
    """How long ``ours`` takes to reach the peer's final value, with the range its and the peer's intervals allow
    (early: our optimistic bound meets the peer's pessimistic one; late: the reverse), as a fraction of the peer's
    training time."""
    up = metric == "class_acc"
    t = time_to_reach(ours["points"], peer[metric], metric)
    early = time_to_reach(ours["points"], peer[metric + ("_lo" if up else "_hi")], metric, "_hi" if up else "_lo")
    late = time_to_reach(ours["points"], peer[metric + ("_hi" if up else "_lo")], metric, "_lo" if up else "_hi")
    total = peer["steps"] * peer["seconds_per_step"]

    def frac(x):
        return f"{x / total:.2f}" if x is not None else "not reached"

    scale = 100 if up else 1e3 if metric == "kid" else 1
    return (f"| {ours['name']} | {metric} | {peer[metric] * scale:.4g} | {frac(t)} [{frac(early)}, {frac(late)}] |")


def table(rows: list[dict]) -> str:
    from ldm.eval.sweep import cell

    head = ["run", "implementation", "recipe", "sampler", "steps", "s/step", "train wall / CPU min", "FID [95 %]",
            "KID x1e3 [95 %]", "alignment % [95 %]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r.get("sampling", {})
        shown = {o.split("=", 1)[0]: o for o in r["overrides"]  # a key given twice: its last value, as the run had
                 if not o.startswith(("eval.", "sampling.", "data.text_cache"))}
        recipe = ", ".join(shown.values()) or "(the config)"
        lines.append("| " + " | ".join([
            r["name"], r["impl"], recipe, f"{s.get('sampler')} x{s.get('steps')} g{s.get('guidance', 0):g}",
            str(r["steps"]), f"{r['seconds_per_step']:.3f}", f"{r['train_wall_s'] / 60:.1f} / {r['train_cpu_s'] / 60:.1f}",
            cell(r, "fid"), cell(r, "kid"), cell(r, "class_acc")]) + " |")
    f = rows[0]
    lines.append(f"\nReal floor at the same counts: FID {cell(f, 'fid_floor')}, KID x1e3 {cell(f, 'kid_floor')}; "
                 f"alignment ceiling {100 * f.get('class_acc_real', float('nan')):.1f} %, chance "
                 f"{100 * f.get('class_chance', float('nan')):.1f} %; {int(f['num_images'])} generated images.")
    m = f["machine"]
    commits: dict[str, list[str]] = {}
    for r in rows:
        commits.setdefault(r["machine"]["commit"], []).append(r["name"])
    dates = sorted({r["machine"]["date"] for r in rows})
    lines.append(f"Measured on {m['cpu']} ({m['cores']} cores, {m['threads'] or 'default'} threads), "
                 f"{' to '.join(dict.fromkeys([dates[0], dates[-1]]))}; "
                 "commits: " + "; ".join(f"{c} ({', '.join(names)})" for c, names in commits.items()) + ".")
    return "\n".join(lines)


def write_tables(args, rows: list[dict]) -> str:
    from ldm.report.plots import eval_points

    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "recipe.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    eval_points(rows, args.results / "recipe.png", labels=[r["name"] for r in rows])
    by = {r["name"]: r for r in rows}
    for ours, peer in [c.split(":") for c in args.reach]:
        if ours in by and peer in by and len(by[ours]["points"]) > 1:
            text += ("\n\n| ours | metric | peer's final | fraction of the peer's wall-clock to reach it [range] |\n"
                     "|---|---|---|---|\n" + "\n".join(reach_row(by[ours], by[peer], m) for m in METRICS))
    (args.results / "recipe.md").write_text(text + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--autoencoder", default="runs/autoencoder")
    p.add_argument("--recipes", default="", help=f"ours, comma-separated, from {', '.join(RECIPES)}")
    p.add_argument("--peers", default="", help="diffusers-defaults, diffusers-ours, the sweep's names, or 'sweep'")
    p.add_argument("--peer-hparams", default="", help="peer recipe names to train with our trainer too (2x2 cell)")
    p.add_argument("--curve", default="", help="runs scored at every kept mark (1/4, 1/2, 3/4, all of the steps)")
    p.add_argument("--reach", action="append", default=[], metavar="OURS:PEER",
                   help="time-to-quality rows: OURS's curve against PEER's final values")
    p.add_argument("--phema", default="", metavar="RUN:W1,W2",
                   help="score RUN's post-hoc power EMA at these relative widths (RUN tracked power EMAs)")
    p.add_argument("--samplers", default="", metavar="S:N,...",
                   help="also score the final weights of --recipes/--peers runs with these samplers (S x N steps)")
    p.add_argument("--steps", type=int, default=None, help="budget in default steps (default: the demo's max_steps)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--table", action="store_true", help="only gather the results there are into the tables")
    p.add_argument("--out", type=Path, default=rr.ROOT / "runs/recipe-study", help="runs, caches, per-run results")
    p.add_argument("--results", type=Path, default=rr.ROOT / "bench/results", help="recipe.md, .json, .png")
    p.add_argument("--tracking-uri", default=f"sqlite:///{rr.ROOT / 'runs/mlflow.db'}")
    args = p.parse_args()
    all_peers = peers()
    names = [n for n in args.recipes.split(",") if n]
    peer_names = [n for n in args.peers.split(",") if n]
    if "sweep" in peer_names:
        peer_names = [n for n in peer_names if n != "sweep"] + [n for n in all_peers if n.startswith("diffusers-lr")]
    hparam_names = [n for n in args.peer_hparams.split(",") if n]
    unknown = [n for n in names if n not in RECIPES] + [n for n in peer_names + hparam_names if n not in all_peers]
    if unknown:
        p.error(f"unknown run(s) {unknown}; ours: {', '.join(RECIPES)}; peers: {', '.join(all_peers)}")
    args.out.mkdir(parents=True, exist_ok=True)
    curve = {n for n in args.curve.split(",") if n}
    ctx = Context(args)
    ours = {n: [*RECIPES[n], *own_text_cache(ctx, RECIPES[n])] for n in names}
    ours.update({f"ours-with-{n}": ours_with_peer_hparams(all_peers[n]) for n in hparam_names})
    if not args.table:
        times = step_times(ctx, ours, bool(peer_names))
        for name, overrides in ours.items():
            finish(ctx, run_ours(ctx, name, overrides, times), name in curve)
        for name in peer_names:
            finish(ctx, run_peer(ctx, name, all_peers[name], times, name == "diffusers-ours"), name in curve)
    for sampler, n in (x.split(":") for x in args.samplers.split(",") if x):
        for name in [*ours, *peer_names]:
            rr.sampler_row(ctx, name, sampler, int(n))
    if args.phema:
        run, widths = args.phema.split(":")
        for w in widths.split(","):
            rr.phema_row(ctx, run, float(w))
    rows = [r for r in (rr.cached(ctx, d.name) for d in sorted(args.out.iterdir()) if d.is_dir()) if r]
    for r in rows:
        if r["name"] in curve:
            finish(ctx, r, True)
    rows = [r for r in rows if "fid" in r]
    if rows:
        print(write_tables(args, rows))


if __name__ == "__main__":
    main()
