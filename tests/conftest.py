"""Session-wide test setup: the thread budget, one local Ray and one MLflow server for the whole session.

Shared helpers (the tiny ViT, config overrides, MLflow servers of a test's own) live in ``helpers.py``;
fixtures for other servers and Ray clusters live in the test modules that use them.

Fault injection: the Ray Train worker reads ``INFLORA_RAY_FAULT`` (forwarded by the driver, never part of the
config), e.g. ``task=1,epoch=1,step=1,rank=1,mode=exit``; see ``inflora_ray/ray_train/faults.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

# Keep the two cores for the test process (and Ray workers where used).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Ray Train's controller polls its workers every 2 s by default, so each of the suite's many short runs spent
# up to 2 s noticing that training had ended (and as long again at each restart). A quarter second is
# ample on a local cluster. Set before Ray starts (its processes inherit it; Ray Train forwards RAY_TRAIN_*
# variables to its controller), and inherited by the runs that tests start as subprocesses.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train starts a preemption watcher (a process polling the cluster for nodes being drained) with every
# worker group; no node of the tests' local Ray is ever drained, and the process cost each 2-worker run about
# 2 s. The cluster rehearsal, whose nodes are real Ray nodes, keeps it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# A tracking server that tests stop on purpose is given up on after 2 s of retries per call, not a minute
# (tests of the retries themselves set their own wait).
os.environ.setdefault("INFLORA_TRACKING_RETRY_MAX_SECONDS", "2")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One ``mlflow server`` on loopback (sqlite store) shared by the modules that only need a server to log to
    (each uses experiments of its own); its URI. Tests that stop, break or configure a server start their own
    with ``helpers.start_mlflow_server``."""
    from helpers import start_mlflow_server, stop_server

    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_server(proc)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs: Ray Train workers take 1 CPU each)."""
    import ray

    if not ray.is_initialized():
        # The dashboard serves Ray's state API, by which Ray Train's placement-group cleaner sees that a
        # controller died (a trial process lost): without it the dead run's CPUs are never given back.
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_orphaned_placement_groups(request):
    """After each test on the session's Ray: the placement groups of jobs the test ran as other processes are
    gone (Ray removes them when the job ends; one reserved while the job was being killed can stay), so the
    next test finds the session's 2 CPUs free."""
    yield
    if "ray_session" in request.fixturenames:
        from helpers import remove_orphaned_placement_groups

        left = remove_orphaned_placement_groups()
        if left:
            import warnings

            warnings.warn(f"removed placement group(s) left by a finished job: {left}")
