"""What the driver prints: a line per finished task, a line per epoch while a long task runs (at most one
every :data:`EPOCH_LINE_SECONDS`, with its rate and the time left in the task), the workers' warnings and errors
(read from the run's log), and the final table. All of it is read from the run directory as the workers write
it, so it works with remote storage too."""
from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from typing import Callable, Optional

from .. import storage
from ..core.metrics import format_matrix
from ..logs import log_event
from ..results import RESULT, read_progress, read_task_result
from ..rundir import RunDir

log = logging.getLogger(__name__)

RENEW_SECONDS = 10.0  # how often the driver renews its hold on the run (rundir.HOLD_STALE_SECONDS: 120)
# A task that has trained this many seconds gets a line per epoch, never more than one in this many seconds
# (short tasks get none).
EPOCH_LINE_SECONDS = 10.0


def _duration(seconds: float) -> str:
    """``42s``, ``3m12s``, ``2h05m``."""
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def print_epoch_line(progress: dict, num_tasks: int, label: str = "") -> None:
    """One progress line for the task under way (what :func:`~inflora_ray.results.write_progress` wrote)."""
    done, epochs, seconds = progress["epochs_done"], progress["epochs"], progress["train_seconds"]
    rate = progress["train_images"] / max(seconds, 1e-9)
    left = seconds / max(done, 1) * (epochs - done)
    loss = f"  loss {progress['loss']:.4f}" if isinstance(progress.get("loss"), (int, float)) else ""
    print(f"{label}[task {progress['task'] + 1}/{num_tasks}] epoch {done}/{epochs}{loss}  {rate:.0f} img/s  "
          f"about {_duration(left)} left in the task", flush=True)


def print_task_line(rec: dict, num_tasks: int, label: str = "") -> None:
    """One progress line for a finished task (the content of its result file)."""
    r = rec[RESULT]
    task_mean = r.get("task_mean_accuracy", math.nan)
    task_mean_avg = r.get("average_incremental_accuracy_task_mean", math.nan)
    print(f"{label}[task {r['task'] + 1}/{num_tasks}] classes {r['classes'][0]}..{r['classes'][-1]}  "
          f"pooled acc {100 * r['pooled_accuracy']:.2f}% (avg inc {100 * r['average_incremental_accuracy']:.2f}%)  "
          f"task-mean acc {100 * task_mean:.2f}% (avg inc {100 * task_mean_avg:.2f}%)  "
          f"forgetting {100 * r['forgetting']:.2f}  loss {r['train_loss']:.4f}  {r['task_seconds']:.1f}s  "
          f"{r['images_per_second']:.0f} img/s  peak {r['peak_memory_mb']:.0f} MiB", flush=True)


def print_final_table(name: str, summ: dict, num_tasks: int, eval_split: str = "test") -> None:
    """The accuracy matrix and the final metrics of a run, measured on ``eval_split`` (``test``, or
    ``validation``: images held out of the training data)."""
    done = len(summ.get("accuracy_matrix", []))
    print(f"\n== {name}: {done}/{num_tasks} tasks{' (on held-out validation images)' * (eval_split != 'test')} ==")
    if not done:
        return
    print(f"accuracy matrix (%), row = after task i, column = {eval_split} set of task j:")
    print(format_matrix(summ["accuracy_matrix"]))
    # pooled: over the test images of all seen tasks together; task-mean: the mean of the per-task accuracies
    print(f"final accuracy A_T, pooled                 {100 * summ['final_accuracy']:.2f}%")
    print(f"final accuracy A_T, task-mean              {100 * summ['final_accuracy_task_mean']:.2f}%")
    print(f"average incremental accuracy, pooled       {100 * summ['average_incremental_accuracy']:.2f}%")
    print(f"average incremental accuracy, task-mean    "
          f"{100 * summ['average_incremental_accuracy_task_mean']:.2f}%")
    if done > 1:
        print(f"forgetting                                 {100 * summ['forgetting']:.2f}")
        print(f"backward transfer                          {100 * summ['backward_transfer']:.2f}")
    sys.stdout.flush()


_ALERT_LEVELS = ("warning", "error", "critical")


def is_alert(line: str) -> bool:
    """True for a log line (logfmt or JSON) of a warning or an error."""
    if line.startswith("{"):
        try:
            return json.loads(line).get("level") in _ALERT_LEVELS
        except ValueError:
            return False
    return any(f" level={level} " in line for level in _ALERT_LEVELS)


