"""Fault injection for tests, kept out of the user-facing config.

The driver forwards the environment variable ``INFLORA_RAY_FAULT`` (if set) to the Ray Train workers, whose
hook makes the worker of rank ``rank`` fail before step ``step`` of epoch ``epoch`` of task ``task``, once
per run (``times=N``: on N attempts of the run, e.g. ``run.max_failures + 1`` to spend its restarts):

- ``mode=exit`` kills the process (a lost node); Ray Train restarts the workers;
- ``mode=raise`` raises an exception (a bug); Ray Train restarts the workers;
- ``mode=transient`` raises :class:`~inflora_ray.storage.TransientStorageError` (a store that stayed down
  longer than its retries); Ray Train restarts the workers, and once ``run.max_failures`` are spent the run
  has failed for a transient cause;
- ``mode=fatal`` raises :class:`~inflora_ray.ray_train.errors.NonRetryableError` (an error no restart can
  fix): the worker records it in the run's fatal marker and the run fails for good at once;
- ``mode=hold`` writes where it is (Ray node id, pid) to the marker and waits there (``seconds=S``, default
  ``HOLD_SECONDS``) so that a test can remove that worker's node, or stop the run, while the task is under way.

``seed=S`` and ``run=TEXT`` restrict the fault to the runs of that seed (``experiment.seed``) and whose name
contains TEXT (a sweep's trial ``<trial id>[-seed<k>]``, e.g. ``run=_00001`` for its second trial); the
driver hands the other runs no fault (:meth:`FaultPlan.for_run`). Several faults are separated by ``;``: a
run gets the first one whose filters it passes. A sweep's driver forwards the variable to its trials
(:class:`~inflora_ray.ray_tune.trial.TrialPlan`), whose processes Ray started without it.
Example: ``INFLORA_RAY_FAULT=task=1,epoch=1,step=1,rank=1,mode=exit``;
``INFLORA_RAY_FAULT=task=0,seed=12,run=_00001,mode=transient,times=3``;
``INFLORA_RAY_FAULT=task=0,step=1,seed=12,mode=fatal;task=0,step=1,seed=11,mode=hold,seconds=120``.
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
MODES = ("exit", "raise", "hold", "transient", "fatal")
FIELDS = ("task", "epoch", "step", "rank", "mode", "seed", "run", "times", "seconds")


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
    """Where the fault fires: (task, epoch, step) on worker ``rank``, on ``times`` attempts of a run; only in
    the runs of seed ``seed`` whose name contains ``run`` (when given)."""
    task: int
    epoch: int = 0
    step: int = 0
    rank: int = 0
    mode: Literal["exit", "raise", "hold", "transient", "fatal"] = "exit"
    seed: Optional[int] = None
    run: Optional[str] = None
    times: int = 1
    seconds: int = HOLD_SECONDS  # mode=hold: how long

    @classmethod
    def parse(cls, text: str) -> "FaultPlan":
        """``task=1,epoch=1,step=1,rank=1,mode=exit`` -> FaultPlan; a ``ValueError`` says what is wrong."""
        fields: dict = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if key not in FIELDS:
                raise ValueError(f"{ENV_VAR}: unknown field {key!r} ({', '.join(FIELDS)})")
            try:
                fields[key] = value if key in ("mode", "run") else int(value)
            except ValueError:
                raise ValueError(f"{ENV_VAR}: {key}={value!r} is not an integer") from None
        if "task" not in fields or fields.get("mode", "exit") not in MODES or fields.get("times", 1) < 1:
            raise ValueError(f"{ENV_VAR}={text!r}: expected task=T[,epoch=E,step=S,rank=R,"
                             f"mode={'|'.join(MODES)},seed=S,run=TEXT,times=N>=1]")
        return cls(**fields)

    @classmethod
    def for_run(cls, name: str, seed: int) -> Optional[str]:
        """The fault of ``INFLORA_RAY_FAULT`` (validated) for the workers of run ``name`` of seed ``seed``: the
        first of its ``;``-separated faults whose ``seed=`` / ``run=`` let this run in; None if none does."""
        for text in filter(None, (t.strip() for t in (cls.from_env() or "").split(";"))):
            plan = cls.parse(text)
            if (plan.seed is None or plan.seed == seed) and (plan.run is None or plan.run in name):
                return text
        return None

    @classmethod
    def from_env(cls) -> Optional[str]:
        """The raw value of ``INFLORA_RAY_FAULT`` (each of its ``;``-separated faults validated), for the driver
        to forward (to the workers, :meth:`for_run`; to a sweep's trials)."""
        text = os.environ.get(ENV_VAR)
        for one in filter(None, (t.strip() for t in (text or "").split(";"))):
            cls.parse(one)
        return text or None

    def fire_if_due(self, marker: str, task: int, epoch: int, step: int, rank: int) -> None:
        """Fail now if this is the planned point and the fault has fired fewer than ``times`` times in this run
        (counted in ``marker``, which also says where it last fired)."""
        if (task, epoch, step, rank) != (self.task, self.epoch, self.step, self.rank):
            return
        fired = _times_fired(marker)
        if fired >= self.times:
            return
        where = {"pid": os.getpid(), "node_id": _node_id()}
        storage.write_bytes(marker, json.dumps({**where, "fired": fired + 1}).encode())
        log_event(log, "fault_injected", level=logging.WARNING, task=task, epoch=epoch, step=step, rank=rank,
                  mode=self.mode, fired=fired + 1, times=self.times, **where)
        if self.mode == "hold":
            time.sleep(self.seconds)
            return
        if self.mode == "exit":
            os._exit(13)
        at = f"injected fault at task {task} epoch {epoch} step {step}"
        if self.mode == "transient":
            raise storage.TransientStorageError(f"{at}: the store kept failing (a transient error)")
        if self.mode == "fatal":
            from .errors import NonRetryableError

            raise NonRetryableError(f"{at}: an error no restart can fix")
        raise InjectedFault(at)


def _times_fired(marker: str) -> int:
    """How many times the fault has fired in the run whose marker is ``marker`` (a marker written before
    the count was kept counts as once)."""
    if not storage.exists(marker):
        return 0
    try:
        return int(json.loads(storage.read_bytes(marker)).get("fired", 1))
    except (ValueError, AttributeError):
        return 1
