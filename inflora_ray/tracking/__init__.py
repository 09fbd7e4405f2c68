"""MLflow tracking, written by the driver only: runs, parent runs (seeds, sweeps), per-task metrics, artifacts."""
from .mlflow_runs import Tracker, TrackingUnavailable, check_server, git_commit, resolve_uri, start_parent

__all__ = ["Tracker", "TrackingUnavailable", "check_server", "git_commit", "resolve_uri", "start_parent"]
