"""MLflow run tracking: params, metrics, images and artifacts of a run (rank 0 only).

Default store: a sqlite database ``runs/mlflow.db`` with artifacts in ``runs/mlartifacts`` (no server needed);
any tracking URI works (``http://host:5000`` for a shared ``mlflow server``). A tracking failure never stops
training: it is logged once as a warning and the metrics are kept and retried with the next call.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ldm.config import flatten

log = logging.getLogger(__name__)
DEFAULT_STORE = "runs"
RETRY_SECONDS = 30.0
SYSTEM_METRICS_SECONDS = 10.0
_PINNED = re.compile(r"^(runs:/[0-9a-f]{32}/|models:/[^/@]+/[0-9]+/?$)")  # URIs whose content cannot change


def default_tracking_uri(root: str | Path = DEFAULT_STORE) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def tracking_uri(explicit: str | None = None, configured: str | None = None) -> str:
    """The tracking URI every command uses: the one given explicitly (a --tracking-uri flag, or a run's
    tracking.uri), else $MLFLOW_TRACKING_URI, else ``configured`` (e.g. the tracking.uri a model was trained with),
    else the local sqlite store runs/mlflow.db."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or configured or default_tracking_uri()


def download_artifacts(artifact_uri: str, uri: str | None = None) -> Path:
    """Fetch ``runs:/<id>/<path>`` or ``models:/<name>/<version>`` into ``$LDM_CACHE/mlflow``; returns the folder.

    One folder per tracking server and URI, written atomically: a pinned URI (a run id, a version number) is
    downloaded once and then read from the cache; one that can move (``models:/<name>/latest``, an alias) is
    fetched again each time, replacing its previous copy. (MLflow's own default is a new temporary folder per
    call, never removed: a model's size of /tmp lost on every sample.)
    """
    import mlflow

    from ldm.io import cache_dir, write_folder_atomically  # torch, which the tracker does not need otherwise

    uri = tracking_uri(uri)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", artifact_uri).strip("-")[:80]
    digest = hashlib.sha256(f"{uri}\n{artifact_uri}".encode()).hexdigest()[:12]
    folder = cache_dir("mlflow") / f"{name}-{digest}"
    if _PINNED.match(artifact_uri) and (folder / "artifacts").is_dir():
        return folder / "artifacts"

    def fill(tmp: Path) -> None:
        with _mlflow_uris(uri):  # models:/ is resolved through MLflow's global registry URI
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(tmp / "download")))
        got.rename(tmp / "artifacts")

    write_folder_atomically(folder, fill)
    return folder / "artifacts"


