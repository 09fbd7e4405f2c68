"""Run integrity against hostile inputs: checkpoints that are cut short, altered, unsafe to unpickle or made
for another architecture; shipped weights that were altered; errors that a restart cannot fix, which must
end a run at once whatever run.max_failures says."""
from __future__ import annotations

import ast
import hashlib
import json
import pathlib
import re
import shutil
import time

import pytest

from helpers import tiny_overrides
from inflora_ray.config import ModelConfig
from inflora_ray.ray_train.errors import NonRetryableError, clear_fatal, raise_if_fatal, read_fatal, write_fatal
from inflora_ray.preflight import PreflightError, check_model, check_start_checkpoint
from inflora_ray.presets import load_config
from inflora_ray.rundir import RunDir
from inflora_ray.training.checkpoint import (META_FILE, STATE_DIGEST_KEY, STATE_FILE, CheckpointError,
                                             read_checkpoint, write_checkpoint)
from inflora_ray.training.learner import ContinualLearner

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "inflora_ray"


def _cfg(**extra):
    """The tiny quickstart (3 tasks, inflora, rank 4, width 48, depth 2)."""
    return load_config("quickstart", tiny_overrides(**{"data.num_tasks": 3, **extra}))


@pytest.fixture(scope="module")
def state():
    """The learner state after task 0 of the tiny quickstart."""
    learner = ContinualLearner(_cfg())
    learner.run(stop_after_task=0)
    return learner.state_dict()


def _save(directory: pathlib.Path, state: dict, meta: dict | None = None) -> pathlib.Path:
    write_checkpoint(str(directory), state, meta if meta is not None else {"task": 0})
    return directory


@pytest.fixture
def ckpt(tmp_path, state):
    """An intact checkpoint directory of ``state`` (with its SHA-256 in meta.json)."""
    return _save(tmp_path / "checkpoint_task000", state)


def _meta(ckpt: pathlib.Path) -> dict:
    return json.loads((ckpt / META_FILE).read_text())


def _drop_digest(ckpt: pathlib.Path) -> None:
    """Take the checksum out of meta.json."""
    meta = _meta(ckpt)
    meta.pop(STATE_DIGEST_KEY)
    (ckpt / META_FILE).write_text(json.dumps(meta))


