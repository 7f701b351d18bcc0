"""Sweeps of sampling settings: the grid guidance x sampler x steps, function evaluations per setting, and running
one evaluation per point (each a nested MLflow run with params guidance/sampler/steps/nfe and its metrics).

The guidance scale trades sample quality for diversity (Ho & Salimans 2022, Fig. 4: FID against the CFG scale);
NFE against FID per sampler compares solvers at equal cost (Lu et al. 2022, Karras et al. 2022).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm import tqdm

from ldm.diffusion import DiscreteVP, Predictor, make_betas
from ldm.sampling import SAMPLERS, sample

AXES = ("guidance", "sampler", "steps")


@dataclass(frozen=True)
class SweepPoint:
    sampler: str
    steps: int
    guidance: float

    @property
    def nfe(self) -> int:
        return nfe(self.sampler, self.steps)

    @property
    def name(self) -> str:
        return f"{self.sampler}-{self.steps}-g{self.guidance:g}"

    def params(self) -> dict:
        return {**asdict(self), "nfe": self.nfe}


@functools.lru_cache(maxsize=256)
def nfe(sampler: str, steps: int) -> int:
    """Denoiser calls a sampler makes over ``steps`` intervals, counted by running it on a one-number problem.

    A guided call (both CFG halves in one batch) is one evaluation. Counted on the discrete DDPM chain; the
    samplers' call counts do not depend on the process (e.g. ddim: steps, heun_ode: 2 steps - 1, pc: 2 steps).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    calls = 0

    def count(x, t, cond):
        nonlocal calls
        calls += 1
        return torch.zeros_like(x)

    model = Predictor(count, DiscreteVP(make_betas("linear", 1000)), "eps")
    sample(model, (1, 1), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    return calls


def _values(key: str, raw: str) -> list:
    items = [v.strip() for v in raw.split(",")]
    if not raw.strip() or any(not v for v in items):
        raise ValueError(f"sweep {key}: empty value in {raw!r}")
    out = []
    for v in items:
        if key == "sampler":
            if v not in SAMPLERS:
                raise ValueError(f"sweep sampler: unknown sampler {v!r}; choose from {sorted(SAMPLERS)}")
            out.append(v)
        elif key == "steps":
            if not v.isdigit() or int(v) < 1:
                raise ValueError(f"sweep steps: {v!r} is not a positive integer")
            out.append(int(v))
        else:
            try:
                g = float(v)
            except ValueError:
                raise ValueError(f"sweep guidance: {v!r} is not a number") from None
            if not math.isfinite(g) or g < 0:
                raise ValueError(f"sweep guidance: {v!r} must be a finite number >= 0")
            out.append(g)
    if len(set(out)) != len(out):
        raise ValueError(f"sweep {key}: repeated value in {raw!r}")
    return out


def parse_sweep(specs: Sequence[str], sampler: str, steps: int, guidance: float) -> list[SweepPoint]:
    """Grid points from ``key=v1,v2,...`` specs (keys guidance, sampler, steps); axes not given keep one value.

    Points are ordered sampler, then steps, then guidance.
    """
    axes: dict[str, list] = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"sweep {spec!r}: expected key=v1,v2,... with key one of {', '.join(AXES)}")
        key, raw = (s.strip() for s in spec.split("=", 1))
        if key not in AXES:
            raise ValueError(f"sweep {spec!r}: unknown key {key!r}; choose from {', '.join(AXES)}")
        if key in axes:
            raise ValueError(f"sweep {key}: given twice")
        axes[key] = _values(key, raw)
    samplers = axes.get("sampler", [sampler])
    for s in samplers:
        if s not in SAMPLERS:
            raise ValueError(f"unknown sampler {s!r}; choose from {sorted(SAMPLERS)}")
    return [SweepPoint(s, n, g) for s, n, g in itertools.product(samplers, axes.get("steps", [steps]),
                                                                  axes.get("guidance", [guidance]))]


def run_sweep(evaluator, pipe, points: Sequence[SweepPoint], tracker=None, out: str | Path | None = None,
              negative_prompt: str = "", options: Mapping[str, Any] | None = None) -> list[dict]:
    """Evaluate every point; each becomes a row {sampler, steps, guidance, nfe, metrics...}.

    With a tracker every point is logged as a finished nested run of the tracker's run; with ``out`` each point's
    generated images are saved as ``grid_<point>.png``. ``options`` go to every point's sampling (e.g.
    guidance_rescale, guidance_interval, time_shift).
    """
    from ldm.pipeline import make_grid

    rows = []
    for point in points:
        result = evaluator.evaluate(pipe, sampler=point.sampler, steps=point.steps, guidance=point.guidance,
                                    negative_prompt=negative_prompt, **(options or {}))
        tqdm.write(f"{point.name}: {result.summary()}")
        row = {**point.params(), **result.metrics}
        rows.append(row)
        if tracker is not None:
            tracker.log_child(point.name, point.params(), result.metrics)
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            make_grid(result.images[:64], nrow=8).save(Path(out) / f"grid_{point.name}.png")
    return rows


COLUMNS = ("sampler", "steps", "nfe", "guidance", "fid", "fid_floor", "kid", "kid_floor", "class_acc",
           "class_acc_real", "class_chance", "clip_score")


def cell(row: dict, column: str) -> str:
    """A value with its 95 % interval when the row has one (e.g. fid 45.1 [43.8, 46.4]); KID in units of 1e-3."""
    value = row.get(column, "")
    if not isinstance(value, float):
        return str(value)
    scale = 1e3 if column.startswith("kid") else 100.0 if column.startswith("class") else 1.0
    text = f"{value * scale:.4g}"
    lo, hi = row.get(f"{column}_lo"), row.get(f"{column}_hi")
    if lo is not None and hi is not None and math.isfinite(lo):
        text += f" [{lo * scale:.4g}, {hi * scale:.4g}]"
    return text


def _header(column: str) -> str:
    return {"kid": "kid x1e3", "kid_floor": "kid_floor x1e3", "class_acc": "class_acc %",
            "class_acc_real": "ceiling %", "class_chance": "chance %"}.get(column, column)


def format_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """A plain-text table of the rows with intervals (columns no row has are left out)."""
    cols = [c for c in columns if any(c in r for r in rows)]
    cells = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(_header(c)), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(_header(c).rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """The same table in Markdown."""
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(_header(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
