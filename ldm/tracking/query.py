"""A thin query API over MLflow for reviews: the runs of an experiment, their params, last metrics, one metric's
history, which steps have sample grids, the evaluation sweep points nested under them; and logging a finished
review back as a run of its own. The HTML and the figures are ``ldm.report``'s."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REVIEW_TAG = "ldm.review"
PARENT_TAG = "mlflow.parentRunId"
POINT_PARAMS = ("sampler", "steps", "guidance", "nfe")  # an evaluation sweep point (ldm.eval.sweep)
REPORT_NAME = "report.html"


class ReviewError(ValueError):
    """Bad input to a review (unknown experiment or run, nothing to review): one line for the user."""


@dataclass
class RunSummary:
    """What a review needs of one run."""

    run_id: str
    name: str
    status: str
    start_time: int | None  # ms since the epoch
    params: dict[str, str]
    metrics: dict[str, float]  # the last value of each metric
    history: list[tuple[int, float]] = field(default_factory=list)  # the chosen metric, (step, value) by step
    samples: dict[int, str] = field(default_factory=dict)  # step -> artifact path of the sample grid

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"


@dataclass
class Review:
    experiment: str
    experiment_id: str
    uri: str
    metric: str
    runs: list[RunSummary]
    sweeps: dict[str, list[RunSummary]] = field(default_factory=dict)  # run id -> its nested sweep points


@dataclass
class ReviewResult:
    report: Path
    files: list[Path]  # everything written under the output folder (report first)
    review_run_id: str | None = None


# --- reading MLflow -----------------------------------------------------------------------------------
def make_client(uri: str):
    """An MlflowClient for ``uri``; a sqlite file that does not exist is an error (not silently created)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per small PNG is noise
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise ReviewError(f"no MLflow database at {db} (tracking URI {uri})")
    return MlflowClient(tracking_uri=uri)


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _is_review(run) -> bool:
    return run.data.tags.get(REVIEW_TAG) == "true"


def find_runs(client, experiment_id: str, run_ids: Sequence[str] | None = None) -> list:
    """The given runs (each must exist in the experiment), or every active non-review run, oldest first."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        runs = []
        for rid in dict.fromkeys(run_ids):  # each once, in the order given
            try:
                run = client.get_run(rid)
            except MlflowException as e:
                raise ReviewError(f"unknown run id {rid}: {first_line(e)}") from None
            if run.info.experiment_id != experiment_id:
                raise ReviewError(f"run {rid} belongs to experiment id {run.info.experiment_id}, "
                                  f"not to the reviewed experiment (id {experiment_id})")
            runs.append(run)
        return runs
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], page_token=token)
        runs += [r for r in page if not _is_review(r)]
        token = page.token
        if not token:
            return runs


def find_children(client, experiment_id: str, parent_ids: Sequence[str]) -> list:
    """The runs nested under the given runs (tag mlflow.parentRunId), oldest first."""
    children = []
    for rid in parent_ids:
        children += client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{rid}'",
                                       order_by=["attributes.start_time ASC"], max_results=10_000)
    return children


_PLAIN = re.compile(r"(?P<key>.+)_step(?P<step>\d+)\.png$")                  # samples/samples_step0000002.png
_LOGGED = re.compile(r"(?P<key>[^/]+?)[+%]step[+%](?P<step>\d+)[+%].*\.png$")  # images/samples+step+2+timestamp+..


def sample_artifacts(client, run_id: str, key: str = "samples") -> dict[int, str]:
    """Step -> artifact path of the run's sample grids: ``samples/<key>_stepNNNNNNN.png`` (what Tracker.log_image
    writes), else the step-indexed images MLflow's ``log_image(key=, step=)`` keeps under ``images/``."""
    found: dict[int, str] = {}
    for f in client.list_artifacts(run_id, "samples"):
        m = _PLAIN.fullmatch(Path(f.path).name)
        if not f.is_dir and m and m["key"] == key:
            found[int(m["step"])] = f.path
    if found:
        return found
    for f in client.list_artifacts(run_id, "images"):
        name = Path(f.path).name
        m = _LOGGED.fullmatch(name)
        if not f.is_dir and m and m["key"] == key.replace("/", "~") and "compressed" not in name:
            found.setdefault(int(m["step"]), f.path)
    return found


def collect(client, experiment: str, uri: str, run_ids: Sequence[str] | None = None, metric: str = "train/loss",
            image_key: str = "samples") -> Review:
    """Everything the report shows, read from the tracking server (artifacts are listed, not downloaded)."""
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as e:
        raise ReviewError(f"cannot read experiment {experiment!r} at {uri}: {first_line(e)}") from None
    if exp is None:
        raise ReviewError(f"no experiment named {experiment!r} at {uri}")
    if exp.lifecycle_stage != "active":
        raise ReviewError(f"experiment {experiment!r} at {uri} is deleted")
    runs = find_runs(client, exp.experiment_id, run_ids)
    nested = [r for r in runs if PARENT_TAG in r.data.tags]
    runs = [r for r in runs if PARENT_TAG not in r.data.tags]
    if run_ids:
        nested = find_children(client, exp.experiment_id, [r.info.run_id for r in runs])
    if not runs:
        raise ReviewError(f"experiment {experiment!r} at {uri} has no runs to review")
    summaries = []
    for run in runs:
        rid = run.info.run_id
        # a resumed run may log a step twice: the later value wins
        by_step = {m.step: m.value for m in sorted(client.get_metric_history(rid, metric),
                                                    key=lambda m: (m.step, m.timestamp))}
        history = sorted(by_step.items())
        summaries.append(RunSummary(run_id=rid, name=run.info.run_name or rid[:8], status=run.info.status,
                                    start_time=run.info.start_time, params=dict(run.data.params),
                                    metrics=dict(run.data.metrics), history=history,
                                    samples=sample_artifacts(client, rid, image_key)))
    sweeps: dict[str, list[RunSummary]] = {}
    for run in nested:
        if all(k in run.data.params for k in POINT_PARAMS) and "fid" in run.data.metrics:
            sweeps.setdefault(run.data.tags[PARENT_TAG], []).append(RunSummary(
                run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8], status=run.info.status,
                start_time=run.info.start_time, params=dict(run.data.params), metrics=dict(run.data.metrics)))
    return Review(experiment=experiment, experiment_id=exp.experiment_id, uri=uri, metric=metric, runs=summaries,
                  sweeps=sweeps)


def download(client, run_id: str, artifact_path: str, dest: str | Path) -> Path:
    """One artifact of a run, downloaded into ``dest``."""
    return Path(client.download_artifacts(run_id, artifact_path, str(dest)))


def log_review(client, review: Review, result: ReviewResult) -> str:
    """Log the report and its figures as artifacts of a new run tagged ``ldm.review=true``; returns its id."""
    out = result.report.parent
    tags = {REVIEW_TAG: "true", "ldm.review.metric": review.metric,
            "ldm.review.runs": ",".join(r.run_id for r in review.runs)[:5000]}
    run = client.create_run(review.experiment_id, run_name="review", tags=tags)
    rid = run.info.run_id
    try:
        for f in result.files:
            parent = f.parent.relative_to(out).as_posix()
            client.log_artifact(rid, str(f), None if parent == "." else parent)
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    result.review_run_id = rid
    return rid
