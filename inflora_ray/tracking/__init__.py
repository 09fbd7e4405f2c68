"""MLflow tracking, written by the driver only: runs, parent runs (seeds, sweeps), per-task metrics, artifacts.
No credential of the tracking URI is ever stored, logged or printed (:mod:`.redact`)."""
from .mlflow_runs import (STATUSES, Tracker, TrackingUnavailable, check_server, git_commit, redact_config,
                          resolve_uri, start_parent)
from ..redact import is_redacted, redact_text, redact_uri

__all__ = ["STATUSES", "Tracker", "TrackingUnavailable", "check_server", "git_commit", "is_redacted",
           "redact_config", "redact_text", "redact_uri", "resolve_uri", "start_parent"]
