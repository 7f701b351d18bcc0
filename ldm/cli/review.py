"""ldm-review: compare the runs of an MLflow experiment in one self-contained HTML report.

Examples:
  ldm-review --experiment emoji-ldm --out review/                      # every run in runs/mlflow.db
  ldm-review --experiment sweep --tracking-uri http://127.0.0.1:5000 --runs ID1 ID2 --smooth 0.6 --out review/
  ldm-review --experiment cfg --sweep-param sampling.guidance --sweep-metric eval/fid --out review/

The report (<out>/report.html, images embedded, the PNGs beside it) has: a table of the runs with the
parameters that differ between them and the last value of every metric; the chosen metric against step for
all runs on one plot; the runs' sample grids side by side at the steps they share (else each run's latest);
and the final --sweep-metric against each numeric parameter that varies (or each --sweep-param). Unless
--no-log-to-mlflow is given, the report and figures are also logged as a new run "review" in the experiment
(tag ldm.review=true), so they open in the MLflow UI; review runs are left out of later reviews.
"""

from __future__ import annotations

import argparse

from ldm.cli._common import run_main, usage_error


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ldm-review", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI: http(s)://host:port or sqlite:///path/mlflow.db "
                        "(default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN_ID",
                   help="run ids to compare (default: every run of the experiment except review runs)")
    p.add_argument("--metric", default="train/loss", help="metric drawn against step (default: train/loss)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="EMA smoothing weight in [0, 1) for the curves, raw curve drawn faint (default: 0, off)")
    p.add_argument("--sweep-param", action="append", default=[], metavar="PARAM",
                   help="parameter to plot the final --sweep-metric against (repeatable; default: every "
                        "numeric parameter that varies across the runs)")
    p.add_argument("--sweep-metric", default=None, help="metric of the sweep plots (default: --metric)")
    p.add_argument("--image-key", default="samples", help="key of the logged sample grids (default: samples)")
    p.add_argument("--max-sample-rows", type=int, default=4,
                   help="at most this many shared steps of sample grids, first to last (default: 4)")
    p.add_argument("--out", required=True, help="output folder for report.html and the PNGs")
    p.add_argument("--log-to-mlflow", action=argparse.BooleanOptionalAction, default=True,
                   help="log the report and figures back as a new 'review' run (default: on)")
    args = p.parse_args(argv)
    if not 0 <= args.smooth < 1:
        usage_error(f"--smooth must be in [0, 1), got {args.smooth}")
    if args.max_sample_rows < 1:
        usage_error("--max-sample-rows must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(review, parse(argv))


def review(args: argparse.Namespace) -> None:
    """Write (and log) the report the arguments ask for; a bad experiment or run is a usage error."""
    from ldm.report.review import review_experiment
    from ldm.tracking.query import ReviewError

    try:
        done = review_experiment(args.experiment, args.out, tracking_uri=args.tracking_uri, runs=args.runs,
                                 metric=args.metric, image_key=args.image_key, smooth=args.smooth,
                                 sweep=args.sweep_param, sweep_metric=args.sweep_metric,
                                 max_sample_rows=args.max_sample_rows, log_to_mlflow=args.log_to_mlflow)
    except ReviewError as e:
        usage_error(str(e))
    result = done.result
    print(f"report: {result.report} ({len(done.review.runs)} run(s), {len(result.files) - 1} image(s))")
    if done.run_id:
        print(f"logged as run {done.run_id} (tag ldm.review=true) in experiment {args.experiment!r} at {done.uri}")


if __name__ == "__main__":
    raise SystemExit(main())
