"""Test helpers shared by the test modules: the tiny ViT every fast test uses, as config overrides and as a
timm model, and a learner hook that snapshots a checkpoint mid-run and kills the run. Imported as
``from helpers import ...`` (pytest puts ``tests/`` on the path)."""
from __future__ import annotations

import io
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import timm
import torch
from torch import nn

from inflora_ray.core.metrics import AccuracyCounts, summary
from inflora_ray.rundir import RunDir
from inflora_ray.tools.rehearsal import MLFLOW_SERVER_ENV
from inflora_ray.training.learner import Hooks

# 16 px images, patch 4 (16 tokens + CLS), 2 blocks of width 48: a forward pass takes milliseconds on a CPU.
TINY_VIT = {"name": "vit_tiny_patch16_224", "img_size": 16,
            "kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}}


def tiny_overrides(**extra) -> list[str]:
    """Overrides that shrink the quickstart to a few seconds: the tiny ViT (random weights), 1 epoch, rank 4."""
    kw = TINY_VIT["kwargs"]
    o = {
        "model.img_size": TINY_VIT["img_size"],
        "model.kwargs": "{" + ", ".join(f"{k}: {v}" for k, v in kw.items()) + "}",
        "model.weights_file": "null", "model.pretrained": "false",
        "train.epochs": 1, "data.batch_size": 64, "method.rank": 4, "train.device": "cpu",
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def tiny_vit(depth: int = 2, embed_dim: int = 48) -> nn.Module:
    """The tiny timm ViT (no classifier), in eval mode, optionally deeper or wider."""
    kw = {**TINY_VIT["kwargs"], "depth": depth, "embed_dim": embed_dim}
    return timm.create_model(TINY_VIT["name"], pretrained=False, num_classes=0, img_size=TINY_VIT["img_size"],
                             **kw).eval()


class Interrupt(Exception):
    """Raised by :class:`SnapshotAndStop` to kill a run."""


class SnapshotAndStop(Hooks):
    """A learner hook: serialise the learner's state at (task, epoch) end, like a checkpoint, into ``blob``,
    then kill the run (raise :class:`Interrupt`)."""

    def __init__(self, task: int, epoch: int):
        self.at = (task, epoch)
        self.blob = None

    def on_epoch_end(self, learner, task, epoch):
        if (task, epoch) == self.at:
            buf = io.BytesIO()
            torch.save(learner.state_dict(), buf)
            self.blob = buf.getvalue()
            raise Interrupt


def full_and_stopped_state(cfg, task: int = 1, epoch: int = 0):
    """``(full, state)``: the learner of ``cfg`` run uninterrupted to its end, and the learner state a
    checkpoint taken after ``epoch`` of ``task`` holds, read back as a resume reads it (the run that took it
    was killed there): what every resume-equals-uninterrupted test compares."""
    from inflora_ray.training.learner import ContinualLearner

    full = ContinualLearner(cfg)
    full.run()
    hook = SnapshotAndStop(task=task, epoch=epoch)
    try:
        ContinualLearner(cfg, hooks=hook).run()
    except Interrupt:
        pass
    assert hook.blob is not None, f"the run never reached task {task}, epoch {epoch}"
    return full, torch.load(io.BytesIO(hook.blob), weights_only=True)


# ------------------------------------------------------------------------------ counting reads from the store
# Counting the bytes read from the store: one implementation, shared with bench/read_amplification.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from read_counter import LOG_ENV as READ_LOG_ENV, bytes_logged, counting_filesystem  # noqa: E402,F401
from read_counter import install as count_reads_in_loader_process  # noqa: E402,F401


# ------------------------------------------------------------------------------ two gloo ranks, without Ray
def run_two_ranks(target, tmp_path, stuck_in: str, name: str = "result") -> str:
    """Run ``target(rank, store_path, out)`` for ranks 0 and 1 in two spawned processes (they form a gloo group
    through a file store), fail if one hangs in ``stuck_in`` or exits non-zero; returns ``out``, the prefix of
    the files ``<out>.<rank>`` the ranks wrote."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = str(tmp_path / name)
    procs = [ctx.Process(target=target, args=(r, str(tmp_path / "store"), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"a rank is stuck in {stuck_in}"
    assert [p.exitcode for p in procs] == [0, 0]
    return out


# ------------------------------------------------------------------------------ a run's reference, in process
def run_in_process(cfg) -> dict:
    """The summary (``inflora_ray.core.metrics.summary``: accuracy matrix, final accuracy, ...) of the run that
    ``cfg`` describes, trained here as one Ray Train worker of ``run.cpus_per_worker`` CPUs trains it: with that
    many threads. Bit for bit what a 1-worker run gives (``test_ray_train.py`` checks it), in a fraction of the
    time: the reference of the tests that compare a resumed, restarted or reproduced run with an
    uninterrupted one."""
    from inflora_ray.core.metrics import summary
    from inflora_ray.training.learner import ContinualLearner

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    try:
        learner = ContinualLearner(cfg, device=torch.device("cpu"))
        learner.run()
    finally:
        torch.set_num_threads(threads)
    return summary(learner.counts)


# ------------------------------------------------------------------------------ MLflow servers on loopback
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, *args: str, env: dict | None = None, timeout: float = 240):
    """A real ``mlflow server`` on loopback with a sqlite store under ``root``, in a session of its own
    (:func:`stop_server` kills the group), with extra flags and environment; returns (process, URI) once it
    answers on /health."""
    import os
    import subprocess
    import time
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**MLFLOW_SERVER_ENV, **(env or {})}
    with open(root / "server.log", "w") as server_log:  # the server keeps its own copy of the handle
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "art"),
             *args],
            cwd=root, env={**os.environ, **env}, stdout=server_log, stderr=subprocess.STDOUT,
            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])


def stop_server(proc) -> None:
    """Kill a server started by :func:`start_mlflow_server` and everything in its process group."""
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def verify_weights(path: Path, record_path: Path | None = None) -> None:
    """Raise ``ValueError`` unless the weights file's SHA-256 is the one its JSON record (next to it) gives: the
    check the model builder makes of shipped weights (:func:`inflora_ray.core.model.check_weights_digest`)."""
    import json

    from inflora_ray.core.model import check_weights_digest

    record_path = record_path or path.with_suffix(".json")
    check_weights_digest(path, record_path, json.loads(record_path.read_text()).get("sha256"))


def sd_lora_direction(components, task: int, which: int) -> torch.Tensor:
    """The dense normalised direction ``B_k A_k / ||B_k A_k||_F`` that SD-LoRA components hold for a finished
    task (``which``: 0 key, 1 value)."""
    r = components.rank
    b = (components.dir_B_k, components.dir_B_v)[which][:, task * r:(task + 1) * r]
    return b @ components.lora_A[task * r:(task + 1) * r]


# ---------------------------------------------------------------------------------------------------------
# Rehearsed faults on a RayCluster (inflora_ray.tools.rehearsal): a node lost, a job waited for
# ---------------------------------------------------------------------------------------------------------

def worker_of(cluster, node_id: str) -> int | None:
    """Which worker node ``k`` of ``cluster`` a Ray node id is (None: the head or unknown)."""
    for n in cluster.nodes():
        if n["node_id"] == node_id:
            names = [r for r in n.get("resources_total", {}) if r.startswith("rehearsal_node_")]
            return int(names[0].rsplit("_", 1)[1]) if names else None
    return None


def remove_node(cluster, k: int) -> list[int]:
    """Remove worker node ``k`` as a preempted machine goes: SIGKILL to its raylet, its workers and every other
    process it started, at once, with no drain."""
    return cluster.workers.pop(k).stop(hard=True)


def wait_node_dead(cluster, node_id: str, timeout: float = 60) -> None:
    """Until Ray's state reports ``node_id`` DEAD."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(n["node_id"] == node_id and n["state"] == "DEAD" for n in cluster.nodes()):
            return
        time.sleep(1)
    raise AssertionError(f"node {node_id} still alive {timeout:.0f} s after its processes were killed")


def wait_job(cluster, submission_id: str, timeout: float) -> str:
    """Until the job ends; its final status (SUCCEEDED, FAILED, STOPPED). Stops it after ``timeout``."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = cluster.job(submission_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    cluster.cli("job", "stop", f"--address={cluster.address}", submission_id)
    raise AssertionError(f"job {submission_id} did not finish in {timeout:.0f} s:\n"
                         f"{cluster.job_logs(submission_id)[-4000:]}")


def task_record(task: int) -> dict:
    """A task record as rank 0 writes it (``results/task_NNN.json``), with made-up but consistent numbers."""
    acc = AccuracyCounts()
    for i in range(task + 1):
        acc.add_row([50 + 10 * j for j in range(i + 1)], [100] * (i + 1))
    summ = summary(acc)
    report = {"task": task, "classes": [2 * task, 2 * task + 1], "pooled_accuracy": summ["pooled_accuracy"][-1],
              "average_incremental_accuracy": summ["average_incremental_accuracy"],
              "forgetting": summ["forgetting"], "backward_transfer": summ["backward_transfer"],
              "train_loss": 1.0 / (task + 1), "task_seconds": 2.0, "images_per_second": 50.0, "peak_memory_mb": 10.0,
              "accuracy": summ["accuracy_matrix"][-1], "own_head_accuracy": summ["accuracy_matrix"][-1],
              "info": {"memory_dims": [3 + task, 4 + task]}}
    return {"result": report, "summary": summ}


def results_dir(tmp_path, name: str = "r") -> RunDir:
    """An empty run folder (with its results/ folder) for a tracker to log from."""
    (tmp_path / name / "results").mkdir(parents=True)
    return RunDir(str(tmp_path / name))


class ResettingProxy:
    """A loopback TCP proxy to ``upstream`` (``(host, port)``) that can reset connections, as a server restarting
    or a load balancer dropping its connections: while it is down, every new connection is accepted and closed
    with SO_LINGER 0 (an RST), and so is an open one at its next request.

    :meth:`down` also resets the open connections at once (answers under way included); an outage that
    :meth:`down_for` starts, or that starts by itself at the first request holding ``trigger`` once ``ready()``
    is true (``seconds`` long), lets an answer already under way through."""

    def __init__(self, upstream: tuple[str, int], seconds: float = 20.0, trigger: bytes = b"",
                 ready=lambda: True):
        self.upstream, self.seconds, self.trigger, self.ready = upstream, seconds, trigger, ready
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._until = 0.0  # down while time.monotonic() < _until
        self.started_at: float | None = None  # the first outage's start
        self.resets = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _reset(self, s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()
        with self._lock:
            self._open.discard(s)

    def down_for(self, seconds: float) -> None:
        """Reset every new connection, and open ones at their next request, for ``seconds`` from now."""
        with self._lock:
            now = time.monotonic()
            self.started_at = now if self.started_at is None else self.started_at
            self._until = now + seconds

    def down(self) -> None:
        """Reset every connection, open or new, until :meth:`up`."""
        self.down_for(float("inf"))
        with self._lock:
            sockets = list(self._open)
        for s in sockets:
            self._reset(s)

    def up(self) -> None:
        with self._lock:
            self._until = 0.0

    def is_down(self) -> bool:
        return time.monotonic() < self._until

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self.is_down():
                self.resets += 1
                self._reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                self._reset(client)
                continue
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        tail = b""
        try:
            while data := src.recv(1 << 16):
                if request and self.trigger and self.started_at is None and self.trigger in tail + data \
                        and self.ready():
                    self.down_for(self.seconds)  # this request never reaches the upstream
                if request and self.is_down():
                    self.resets += 1
                    self._reset(src)
                    self._reset(dst)
                    return
                tail = data[-256:]  # the trigger may be cut between two reads
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        self.down()


def noise_png_shards(root: Path, per_class: int, side: int, classes: int = 4, num_tasks: int = 2) -> Path:
    """Shards (row groups of 4) of an ImageNet-R-layout folder under ``root/raw``: ``classes`` classes of
    ``per_class`` ``side`` px noise PNGs each (seeded), prepared by the real ``prepare`` into ``root/shards``."""
    import numpy as np
    from PIL import Image

    from inflora_ray.data.shard_writer import prepare_shards
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "raw" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
            (folder / f"img_{i}.png").write_bytes(buf.getvalue())
    prepare_shards("imagenet-r", str(root / "raw"), str(root / "shards"), rows_per_group=4, num_tasks=num_tasks)
    return root / "shards"


def remove_orphaned_placement_groups(wait_seconds: float = 20.0) -> list[str]:
    """Placement groups on this process's Ray that another job created and that are still there after
    ``wait_seconds`` (polled): removed, and their ids returned. A driver killed while its Ray Train controller
    was replacing a dead worker group (``ray job stop`` SIGKILLs after the wait) can leave the group it had
    just reserved behind its finished job, holding its CPUs for good on the test session's 2-CPU Ray."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not ray.is_initialized():
        return []
    own_job = ray.get_runtime_context().get_job_id()

    def foreign() -> list[str]:
        return [pg for pg, info in placement_group_table().items()
                if info["state"] != "REMOVED" and not pg.endswith(own_job)]  # a group's id ends with its job's

    deadline = time.monotonic() + wait_seconds
    while foreign() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = foreign()
    for pg in left:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))
    return left
