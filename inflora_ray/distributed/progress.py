"""What the driver prints: a line per finished task (read from the run directory as rank 0 writes it, so it
works with remote storage too) and the final table."""
from __future__ import annotations

import logging
import sys
import threading
from typing import Callable, Optional

from .. import storage
from ..core.metrics import format_matrix
from ..logs import log_event
from ..rundir import RunDir

log = logging.getLogger(__name__)


def print_task_line(rec: dict, num_tasks: int, label: str = "") -> None:
    """One progress line for a finished task's record."""
    r = rec["report"]
    print(f"{label}[task {r['task'] + 1}/{num_tasks}] classes {r['classes'][0]}..{r['classes'][-1]}  "
          f"pooled acc {100 * r['pooled_accuracy']:.2f}%  avg inc acc {100 * r['average_incremental_accuracy']:.2f}%  "
          f"forgetting {100 * r['forgetting']:.2f}  loss {r['train_loss']:.4f}  {r['task_seconds']:.1f}s  "
          f"{r['images_per_second']:.0f} img/s  peak {r['peak_memory_mb']:.0f} MiB", flush=True)


def print_final_table(name: str, summ: dict, num_tasks: int) -> None:
    """The accuracy matrix and the final metrics of a run."""
    done = len(summ.get("accuracy_matrix", []))
    print(f"\n== {name}: {done}/{num_tasks} tasks ==")
    if not done:
        return
    print("accuracy matrix (%), row = after task i, column = test set of task j:")
    print(format_matrix(summ["accuracy_matrix"]))
    print(f"final accuracy A_T            {100 * summ['final_accuracy']:.2f}%")
    print(f"average incremental accuracy  {100 * summ['average_incremental_accuracy']:.2f}%")
    if done > 1:
        print(f"forgetting                    {100 * summ['forgetting']:.2f}")
        print(f"backward transfer             {100 * summ['backward_transfer']:.2f}")
    sys.stdout.flush()


class ProgressWatcher(threading.Thread):
    """Polls the run directory; for each newly finished task prints its line and calls ``on_task(record)``."""

    def __init__(self, run: RunDir, num_tasks: int, on_task: Optional[Callable[[dict], None]] = None,
                 interval: float = 1.0, label: str = "", seen: Optional[set[int]] = None):
        super().__init__(daemon=True)
        self.run_dir, self.num_tasks, self.on_task, self.interval = run, num_tasks, on_task, interval
        self.label = label
        self.seen: set[int] = set(seen or ())
        self._halt = threading.Event()

    def poll(self) -> None:
        """Handle every task finished since the last poll."""
        for t in self.run_dir.finished_tasks():
            if t in self.seen:
                continue
            try:
                rec = storage.read_json(self.run_dir.task_result(t))
            except Exception:
                continue  # being written
            self.seen.add(t)
            print_task_line(rec, self.num_tasks, self.label)
            if self.on_task is not None:
                try:
                    self.on_task(rec)
                except Exception as e:  # a callback must not stop the progress lines
                    log_event(log, "on_task_error", level=logging.WARNING, task=t, error=str(e)[:300])

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        """Stop polling, after a last poll that catches the final task."""
        self._halt.set()
        self.join(timeout=10)
        self.poll()
