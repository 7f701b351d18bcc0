"""Experiment review: compare the runs of an MLflow experiment in one self-contained HTML report.

``ldm.tracking.query.collect`` reads what the report shows (runs, params, last metrics, one metric's history, the
steps with sample grids, the evaluation sweep points nested under them); small pure functions here decide what to
show (``differing_params``, ``matching_steps``, ``sweep_params``); ``write_report`` draws the figures
(``ldm.report.plots``; for evaluation sweeps FID and alignment against the guidance scale, and FID against NFE per
sampler), downloads the sample grids and renders ``report.html`` with every image embedded as a data URI;
``ldm.tracking.query.log_review`` logs the same files back as a new run tagged ``ldm.review=true``;
``review_experiment`` does all three for ``ldm-review``.
"""

from __future__ import annotations

import base64
import html
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ldm.report.plots import guidance_tradeoff, metric_curves, nfe_curves, sweep_plot
from ldm.tracking import tracking_uri as resolve_tracking_uri
from ldm.tracking.query import (
    REPORT_NAME, Review, ReviewResult, RunSummary, collect, download, first_line, log_review, make_client,
)


# --- pure decisions -----------------------------------------------------------------------------------
def differing_params(params_by_run: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Parameter keys whose value is not the same in every run (a key missing from a run counts as a value)."""
    runs = list(params_by_run.values())
    keys = set().union(*(p.keys() for p in runs)) if runs else set()
    return sorted(k for k in keys if len({p.get(k) for p in runs}) > 1)


def matching_steps(steps_by_run: Mapping[str, Iterable[int]]) -> list[int]:
    """Steps that every run has (runs with no steps at all are left out); sorted."""
    sets = [set(s) for s in steps_by_run.values()]
    sets = [s for s in sets if s]
    return sorted(set.intersection(*sets)) if sets else []


def evenly_spaced(items: Sequence[int], k: int) -> list[int]:
    """At most k items, spread over the sequence, always including the first and the last."""
    if k <= 0 or not items:
        return []
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


SampleRow = tuple[str, dict[str, int | None]]  # (row title, run id -> step, None for "no samples")


def sample_rows(steps_by_run: Mapping[str, Iterable[int]], max_rows: int = 4) -> list[SampleRow]:
    """Rows of the side-by-side sample grids: (row title, run id -> step or None for "no samples").

    Steps every run (with samples) has are shown, at most ``max_rows`` of them spread from first to last; when
    there is none, one row holds each run's latest grid.
    """
    steps = {rid: sorted(set(s)) for rid, s in steps_by_run.items()}
    common = matching_steps(steps)
    if common:
        return [(f"step {s}", {rid: (s if st else None) for rid, st in steps.items()})
                for s in evenly_spaced(common, max_rows)]
    if not any(steps.values()):
        return []
    return [("latest of each run", {rid: (st[-1] if st else None) for rid, st in steps.items()})]


def as_number(value: str | None) -> float | None:
    """A finite float for a numeric param value, else None ("True", "[1, 2]", "nan" are not numbers)."""
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def sweep_params(params_by_run: Mapping[str, Mapping[str, str]], keys: Iterable[str]) -> list[str]:
    """Those of ``keys`` (the differing params) whose value is a number in every run and takes >= 2 values."""
    out = []
    for k in keys:
        values = [as_number(p.get(k)) for p in params_by_run.values()]
        if values and all(v is not None for v in values) and len(set(values)) > 1:
            out.append(k)
    return out


# --- the report ---------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _img(path: Path, alt: str, cls: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{html.escape(v)}"' for k, v in attrs.items())
    return f'<img src="{_data_uri(path)}" alt="{html.escape(alt)}" class="{cls}"{extra}>'


def _time(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt(value: float) -> str:
    return f"{value:.6g}"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#1d2329;padding:0 16px;line-height:1.45}
h1{font-size:1.5em;margin-bottom:4px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
.meta{color:#57606a;font-size:.9em}.note{color:#57606a;font-style:italic}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.85em}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
td{white-space:nowrap}td.long{white-space:normal;overflow-wrap:anywhere;min-width:12em;max-width:22em}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.run:nth-child(even){background:#fafbfc}code{font-size:.95em}
img.figure{max-width:100%;height:auto;border:1px solid #eaeef2}
img.grid{image-rendering:pixelated;max-width:100%;height:auto;border:1px solid #eaeef2}
figure{margin:0}figcaption{color:#57606a;font-size:.85em}
"""


def _td(value: str, cls: str = "", title: str = "") -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' title="{html.escape(title)}"' if title else "")
    return f"<td{attrs}>{html.escape(value)}</td>"


