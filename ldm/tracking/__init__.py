"""The one place that talks to MLflow: run tracking during training, model download, experiment review."""

from ldm.tracking.tracker import DEFAULT_STORE, Tracker, default_tracking_uri, download_artifacts, tracking_uri

__all__ = ["DEFAULT_STORE", "Tracker", "default_tracking_uri", "download_artifacts", "tracking_uri"]
