"""Stopping a running Ray Train job from its driver at once, when the run's caller asks
(:attr:`~inflora_ray.ray_train.launch.RunContext.stop_requested`): e.g. a sweep trial whose other seed failed
for good stops its remaining seeds' runs instead of letting them train to the end of a trial that has failed.

Ray Train (2.60, Train V2) aborts a job only through its controller actor, whose handle the driver's
``fit()`` keeps to itself. So the driver writes a stop file in the run's folder (:class:`StopRelay`), and a
worker-group callback in the controller (:class:`AbortWhenAsked`), which looks for it after each poll of the
workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, at most every :data:`CHECK_SECONDS`, or
:data:`CHECK_SECONDS_ON_STORE` on an object store), aborts the job
the way Ctrl-C on a driver does: the workers are stopped, the controller exits and the driver's ``fit()``
raises. The run then ends as stopped by its caller (``interrupted``, resumable), never as failed.

No torch here: the callback is unpickled in the controller, which does not import it.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import pyarrow.fs as pafs
from ray.train.v2._internal.execution.callback import WorkerGroupCallback

from .. import storage
from ..logs import log_event

log = logging.getLogger(__name__)

STOP_FILE = ".stop_requested"
# The controller looks for the stop file at most this often: in a local folder, and on an object store, where
# every look is a request billed and counted against the bucket's rate limit (64 runs of a sweep: 13 per s).
CHECK_SECONDS, CHECK_SECONDS_ON_STORE = 0.5, 5.0
POLL_SECONDS = 0.2  # the driver checks its caller's stop request this often


def stop_file(run_path: str) -> str:
    """Where a run's driver asks its controller to stop."""
    return storage.join(run_path, STOP_FILE)


class AbortWhenAsked(WorkerGroupCallback):
    """In the run's controller: abort the job once the driver has written the stop file."""

    def __init__(self, path: str):
        self.path = path
        self.every = CHECK_SECONDS_ON_STORE if storage.is_uri(path) else CHECK_SECONDS
        self._checked = 0.0
        self._aborting = False

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        now = time.monotonic()
        if self._aborting or now - self._checked < self.every:
            return
        self._checked = now
        try:  # one look, not storage.exists's retries: the controller's loop waits on this call
            fs, path = storage.filesystem(self.path)
            asked = fs.get_file_info(path).type != pafs.FileType.NotFound
        except OSError:  # the store is down: the next poll looks again
            return
        if asked:
            import ray

            self._aborting = True
            log_event(log, "run_abort_requested", level=logging.WARNING, stop_file=self.path)
            # The controller's own abort (what Ray Train runs on Ctrl-C), queued on this async actor.
            ray.get_runtime_context().current_actor.abort.remote()


class StopRelay:
    """On the driver, around ``fit()``: once ``requested()`` is true, write the stop file that
    :class:`AbortWhenAsked` (:attr:`callback`, to add to the job's callbacks) looks for. A stop file left by
    an earlier attempt is removed before the job starts, and the file is removed when the job has ended."""

    def __init__(self, run_path: str, requested: Callable[[], bool]):
        self.path = stop_file(run_path)
        self.requested = requested
        self.callback = AbortWhenAsked(self.path)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stop-relay", daemon=True)

    def __enter__(self) -> "StopRelay":
        storage.delete(self.path)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        try:
            storage.delete(self.path)
        except OSError as e:  # left behind, it is removed before the run's next attempt
            log_event(log, "stop_file_not_removed", level=logging.WARNING, path=self.path, error=str(e)[:300])

    def _watch(self) -> None:
        while not self._done.wait(POLL_SECONDS):
            if self.requested():
                try:
                    storage.write_bytes(self.path, b"stop")
                except OSError as e:  # the run then goes on to its end (or its own failure)
                    log_event(log, "stop_not_relayed", level=logging.ERROR, path=self.path, error=str(e)[:300])
                return
