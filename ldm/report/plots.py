"""Figures: metric curves of several runs, sweep plots, evaluation results with their intervals and floors (FID and
alignment per point, against the guidance scale, FID against NFE per sampler) and likelihood histograms, as PNGs.

Uses matplotlib's object API (``matplotlib.figure.Figure``, rendered by the Agg canvas) and never pyplot, so
no global backend is chosen or changed and nothing needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

Curve = Sequence[tuple[int, float]]  # (step, value), sorted by step


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing); weight 0 is the identity."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _legend(ax, n: int) -> None:
    if n > 8:  # many runs: keep the plot area readable, list them beside it
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize="small")


def metric_curves(curves: dict[str, Curve], metric: str, path: Path, smooth: float = 0.0) -> Path:
    """One line per run (label -> curve) against step; with smoothing > 0 the EMA is drawn over the faint raw curve."""
    fig = _figure()
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(curves))]
    drawn = [(label, curve) for label, curve in curves.items() if curve]
    for (label, curve), color in zip(drawn, colors):
        steps = [s for s, _ in curve]
        values = [v for _, v in curve]
        if smooth > 0 and len(values) > 1:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax.plot(steps, ema(values, smooth), color=color, linewidth=1.8, label=label)
        else:
            ax.plot(steps, values, color=color, linewidth=1.5, marker="o" if len(values) < 20 else None,
                    markersize=3, label=label)
    finite = [v for _, curve in drawn for _, v in curve if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")  # losses that fall by orders of magnitude
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}" + (f" (EMA smoothing {smooth:g}, raw curve faint)" if smooth > 0 else ""))
    ax.grid(alpha=0.3)
    if drawn:
        _legend(ax, len(drawn))
    fig.savefig(path, format="png")
    return path


def sweep_plot(param: str, metric: str, points: Sequence[tuple[float | str, float, str]], path: Path) -> Path:
    """Final ``metric`` against the value of ``param``, one marker per run (x, y, run label).

    Numeric x values are drawn on a numeric axis joined in order of x; otherwise the values are categories.
    """
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    numeric = all(isinstance(x, (int, float)) for x, _, _ in points)
    ordered = sorted(points, key=lambda p: (p[0], p[2])) if numeric else list(points)
    if numeric:
        xs = [float(x) for x, _, _ in ordered]
        positive = min(xs) > 0 and max(xs) / min(xs) >= 100
        if positive:
            ax.set_xscale("log")  # e.g. learning rates over decades
    else:
        categories = list(dict.fromkeys(str(x) for x, _, _ in ordered))
        xs = [categories.index(str(x)) for x, _, _ in ordered]
        ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right", fontsize="small")
    ys = [y for _, y, _ in ordered]
    ax.plot(xs, ys, color="C0", marker="o", linewidth=1.2 if numeric else 0)
    for x, y, (_, _, label) in zip(xs, ys, ordered):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small", color="0.3")
    ax.margins(x=0.1, y=0.15)  # room for the run labels beside the markers
    ax.set_xlabel(param)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"final {metric} vs {param}")
    ax.grid(alpha=0.3)
    fig.savefig(path, format="png")
    return path


def _by(rows: Sequence[Mapping], *keys: str) -> dict[tuple, list[Mapping]]:
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _errorbar(ax, x: Sequence[float], rows: Sequence[Mapping], key: str, scale: float = 1.0, **style) -> None:
    """Points of rows[key] at x, with their 95 % interval (key_lo, key_hi) as error bars when the rows have it."""
    y = [r[key] * scale for r in rows]
    if all(f"{key}_lo" in r and math.isfinite(r[f"{key}_lo"]) for r in rows):
        err = [[(r[key] - r[f"{key}_lo"]) * scale for r in rows], [(r[f"{key}_hi"] - r[key]) * scale for r in rows]]
        ax.errorbar(x, y, yerr=err, capsize=3, **style)
    else:
        ax.plot(x, y, **style)


def _floor(ax, rows: Sequence[Mapping], key: str, label: str, scale: float = 1.0) -> None:
    """The real-vs-real floor of a metric (the same in every row) as a band over its interval."""
    row = next((r for r in rows if key in r), None)
    if row is None:
        return
    value = row[key] * scale
    ax.axhline(value, color="0.35", linestyle="--", linewidth=1, label=f"{label} ({value:.3g})")
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if lo is not None and math.isfinite(lo):
        ax.axhspan(lo * scale, hi * scale, color="0.5", alpha=0.15)


def _alignment_axes(ax, rows: Sequence[Mapping], title: str) -> None:
    for key, style, text in (("class_acc_real", "--", "real images (ceiling)"), ("class_chance", ":", "chance")):
        values = [r[key] for r in rows if key in r]
        if values:
            ax.axhline(100 * values[0], color="0.4", linestyle=style, linewidth=1,
                       label=f"{text} ({100 * values[0]:.1f} %)")
    ax.set_ylabel("alignment: classifier accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)


def guidance_tradeoff(rows: Sequence[Mapping], path: Path) -> Path:
    """The quality/diversity trade-off of classifier-free guidance (Ho & Salimans 2022, Fig. 4): FID against the
    guidance scale with the real floor and, when the rows have it, the alignment classifier's accuracy against the
    guidance scale with its ceiling (real images) and chance; one line per (sampler, steps), 95 % intervals as bars.

    rows: dicts with sampler, steps, guidance, fid[, fid_lo/hi, fid_floor..., class_acc, class_acc_real, class_chance].
    """
    aligned = any("class_acc" in r for r in rows)
    fig = _figure(11.0 if aligned else 7.0, 4.2)
    axes = fig.subplots(1, 2 if aligned else 1, squeeze=False)[0]
    groups = _by(rows, "sampler", "steps")
    for i, ((sampler, steps), pts) in enumerate(sorted(groups.items())):
        pts = sorted(pts, key=lambda r: r["guidance"])
        style = dict(marker="o", color=f"C{i % 10}", label=f"{sampler}, {steps} steps")
        _errorbar(axes[0], [r["guidance"] for r in pts], pts, "fid", **style)
        if aligned:
            pts = [r for r in pts if "class_acc" in r]
            _errorbar(axes[1], [r["guidance"] for r in pts], pts, "class_acc", 100.0, **style)
    _floor(axes[0], rows, "fid_floor", "real floor")
    axes[0].set_xlabel("guidance scale")
    axes[0].set_ylabel("FID (lower is better)")
    axes[0].set_title("FID vs guidance")
    if aligned:
        _alignment_axes(axes[1], rows, "text alignment vs guidance")
        axes[1].set_xlabel("guidance scale")
    for ax in axes:
        ax.grid(alpha=0.3)
        _legend(ax, len(groups) + 2)
    fig.savefig(path, format="png")
    return path


def eval_points(rows: Sequence[Mapping], path: Path, labels: Sequence[str] | None = None) -> Path:
    """One evaluation per row side by side: FID (and alignment) with 95 % intervals, the real floor as a band and
    the alignment ceiling and chance as lines. ``labels`` name the rows (default: sampler x steps, guidance)."""
    labels = list(labels) if labels is not None else [f"{r['sampler']} x{r['steps']}\ng{r['guidance']:g}" for r in rows]
    aligned = all("class_acc" in r for r in rows)
    fig = _figure(max(6.0, 1.2 * len(rows) + 3) * (2 if aligned else 1), 4.5)
    axes = fig.subplots(1, 2 if aligned else 1, squeeze=False)[0]
    x = list(range(len(rows)))
    _errorbar(axes[0], x, rows, "fid", marker="o", linestyle="none", color="C0", label="generated")
    _floor(axes[0], rows, "fid_floor", "real floor")
    axes[0].set_ylabel("FID (lower is better)")
    axes[0].set_title(f"FID of {int(rows[0].get('num_images', 0))} images, 95 % bootstrap intervals")
    if aligned:
        _errorbar(axes[1], x, rows, "class_acc", 100.0, marker="o", linestyle="none", color="C1", label="generated")
        _alignment_axes(axes[1], rows, "text alignment, 95 % intervals")
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(alpha=0.3)
        _legend(ax, 4)
    fig.savefig(path, format="png")
    return path


def nfe_curves(rows: Sequence[Mapping], path: Path, reference: tuple[str, float] | None = None) -> Path:
    """FID against the number of function evaluations, one line per sampler (and guidance scale when several);
    ``reference`` (label, FID) draws that FID dashed and 10% above it dotted.

    rows: dicts with sampler, nfe, guidance, fid[, fid_lo/hi: the interval bars].
    """
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    several = len({r["guidance"] for r in rows}) > 1
    groups = _by(rows, "sampler", "guidance")
    for i, ((sampler, guidance), pts) in enumerate(sorted(groups.items())):
        pts = sorted(pts, key=lambda r: r["nfe"])
        _errorbar(ax, [r["nfe"] for r in pts], pts, "fid", marker="o", color=f"C{i % 10}",
                  label=f"{sampler}, guidance {guidance:g}" if several else sampler)
    if reference is not None:
        label, value = reference
        ax.axhline(value, color="0.3", linestyle="--", linewidth=1, label=f"{label} ({value:.3g})")
        ax.axhline(1.1 * value, color="0.3", linestyle=":", linewidth=1, label="+10%")
    if max(r["nfe"] for r in rows) / max(min(r["nfe"] for r in rows), 1) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("function evaluations (NFE)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID vs NFE per sampler")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(groups) + (2 if reference else 0))
    fig.savefig(path, format="png")
    return path


def likelihood_histogram(rows: Sequence[Mapping], path: Path, title: str) -> Path:
    """Per-sample bits/dim, ODE and (when computed) ELBO, as one histogram."""
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    series = [("ODE log-likelihood", "ode_bpd")]
    if "elbo_bpd" in rows[0]:
        series.append(("ELBO (upper bound)", "elbo_bpd"))
    for label, key in series:
        values = [r[key] for r in rows]
        mean = sum(values) / len(values)
        ax.hist(values, bins=max(5, min(40, len(values) // 2)), alpha=0.6, label=f"{label}: mean {mean:.3f}")
        ax.axvline(mean, color=ax.patches[-1].get_facecolor(), linestyle="--", linewidth=1)
    ax.set_xlabel("bits per latent dimension (-log p / (D ln 2))")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, format="png")
    return path