@contextmanager
def _mlflow_uris(uri: str):
    """MLflow's global tracking and registry URIs (and the environment variables it sets with them) at ``uri`` for
    the block, then as they were: a caller in the same process keeps its own stores."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = tracking._tracking_uri, registry._registry_uri, {k: os.environ.get(k) for k in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry._registry_uri = saved[1]
        for k, v in saved[2].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Tracker:
    """An MLflow run; every method is a no-op when ``enabled`` is false (non-zero ranks, tracking off)."""

    def __init__(self, uri: str | None, experiment: str, run_name: str, enabled: bool = True):
        self.enabled = enabled
        self.uri = tracking_uri(uri)
        self.experiment, self.run_name = experiment, run_name
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._pending: list[tuple[dict[str, float], int]] = []
        self._failing = False
        self._retry_at = 0.0  # while failing, calls wait until then (a dead server must not stall training)
        self._client = None

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self, params: dict[str, Any] | None = None, run_id: str | None = None, tags: dict | None = None) -> str | None:
        """Start (or resume, given run_id) the run and log flattened params."""
        if not self.enabled:
            return None
        # fail fast when a server is unreachable: the tracker queues and retries on its own
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            exp_id = self._client.create_experiment(self.experiment, artifact_location=self._artifact_location())
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        logged: dict[str, str] = {}
        if run_id is None:
            run_id = self._client.create_run(exp_id, run_name=self.run_name, tags=tags or {}).info.run_id
        else:
            self._client.update_run(run_id, status="RUNNING")
            logged = self._client.get_run(run_id).data.params
        self.run_id = run_id
        if params:
            self.log_params(params, logged)
        self._start_system_metrics()
        return run_id

    def _start_system_metrics(self) -> None:
        """CPU/GPU/memory/network as `system/*` metrics every SYSTEM_METRICS_SECONDS, from a background thread."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_SECONDS,
                                                tracking_uri=self.uri, resume_logging=True)
            self._system.start()
        except Exception as e:  # noqa: BLE001 - optional (needs psutil); never stops training
            log.warning("system metrics are off: %s", e)
            self._system = None

    def _artifact_location(self) -> str | None:
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        return None

    def end(self, status: str = "FINISHED") -> None:
        if getattr(self, "_system", None) is not None:
            self._system.finish()
            self._system = None
        if self.enabled and self.run_id:
            self._flush()
            self._call(self._client.set_terminated, self.run_id, status)

    # --- logging -------------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any], logged: dict[str, str] | None = None) -> None:
        """Log flattened params; ``logged``: those the run already has (a resumed run). MLflow refuses to change a
        param, so a value that differs from the logged one (e.g. a resume with a larger train.max_steps) is recorded
        as the tag ``changed.<key>`` ("old -> new") instead."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        logged = logged or {}
        for key in sorted(k for k in flat if k in logged and logged[k] != flat[k]):
            self.set_tag(f"changed.{key}", f"{logged[key]} -> {flat[key]}"[:5000])
        items = [Param(k, v) for k, v in flat.items() if k not in logged]
        for i in range(0, len(items), 100):
            self._call(self._client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self._pending.append(({k: float(v) for k, v in metrics.items()}, int(step)))
        self._flush()

    def _flush(self) -> None:
        from mlflow.entities import Metric

        while self._pending:
            metrics, step = self._pending[0]
            now = int(time.time() * 1000)
            ok = self._call(self._client.log_batch, self.run_id,
                            metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
            if not ok:
                return
            self._pending.pop(0)

    def log_image(self, image, key: str, step: int) -> None:
        """A PIL image as a step-indexed MLflow image (shown in the run's Images tab) and a plain artifact."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{key}_step{step:07d}.png"
            image.save(path)
            self._call(self._client.log_artifact, self.run_id, str(path), "samples")
        self._call(self._client.log_image, self.run_id, image, key=key, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        fn = self._client.log_artifacts if Path(path).is_dir() else self._client.log_artifact
        self._call(fn, self.run_id, str(path), artifact_path)

    def register_model(self, name: str, artifact_path: str) -> str | None:
        """Register the run's artifact folder as a new version of model ``name``; returns the version."""
        if not self.enabled:
            return None
        from mlflow.exceptions import MlflowException

        try:
            try:
                self._client.create_registered_model(name)
            except MlflowException:
                pass  # already registered
            source = f"runs:/{self.run_id}/{artifact_path}"
            version = self._client.create_model_version(name, source, run_id=self.run_id)
            return str(version.version)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("could not register model %s: %s", name, e)
            return None

    def log_child(self, run_name: str, params: dict[str, Any], metrics: dict[str, float]) -> str | None:
        """A finished run nested under this one (tag mlflow.parentRunId), e.g. one point of a sweep; returns its id."""
        if not self.enabled or self.run_id is None:
            return None
        from mlflow.entities import Metric, Param

        try:
            child = self._client.create_run(self.experiment_id, run_name=run_name,
                                            tags={"mlflow.parentRunId": self.run_id}).info.run_id
        except Exception as e:  # noqa: BLE001 - tracking must never stop the work it records
            log.warning("could not create nested run %s: %s", run_name, str(e).splitlines()[0][:300])
            return None
        now = int(time.time() * 1000)
        self._call(self._client.log_batch, child, params=[Param(k, str(v)) for k, v in flatten(params).items()],
                   metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        self._call(self._client.set_terminated, child, "FINISHED")
        return child

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._call(self._client.set_tag, self.run_id, key, value)

    def _call(self, fn, *args, **kwargs) -> bool:
        """Call an MLflow client method; on failure warn once, keep going, report False.

        After a failure further calls are not attempted for RETRY_SECONDS (metrics stay queued), so a tracking
        server that went away costs training one timeout per interval, not one per logging call.
        """
        if self._failing and time.monotonic() < self._retry_at:
            return False
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            if not self._failing:
                log.warning("MLflow call %s failed (%s); training continues, metrics are kept and retried",
                            getattr(fn, "__name__", fn), str(e).splitlines()[0][:300])
            self._failing = True
            self._retry_at = time.monotonic() + RETRY_SECONDS
            return False
        if self._failing:
            log.warning("MLflow tracking is back")
        self._failing = False
        return True

    def ui_hint(self) -> str:
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri} --port 5000   (then open http://127.0.0.1:5000)"
        return f"open {self.uri} in a browser"