def _truncate(ckpt: pathlib.Path) -> None:
    data = (ckpt / STATE_FILE).read_bytes()
    (ckpt / STATE_FILE).write_bytes(data[: len(data) // 2])


class _Payload:
    """Unpickling this would run ``Path.touch`` on its path: it must never happen."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


# ------------------------------------------------------------------------------------------------------------
# Checksums are written and verified
# ------------------------------------------------------------------------------------------------------------

def test_checkpoint_records_the_checksum_of_its_state(ckpt, state):
    assert _meta(ckpt)[STATE_DIGEST_KEY] == hashlib.sha256((ckpt / STATE_FILE).read_bytes()).hexdigest()
    assert _meta(ckpt)["task"] == 0
    loaded = read_checkpoint(str(ckpt))
    assert loaded["next_task"] == state["next_task"] == 1
    check_start_checkpoint(str(ckpt), _cfg())  # an intact, fitting checkpoint passes


def test_the_worker_writes_the_checksum_when_it_reports(tmp_path, monkeypatch):
    import ray.train

    from inflora_ray.ray_train.worker import RayHooks

    seen = {}

    def fake_report(metrics, checkpoint=None, checkpoint_dir_name=None):
        seen["meta"] = json.loads((pathlib.Path(checkpoint.path) / META_FILE).read_text())
        seen["digest"] = hashlib.sha256((pathlib.Path(checkpoint.path) / STATE_FILE).read_bytes()).hexdigest()
        seen["name"] = checkpoint_dir_name

    monkeypatch.setattr(ray.train, "report", fake_report)
    cfg = _cfg()
    learner = ContinualLearner(cfg)
    RayHooks(cfg, RunDir(str(tmp_path / "run")))._checkpoint(learner, {"task": 0, "loss": float("nan")}, "ck")
    assert seen["meta"][STATE_DIGEST_KEY] == seen["digest"] and seen["name"] == "ck"
    assert "loss" not in seen["meta"]  # NaN metrics are left out of meta.json, as before


def test_checkpoint_without_checksum_is_refused(ckpt):
    _drop_digest(ckpt)
    with pytest.raises(PreflightError, match=r"meta\.json: state_sha256 is None, not a hex digest; the checkpoint "
                                             r"cannot be verified"):
        check_start_checkpoint(str(ckpt), _cfg())
    (ckpt / META_FILE).unlink()
    with pytest.raises(PreflightError, match=r"meta\.json is missing: the checkpoint cannot be verified"):
        check_start_checkpoint(str(ckpt), _cfg())


# ------------------------------------------------------------------------------------------------------------
# The table of hostile checkpoints: each is refused by the driver before any compute, naming the checkpoint
# ------------------------------------------------------------------------------------------------------------

def _resave(change):
    """A case that saves a changed copy of the state (with a correct checksum)."""
    def make(ckpt: pathlib.Path, state: dict, tmp_path: pathlib.Path) -> None:
        changed = dict(state)
        change(changed, tmp_path)
        _save(ckpt, changed)
    return make


def _truncated_unverified(ckpt, state, tmp_path):
    _drop_digest(ckpt)
    _truncate(ckpt)


def _wrong_digest(ckpt, state, tmp_path):
    meta = _meta(ckpt)
    meta[STATE_DIGEST_KEY] = "0" * 64
    (ckpt / META_FILE).write_text(json.dumps(meta))


def _damaged_meta(ckpt, state, tmp_path):
    (ckpt / META_FILE).write_text("{not json")


def _no_state(ckpt, state, tmp_path):
    (ckpt / STATE_FILE).unlink()


def _payload(changed, tmp_path):
    changed["extra"] = _Payload(tmp_path / "PWNED")


def _version(changed, tmp_path):
    changed["version"] = 99


def _order(changed, tmp_path):
    changed["class_order"] = list(reversed(changed["class_order"]))


def _not_a_state(changed, tmp_path):
    changed.pop("heads")


HOSTILE = {
    # name: (how the checkpoint is spoiled, config overrides, what the error says)
    "truncated": (lambda c, s, t: _truncate(c), {}, r"state\.pt: SHA-256 \w+ differs from \w+ recorded in meta\.json"),
    "truncated, no checksum": (_truncated_unverified, {}, r"meta\.json: state_sha256 is None"),
    "wrong checksum": (_wrong_digest, {}, r"state\.pt: SHA-256 \w+ differs from 0{64}"),
    "damaged meta.json": (_damaged_meta, {}, r"meta\.json is not valid JSON"),
    "no state.pt": (_no_state, {}, r"no inflora-ray checkpoint there \(state\.pt missing\)"),
    "custom class pickle": (_resave(_payload), {}, r"state\.pt: refused: it holds objects other than tensors"),
    "unsupported version": (_resave(_version), {}, r"checkpoint version 99 is not supported"),
    "not a learner state": (_resave(_not_a_state), {}, r"not an inflora-ray learner state \(no heads\)"),
    "another method": (None, {"method.name": "seq-lora"}, r"made by method 'inflora', the config says .*'seq-lora'"),
    "another rank": (None, {"method.rank": 8}, r"has rank 4 and input width 48 .* method\.rank=8"),
    "another width": (None, {"model.kwargs": "{patch_size: 4, depth: 2, embed_dim: 96, num_heads: 3}"},
                      r"input width 48 .* a model of width 96"),
    "another depth": (None, {"model.kwargs": "{patch_size: 4, depth: 3, embed_dim: 48, num_heads: 3}"},
                      r"cover 2 layers, the config's model has 3 adapted layers"),
    "fewer tasks": (None, {"data.num_tasks": 2}, r"head of task 0 has shape \(4, 48\), the config's task 0 has 5"),
    "another class order": (None, {"data.class_order_seed": 1},
                            r"class order \[0, 1, 2, .*\] \(10 classes\) differs from the config.s \[2, 9, 6"),
    "altered class order": (_resave(_order), {}, r"class order \[9, 8, 7, .*\] \(10 classes\) differs"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_start_checkpoint_is_refused_before_compute(case, ckpt, state, tmp_path):
    spoil, overrides, message = HOSTILE[case]
    if spoil is not None:
        spoil(ckpt, state, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(PreflightError, match=message) as err:
        check_start_checkpoint(str(ckpt), _cfg(**overrides))
    assert str(ckpt) in str(err.value)  # the message names the checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not (tmp_path / "PWNED").exists()  # nothing unpickled


def test_relative_start_checkpoint_is_refused(ckpt, monkeypatch):
    monkeypatch.chdir(ckpt.parent)
    with pytest.raises(PreflightError, match="give an absolute path or a URI"):
        check_start_checkpoint(ckpt.name, _cfg())


def test_class_order_from_the_built_benchmark_is_used_when_given(ckpt):
    with pytest.raises(PreflightError, match=r"class order .* differs from the config's \[1, 0, 2"):
        check_start_checkpoint(str(ckpt), _cfg(), class_order=[1, 0, *range(2, 10)])


def test_no_torch_load_without_weights_only_in_the_package():
    """Every torch.load in the package passes weights_only=True (never unpickle arbitrary objects)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------------------
# The worker: the same checks before loading; fatal errors are recorded and end a restarted attempt at once
# ------------------------------------------------------------------------------------------------------------

def test_worker_refuses_a_damaged_or_mismatched_checkpoint(ckpt, tmp_path):
    from ray.train import Checkpoint

    from inflora_ray.ray_train.worker import load_checkpoint_state, restore

    learner = ContinualLearner(_cfg(**{"method.rank": 8}))
    with pytest.raises(CheckpointError, match=r"does not fit the config: .*method\.rank=8"):
        restore(learner, Checkpoint(path=str(ckpt)), read_checkpoint(str(ckpt)), "--start-from",
                RunDir(str(tmp_path / "run")))
    assert learner.next_task == 0 and not learner.model.heads  # nothing was loaded
    _truncate(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / STATE_FILE)) + ": SHA-256"):
        load_checkpoint_state(Checkpoint(path=str(ckpt)))