def _breakable(key: str) -> str:
    """An escaped key that may wrap after "/" or "." only (train/<wbr>samples_per_s), never inside a word."""
    return re.sub(r"([/.])", r"\1<wbr>", html.escape(key))


def _runs_table(review: Review, differing: list[str]) -> str:
    """One row per run: name, id, status, start, the differing params, the last value of every metric."""
    metric_keys = sorted(set().union(*(r.metrics.keys() for r in review.runs)),
                         key=lambda k: (k != review.metric, k))  # the reviewed metric first
    head = ["run", "run id", "status", "start time", *differing, *metric_keys]
    rows = []
    for r in review.runs:
        values = [r.params.get(k, "—") for k in differing]
        cells = [_td(r.name), _td(r.run_id[:8], title=r.run_id), _td(r.status), _td(_time(r.start_time)),
                 *(_td(v, "long" if len(v) > 24 else "") for v in values),
                 *(_td(_fmt(r.metrics[k]) if k in r.metrics else "—", "num") for k in metric_keys)]
        rows.append(f'<tr class="run" data-run="{html.escape(r.run_id)}">{"".join(cells)}</tr>')
    ths = "".join(f'<th scope="col">{_breakable(h)}</th>' for h in head)
    if len(review.runs) < 2:
        note = "<p class=note>Only one run: there are no parameters that differ between runs.</p>"
    elif not differing:
        note = "<p class=note>All runs have the same parameters.</p>"
    else:
        keys = ", ".join(f"<code>{html.escape(k)}</code>" for k in differing)
        note = f"<p>Parameters that differ between runs: {keys}. Metrics show their last logged value.</p>"
    return (f'<section id="runs-table"><h2>Runs</h2>{note}<div class="scroll"><table><thead><tr>{ths}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div></section>")


def _run_title(run: RunSummary, differing: list[str], most: int = 3) -> str:
    """The run's label with the settings that tell it apart (paths, URIs and its own name left out)."""
    shown = [f"{k}={v}" for k in differing if (v := run.params.get(k)) is not None
             and v != run.name and "/" not in v and len(v) <= 24][:most]
    return run.label + (f" [{', '.join(shown)}]" if shown else "")


def _grid_width(path: Path, target: int = 256) -> int:
    """Display width of a sample grid: small grids are enlarged by a whole factor (crisp pixels) so that their
    longer side approaches ``target`` pixels; large ones keep their size."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
    return width * max(1, min(8, target // max(width, height, 1)))


def _curves_section(review: Review, out: Path, differing: list[str], smooth: float, files: list[Path]) -> str:
    runs = review.runs
    curves = {_run_title(r, differing): r.history for r in runs}
    if not any(curves.values()):
        body = f"<p class=note>No run logged the metric <code>{html.escape(review.metric)}</code>.</p>"
    else:
        path = metric_curves(curves, review.metric, out / "metric_curves.png", smooth)
        files.append(path)
        alt = f"{review.metric} against step for {len(runs)} run(s)" + (f", EMA smoothing {smooth:g}" if smooth else "")
        body = _img(path, alt, "figure")
        missing = [r.label for r in runs if not r.history]
        if missing:
            body += f"<p class=note>No {html.escape(review.metric)} logged by: {html.escape(', '.join(missing))}.</p>"
    return f'<section id="loss-curves"><h2>{html.escape(review.metric)} curves</h2>{body}</section>'


def _grids_section(client, review: Review, out: Path, differing: list[str], max_rows: int, files: list[Path]) -> str:
    runs = review.runs
    rows = sample_rows({r.run_id: r.samples for r in runs}, max_rows)
    if not rows:
        return '<section id="sample-grids"><h2>Sample grids</h2><p class=note>No run logged sample grids.</p></section>'
    heads = "".join(f'<th scope="col">{html.escape(_run_title(r, differing))}</th>' for r in runs)
    trs = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, steps in rows:
            tds = []
            for r in runs:
                step = steps[r.run_id]
                if step is None:
                    tds.append("<td class=note>no samples</td>")
                    continue
                try:
                    local = download(client, r.run_id, r.samples[step], tmp)
                except Exception as e:  # noqa: BLE001 - one missing grid should not lose the whole report
                    tds.append(f"<td class=note>cannot fetch {html.escape(r.samples[step])}: "
                               f"{html.escape(first_line(e))}</td>")
                    continue
                dest = out / "grids" / f"{_safe(r.name)}_{r.run_id[:8]}_step{step:07d}.png"
                dest.parent.mkdir(exist_ok=True)
                shutil.copyfile(local, dest)
                files.append(dest)
                img = _img(dest, f"sample grid of run {r.label} at step {step}", "grid", data_run=r.run_id,
                           width=str(_grid_width(dest)))
                tds.append(f"<td><figure>{img}<figcaption>step {step}</figcaption></figure></td>")
            trs.append(f'<tr><th scope="row">{html.escape(title)}</th>{"".join(tds)}</tr>')
    note = ("<p class=note>The runs share no step with a sample grid: each run's latest is shown.</p>"
            if rows[0][0].startswith("latest") else "<p>Grids at the steps all runs share.</p>")
    return (f'<section id="sample-grids"><h2>Sample grids</h2>{note}<div class="scroll"><table><thead><tr><th></th>'
            f'{heads}</tr></thead><tbody>{"".join(trs)}</tbody></table></div></section>')


def _sweeps_section(review: Review, out: Path, keys: Sequence[str], metric: str, files: list[Path]) -> str:
    parts = []
    for k in keys:
        raw = [(r.params[k], r.metrics[metric], r.name) for r in review.runs if k in r.params and metric in r.metrics]
        if not any(k in r.params for r in review.runs):
            parts.append(f"<p class=note>No run has the parameter <code>{html.escape(k)}</code>.</p>")
            continue
        if len({x for x, _, _ in raw}) < 2:
            parts.append(f"<p class=note><code>{html.escape(k)}</code>: fewer than two different values among the "
                         f"runs that logged {html.escape(metric)}; nothing to plot.</p>")
            continue
        numbers = [as_number(x) for x, _, _ in raw]
        # numbers on a numeric axis; any non-numeric value makes all of them categories
        pts = raw if None in numbers else [(n, y, name) for n, (_, y, name) in zip(numbers, raw)]
        path = sweep_plot(k, metric, pts, out / f"sweep_{_safe(k)}.png")
        files.append(path)
        parts.append(_img(path, f"final {metric} against {k} over {len(pts)} runs", "figure"))
    if not keys:
        parts.append("<p class=note>No numeric parameter varies across the runs: no sweep to plot.</p>")
    return f'<section id="sweeps"><h2>Sweeps: final {html.escape(metric)}</h2>{"".join(parts)}</section>'


def sweep_rows(points: Sequence[RunSummary]) -> list[dict]:
    """Evaluation sweep points as plot rows: typed params (sampler, steps, nfe, guidance) and every metric."""
    rows = [{"sampler": p.params["sampler"], "steps": int(float(p.params["steps"])),
             "nfe": int(float(p.params["nfe"])), "guidance": float(p.params["guidance"]), **p.metrics} for p in points]
    return sorted(rows, key=lambda r: (r["sampler"], r["steps"], r["guidance"]))


_SWEEP_COLUMNS = ("sampler", "steps", "nfe", "guidance", "fid", "fid_floor", "kid", "class_acc", "class_acc_real",
                  "class_chance", "clip_score")


def _eval_sweeps_section(review: Review, out: Path, files: list[Path]) -> str:
    parts = []
    for run in review.runs:
        points = review.sweeps.get(run.run_id)
        if not points:
            continue
        rows = sweep_rows(points)
        cols = [c for c in _SWEEP_COLUMNS if any(c in r for r in rows)]
        head = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in cols)
        body = "".join("<tr>" + "".join(_td(_fmt(r[c]) if isinstance(r.get(c), float) else str(r.get(c, "—")),
                                               "" if c == "sampler" else "num") for c in cols) + "</tr>"
                       for r in rows)
        figures = []
        if len({r["guidance"] for r in rows}) > 1:
            path = guidance_tradeoff(rows, out / f"eval_sweep_{run.run_id[:8]}_guidance.png")
            files.append(path)
            figures.append(_img(path, f"FID and alignment against the guidance scale, sweep of {run.label}",
                                "figure"))
        if len({r["nfe"] for r in rows}) > 1:
            path = nfe_curves(rows, out / f"eval_sweep_{run.run_id[:8]}_nfe.png")
            files.append(path)
            figures.append(_img(path, f"FID against NFE per sampler, sweep of {run.label}", "figure"))
        parts.append(f"<h3>{html.escape(run.label)}: {len(rows)} point(s)</h3>{''.join(figures)}"
                     f'<div class="scroll"><table data-run="{html.escape(run.run_id)}"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table></div>")
    if not parts:
        parts.append("<p class=note>No evaluation sweep (ldm-eval --sweep) among these runs.</p>")
    return f'<section id="eval-sweeps"><h2>Evaluation sweeps</h2>{"".join(parts)}</section>'


def write_report(client, review: Review, out: str | Path, smooth: float = 0.0, sweep: Sequence[str] = (),
                 sweep_metric: str | None = None, max_sample_rows: int = 4) -> ReviewResult:
    """Draw the figures, fetch the sample grids and write ``<out>/report.html`` with the PNGs beside it.

    ``sweep`` names the parameters to plot the final ``sweep_metric`` (default: the reviewed metric) against;
    empty means every numeric parameter that varies across the runs.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    params = {r.run_id: r.params for r in review.runs}
    differing = differing_params(params)
    sweep_keys = list(sweep) or sweep_params(params, differing)
    sections = [_runs_table(review, differing),
                _curves_section(review, out, differing, smooth, files),
                _grids_section(client, review, out, differing, max_sample_rows, files),
                _sweeps_section(review, out, sweep_keys, sweep_metric or review.metric, files),
                _eval_sweeps_section(review, out, files)]
    title = f"Review of experiment {review.experiment}"
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
           f"<h1>{html.escape(title)}</h1>"
           f'<p class="meta">Tracking URI <code>{html.escape(review.uri)}</code> · experiment id '
           f"{html.escape(review.experiment_id)} · {len(review.runs)} run(s) · written "
           f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>"
           f"{''.join(sections)}</body></html>\n")
    report = out / REPORT_NAME
    report.write_text(doc, encoding="utf-8")
    return ReviewResult(report=report, files=[report, *files])


@dataclass
class ReviewDone:
    """What ``review_experiment`` did: the runs it read, the report it wrote, the review run it logged (or None)."""

    review: Review
    result: ReviewResult
    run_id: str | None
    uri: str


def review_experiment(experiment: str, out: str | Path, *, tracking_uri: str | None = None,
                      runs: Sequence[str] | None = None, metric: str = "train/loss", image_key: str = "samples",
                      smooth: float = 0.0, sweep: Sequence[str] = (), sweep_metric: str | None = None,
                      max_sample_rows: int = 4, log_to_mlflow: bool = True) -> ReviewDone:
    """Read the runs of an experiment (``runs``: these ids; default every run but review runs), write the report
    (``write_report``) and, with ``log_to_mlflow``, log it back as a review run. ``ReviewError`` for bad input."""
    uri = resolve_tracking_uri(tracking_uri)
    client = make_client(uri)
    review = collect(client, experiment, uri, runs, metric, image_key)
    result = write_report(client, review, out, smooth=smooth, sweep=sweep, sweep_metric=sweep_metric,
                          max_sample_rows=max_sample_rows)
    run_id = log_review(client, review, result) if log_to_mlflow else None
    return ReviewDone(review, result, run_id, uri)
