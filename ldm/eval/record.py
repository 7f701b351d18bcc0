"""An evaluation of a trained model as ``ldm-eval`` records it: every point of a sweep evaluated with the protocol
and logged to MLflow (one run; a nested run per point when there are several), and, given a folder, metrics.json,
eval.md (the table) and the plots (points with intervals and floors; the guidance and NFE trade-offs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from ldm.eval.sweep import SweepPoint, markdown_table, run_sweep
from ldm.report.plots import eval_points, guidance_tradeoff, nfe_curves


def evaluate_and_record(evaluator, pipe, points: Sequence[SweepPoint], tracker, settings: Mapping[str, Any],
                        options: Mapping[str, Any], out: str | Path | None = None) -> tuple[list[dict], list[Path]]:
    """(rows, files written): the points evaluated with sampling ``options``, logged under ``tracker``'s run with
    ``settings`` as its params (a single point's own params and metrics on the run itself); the outputs in ``out``."""
    sweep = len(points) > 1
    tracker.start(dict(settings) if sweep else {**settings, **points[0].params()}, tags={"ldm.eval": "true"})
    status = "FAILED"
    try:
        rows = run_sweep(evaluator, pipe, points, tracker if sweep else None, out, options=options)
        if not sweep:
            tracker.log_metrics({k: v for k, v in rows[0].items() if k not in points[0].params()}, 0)
        written = write_outputs(Path(out), rows, settings, tracker) if out else []
        status = "FINISHED"
    finally:
        tracker.end(status)
    return rows, written


def write_outputs(out: Path, rows: list[dict], settings: Mapping[str, Any], tracker) -> list[Path]:
    """metrics.json, eval.md and the plots: the points with intervals and floors; guidance and NFE trade-offs. Each
    is logged to the tracker's run."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"settings": dict(settings), "points": rows}, indent=2))
    (out / "eval.md").write_text(f"# ldm-eval {settings['model']}\n\n{markdown_table(rows)}\n")
    written = [out / "metrics.json", out / "eval.md", eval_points(rows, out / "eval.png")]
    if len({r["guidance"] for r in rows}) > 1:
        written.append(guidance_tradeoff(rows, out / "guidance_tradeoff.png"))
    if len({r["nfe"] for r in rows}) > 1:
        written.append(nfe_curves(rows, out / "fid_vs_nfe.png"))
    for path in written:
        tracker.log_artifact(path, "eval")
    return written