def test_fatal_marker_write_read_raise_clear(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    assert read_fatal(run) is None
    raise_if_fatal(run)  # no marker: nothing happens
    write_fatal(run, CheckpointError("/x/state.pt: cut short"), phase="setup", rank=1)
    assert read_fatal(run)["type"] == "CheckpointError" and read_fatal(run)["rank"] == 1
    with pytest.raises(NonRetryableError, match=r"CheckpointError: /x/state\.pt: cut short \(setup, rank 1\)"):
        raise_if_fatal(run)
    clear_fatal(run)
    assert read_fatal(run) is None
    clear_fatal(run)  # clearing twice is fine


def test_train_worker_records_a_setup_error_and_stops_without_raising(ckpt, tmp_path, monkeypatch):
    """A fatal setup error is recorded and the worker returns (Ray Train has nothing to retry); a restarted
    attempt (as after a fatal error while training) finds the marker and returns at once."""
    import ray.train

    from inflora_ray.ray_train.worker import train_worker

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)  # no Ray Train session here
    _truncate(ckpt)
    run = RunDir(str(tmp_path / "run"))
    loop_config = {"config": _cfg().to_dict(), "run_dir": run.path, "start_from": str(ckpt)}
    assert train_worker(loop_config) is None
    fatal = read_fatal(run)
    assert fatal["type"] == "CheckpointError" and fatal["phase"] == "setup"
    assert fatal["message"].startswith(f"{ckpt / STATE_FILE}: SHA-256")
    t0 = time.time()
    train_worker(loop_config)  # a restarted attempt: returns without building anything
    assert time.time() - t0 < 1.0
    # nothing else was written but the run's log, which holds both attempts' events
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".fatal.json", "run.log"]
    events = (tmp_path / "run" / "run.log").read_text().splitlines()
    assert [e for e in events if "event=fatal_setup_error" in e and "level=error" in e]
    assert [e for e in events if "event=fatal_marker_found" in e]


def test_train_worker_records_a_bad_config(tmp_path):
    from inflora_ray.config import ConfigError
    from inflora_ray.ray_train.worker import train_worker

    run = RunDir(str(tmp_path / "run"))
    train_worker({"config": {"train": {"epochs": -1}}, "run_dir": run.path})
    assert read_fatal(run)["type"] == ConfigError.__name__ and "train.epochs" in read_fatal(run)["message"]


def _rank_main(rank: int, store: str, run_dir: str, config: dict) -> None:
    """One of two gloo ranks: rank 1 fails its setup (a bad config); rank 0 starts only once rank 1 wrote
    the fatal marker, so it finds the marker instead of setting up. Both must return."""
    import os
    import torch.distributed as dist

    from inflora_ray.ray_train.worker import train_worker

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    if rank == 0:
        while not os.path.exists(os.path.join(run_dir, ".fatal.json")):
            time.sleep(0.05)
    train_worker({"config": config, "run_dir": run_dir})
    dist.destroy_process_group()


