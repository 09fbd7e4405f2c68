"""Fault injection for tests, kept out of the user-facing config.

The driver forwards the environment variable ``INFLORA_RAY_FAULT`` (if set) to the Ray Train workers, whose
hook makes the worker of rank ``rank`` fail once per run, before step ``step`` of epoch ``epoch`` of task
``task``: ``mode=exit`` kills the process (a lost node), ``mode=raise`` raises an exception (a bug),
``mode=hold`` writes where it is (Ray node id, pid) to the marker and waits there (up to ``HOLD_SECONDS``)
so that a test can remove that worker's node while the task is under way.
Example: ``INFLORA_RAY_FAULT=task=1,epoch=1,step=1,rank=1,mode=exit``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

from .. import storage
from ..logs import log_event

log = logging.getLogger(__name__)

ENV_VAR = "INFLORA_RAY_FAULT"
# A sweep trial's own process exits after every seed of the trial finished task T, once per sweep: ``task=T``.
TRIAL_ENV_VAR = "INFLORA_RAY_TRIAL_FAULT"
HOLD_SECONDS = 300
MODES = ("exit", "raise", "hold")


def trial_fault_from_env() -> Optional[int]:
    """The task after which a sweep trial's process exits once (``INFLORA_RAY_TRIAL_FAULT=task=T``), read
    on the sweep's driver and forwarded to the trials; None when unset."""
    text = os.environ.get(TRIAL_ENV_VAR)
    if not text:
        return None
    key, _, value = text.strip().partition("=")
    if key != "task" or not value.isdigit():
        raise ValueError(f"{TRIAL_ENV_VAR}={text!r}: expected task=T")
    return int(value)


def exit_trial_once(marker: str, task: int) -> None:
    """Exit this process (a lost trial driver) unless ``marker`` says it already happened."""
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"1")
    log_event(log, "trial_fault_injected", level=logging.WARNING, task=task)
    os._exit(13)


def _node_id() -> Optional[str]:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # only a label for the marker; never let it mask the fault itself
        return None


class InjectedFault(RuntimeError):
    """Raised by an injected fault in ``mode=raise``."""


@dataclass(frozen=True)
class FaultPlan:
    """Where the fault fires: (task, epoch, step) on worker ``rank``."""
    task: int
    epoch: int = 0
    step: int = 0
    rank: int = 0
    mode: Literal["exit", "raise", "hold"] = "exit"

    @classmethod
    def parse(cls, text: str) -> "FaultPlan":
        """``task=1,epoch=1,step=1,rank=1,mode=exit`` -> FaultPlan; a ``ValueError`` says what is wrong."""
        fields: dict = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if key not in ("task", "epoch", "step", "rank", "mode"):
                raise ValueError(f"{ENV_VAR}: unknown field {key!r} (task, epoch, step, rank, mode)")
            fields[key] = value if key == "mode" else int(value)
        if "task" not in fields or fields.get("mode", "exit") not in MODES:
            raise ValueError(f"{ENV_VAR}={text!r}: expected task=T[,epoch=E,step=S,rank=R,mode=exit|raise|hold]")
        return cls(**fields)

    @classmethod
    def from_env(cls) -> Optional[str]:
        """The raw value of ``INFLORA_RAY_FAULT`` (validated), for the driver to forward to the workers."""
        text = os.environ.get(ENV_VAR)
        if text:
            cls.parse(text)
        return text or None

    def fire_if_due(self, marker: str, task: int, epoch: int, step: int, rank: int) -> None:
        """Fail now if this is the planned point and the fault has not fired in this run yet."""
        if (task, epoch, step, rank) != (self.task, self.epoch, self.step, self.rank) or storage.exists(marker):
            return
        where = {"pid": os.getpid(), "node_id": _node_id()}
        storage.write_bytes(marker, json.dumps(where).encode())
        log_event(log, "fault_injected", level=logging.WARNING, task=task, epoch=epoch, step=step, rank=rank,
                  mode=self.mode, **where)
        if self.mode == "hold":
            time.sleep(HOLD_SECONDS)
            return
        if self.mode == "exit":
            os._exit(13)
        raise InjectedFault(f"injected fault at task {task} epoch {epoch} step {step}")