class LogAlerts:
    """The warnings and errors the run's workers logged since the last look, read from the run's log (a file
    read on from where the last look ended; on an object store, each process's object, at most every
    ``remote_seconds`` as the processes write them). What was in the log before this object is not shown."""

    def __init__(self, run: RunDir, remote_seconds: float = 30.0):
        self.run, self.remote_seconds = run, remote_seconds
        self._seen: dict[str, int] = {}  # a file: bytes read; an object: lines read
        self._next_remote = 0.0
        self._read(now=True)  # what is there already (a resumed run's earlier attempts) is not shown

    def new_lines(self, now: bool = False) -> list[str]:
        """The warning and error lines written since the last call (``now``: read an object store's logs even
        if the last read was less than ``remote_seconds`` ago)."""
        return [line for line in self._read(now) if is_alert(line)]

    def _read(self, now: bool = False) -> list[str]:
        if not self.run.logs_per_process:
            return self._read_file(self.run.log_location)
        if time.monotonic() < self._next_remote and not now:
            return []
        self._next_remote = time.monotonic() + self.remote_seconds
        lines = []
        folder = storage.join(self.run.path, "logs")
        for name in storage.list_names(folder):
            path = storage.join(folder, name)
            try:
                text = storage.read_bytes(path).decode("utf-8", "replace").splitlines()
            except OSError:  # being replaced
                continue
            lines += text[self._seen.get(path, 0):]
            self._seen[path] = len(text)
        return lines

    def _read_file(self, path: str) -> list[str]:
        try:
            with open(path, "rb") as f:
                f.seek(self._seen.get(path, 0))
                data = f.read()
        except OSError:  # not written yet
            return []
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written is read next time
        self._seen[path] = self._seen.get(path, 0) + len(complete)
        return complete.decode("utf-8", "replace").splitlines()


class ProgressWatcher(threading.Thread):
    """Polls the run directory; for each newly finished task prints its line and calls ``on_task(result)``
    (the content of its result file); while a task runs, prints its epochs (:data:`EPOCH_LINE_SECONDS`)."""

    def __init__(self, run: RunDir, num_tasks: int, on_task: Optional[Callable[[dict], None]] = None,
                 interval: float = 1.0, label: str = "", seen: Optional[set[int]] = None,
                 renew: Optional[Callable[[], None]] = None):
        super().__init__(daemon=True)
        self.renew, self._renewed = renew, time.monotonic()  # renew: keeps the driver's hold on the run
        self.run_dir, self.num_tasks, self.on_task, self.interval = run, num_tasks, on_task, interval
        self.label = label
        self.seen: set[int] = set(seen or ())
        self._halt = threading.Event()
        self._last_line = time.monotonic()
        self._epoch_shown: Optional[tuple[int, int]] = None
        self.alerts = LogAlerts(run)

    def poll(self) -> None:
        """Handle every task finished since the last poll, the workers' new warnings and errors, then the epoch
        of the task under way."""
        self._poll_tasks()
        self._show_alerts()
        progress = read_progress(self.run_dir)
        if progress is None or progress.get("task") in self.seen:
            return
        key = (progress["task"], progress["epochs_done"])
        long_task = progress.get("train_seconds", 0) >= EPOCH_LINE_SECONDS
        last_epoch = progress["epochs_done"] >= progress["epochs"]  # the task's own line follows at once
        if key != self._epoch_shown and long_task and not last_epoch and \
                time.monotonic() - self._last_line >= EPOCH_LINE_SECONDS:
            self._epoch_shown, self._last_line = key, time.monotonic()
            print_epoch_line(progress, self.num_tasks, self.label)

    def _poll_tasks(self) -> None:
        for t in self.run_dir.finished_tasks():
            if t in self.seen:
                continue
            try:
                rec = read_task_result(self.run_dir, t)
            except Exception:
                continue  # being written
            self.seen.add(t)
            self._last_line = time.monotonic()
            print_task_line(rec, self.num_tasks, self.label)
            if self.on_task is not None:
                try:
                    self.on_task(rec)
                except Exception as e:  # a callback must not stop the progress lines
                    log_event(log, "on_task_error", level=logging.WARNING, task=t, error=str(e)[:300])

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.poll()
            if self.renew is not None and time.monotonic() - self._renewed >= RENEW_SECONDS:
                self._renewed = time.monotonic()
                try:
                    self.renew()
                except OSError as e:  # the store is not answering: the next renewal tries again
                    log_event(log, "hold_not_renewed", level=logging.WARNING, error=str(e)[:300])

    def _show_alerts(self, now: bool = False) -> None:
        try:
            lines = self.alerts.new_lines(now)
        except OSError:  # the store is not answering: the next poll reads on from where this one stopped
            return
        for line in lines:
            print(f"{self.label}{line}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Stop polling, after a last poll that catches the final task and the last warnings."""
        self._halt.set()
        self.join(timeout=10)
        self._poll_tasks()
        self._show_alerts(now=True)