def test_ranks_that_meet_a_fatal_error_differently_all_stop(tmp_path):
    """A rank that fails its setup and a rank that finds the marker join the same agreement: no rank is left
    waiting in a collective (a hang here is a deadlock)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    run_dir = str(tmp_path / "run")
    procs = [ctx.Process(target=_rank_main, args=(rank, str(tmp_path / "store"), run_dir,
                                                  {"train": {"epochs": -1}})) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, "a rank is stuck in the agreement all-reduce"
    assert [p.exitcode for p in procs] == [0, 0]
    assert read_fatal(RunDir(run_dir))["type"] == "ConfigError"


def test_a_retryable_error_leaves_no_marker(tmp_path, monkeypatch):
    import ray.train

    from inflora_ray.ray_train.worker import train_worker

    def lost_storage():
        raise OSError("connection reset")

    monkeypatch.setattr(ray.train, "get_checkpoint", lost_storage)
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(OSError):
        train_worker({"config": _cfg().to_dict(), "run_dir": run.path})
    assert read_fatal(run) is None


# ------------------------------------------------------------------------------------------------------------
# The shipped weights are checked against their recorded SHA-256 when loaded
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """The quickstart weights and their record copied to tmp_path, with builtin:quickstart_vit pointing there."""
    from inflora_ray.tools.pretrain import quickstart_weights_path

    weights = tmp_path / "quickstart_vit.pth"
    shutil.copy(quickstart_weights_path(), weights)
    shutil.copy(quickstart_weights_path().with_suffix(".json"), tmp_path / "quickstart_vit.json")
    monkeypatch.setattr("inflora_ray.core.model.resolve_weights_file",
                        lambda spec: str(weights) if spec == "builtin:quickstart_vit" else spec)
    return weights


def _quickstart_model() -> ModelConfig:
    return load_config("quickstart", []).model


def test_intact_shipped_weights_load(shipped_copy):
    from inflora_ray.core.model import create_backbone

    assert create_backbone(_quickstart_model()).embed_dim == 192


def test_shipped_weights_with_one_byte_altered_are_refused(shipped_copy):
    from inflora_ray.core.model import create_backbone

    data = bytearray(shipped_copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    shipped_copy.write_bytes(bytes(data))
    message = rf"weights file {re.escape(str(shipped_copy))} has SHA-256 \w+, but its record .* says c63b795f"
    with pytest.raises(ValueError, match=message):
        create_backbone(_quickstart_model())
    with pytest.raises(PreflightError, match=message):
        check_model(load_config("quickstart", []))


def test_shipped_weights_without_record_are_refused(shipped_copy):
    from inflora_ray.core.model import create_backbone

    shipped_copy.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match=r"record .*quickstart_vit\.json of .* is missing"):
        create_backbone(_quickstart_model())


# ------------------------------------------------------------------------------------------------------------
# On Ray: a truncated checkpoint with run.max_failures=-1 ends the job at once
# ------------------------------------------------------------------------------------------------------------

def _ray_cfg(tmp_path):
    return _cfg(**{"run.storage_path": str(tmp_path), "run.max_failures": -1, "run.cpus_per_worker": 1,
                   "tracking.enabled": "false"})


@pytest.mark.ray
def test_truncated_start_checkpoint_fails_within_a_minute_through_run_experiment(ray_session, ckpt, tmp_path,
                                                                                 monkeypatch):
    """Through the driver, 2 ranks: the checkpoint is cut short after the driver's preflight passed it (between
    the preflight and connecting to Ray), so the workers meet it. Both ranks record the error and stop after
    agreeing, so Ray Train sees no failure to retry: max_failures=-1 must not restart forever, and the driver
    raises the recorded error."""
    from inflora_ray.ray_train import launch

    join = launch.join_cluster

    def truncate_then_join(cfg, address):
        _truncate(ckpt)
        join(cfg, address)

    monkeypatch.setattr(launch, "join_cluster", truncate_then_join)
    t0 = time.time()
    with pytest.raises(NonRetryableError, match=re.escape(str(ckpt / STATE_FILE))):
        launch.run_experiment(_ray_cfg(tmp_path).with_values({"run.num_workers": 2}),
                              launch.RunOptions(name="trunc", start_from=str(ckpt)), launch.RunContext(quiet_table=True))
    assert time.time() - t0 < 60
