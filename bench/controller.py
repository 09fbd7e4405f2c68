"""What Ray Train's controller costs per run: with Ray's ``TorchConfig`` (the controller imports torch to
unpickle it) against the project's ``ProcessGroupConfig`` (inflora_ray/ray_train/process_group.py).

    python bench/controller.py --repeats 3

Each repeat fits one tiny run of each kind (1 worker, 1 CPU, a training function that imports torch and
reports once), alternating the two kinds. A Ray Train callback, which runs in the controller, reads the
controller's memory at the report from ``/proc/self/smaps_rollup`` (Linux): RSS, PSS (shared pages divided
among the processes that map them) and USS (pages no other process maps; what the controller adds to a node
that already runs processes with torch loaded) and its CPU time so far (``cpu_s``). Times: ``fit()`` called
to the worker's report (``first_report_s``) and to ``fit()`` returning (``fit_s``). Prints one line per run
and the medians (docs/performance.md holds figures taken with it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import ray
from ray.train import RunConfig, ScalingConfig, UserCallback


class ControllerMemory(UserCallback):
    """Runs in the controller: at the first report, writes its pid, memory (MiB), whether torch is imported
    and the time, to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        if os.path.exists(self.path):
            return
        fields = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
        with open(self.path, "w") as f:
            times = os.times()
            json.dump({"pid": os.getpid(), "time": time.time(), "torch": "torch" in sys.modules,
                       "cpu_s": times.user + times.system,
                       "rss_mib": fields["Rss"], "pss_mib": fields["Pss"],
                       "uss_mib": fields["Private_Clean"] + fields["Private_Dirty"]}, f)


def train():
    """The worker's function: torch imported (as in every run's worker), one report."""
    import torch  # noqa: F401

    ray.train.report({"step": 1})


def one_fit(kind: str, storage: str, name: str) -> dict:
    """Fit one tiny run with the given backend config; returns its figures."""
    from inflora_ray.ray_train.process_group import ProcessGroupConfig
    from inflora_ray.ray_train.trainer import RunTrainer

    if kind == "torch":
        from ray.train.torch import TorchConfig

        config = TorchConfig()
    else:
        config = ProcessGroupConfig()
    probe = os.path.join(storage, f"{name}.json")
    trainer = RunTrainer(train, torch_config=config,
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name=name, storage_path=storage, callbacks=[ControllerMemory(probe)]))
    start = time.time()
    trainer.fit()
    fit_s = time.time() - start
    with open(probe) as f:
        got = json.load(f)
    return {"kind": kind, "fit_s": round(fit_s, 2), "first_report_s": round(got.pop("time") - start, 2),
            **{k: round(v, 1) if isinstance(v, float) else v for k, v in got.items()}}


def main() -> None:
    """Alternate the two kinds for ``--repeats`` rounds and print each run and the medians."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
          f"ray {ray.__version__}, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        one_fit("ours", storage, "warmup")  # Ray's own first start (worker pool, imports) is left out
        for r in range(args.repeats):
            for kind in (("ours", "torch") if r % 2 == 0 else ("torch", "ours")):
                rows.append(one_fit(kind, storage, f"{kind}-{r}"))
                print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    for kind in ("torch", "ours"):
        mine = [x for x in rows if x["kind"] == kind]
        med = {k: statistics.median(x[k] for x in mine) for k in ("rss_mib", "pss_mib", "uss_mib", "cpu_s",
                                                                  "first_report_s", "fit_s")}
        print(f"median {kind:5s} ({len(mine)} runs): " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))


if __name__ == "__main__":
    main()
