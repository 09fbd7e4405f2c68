"""Several seeds of one config, run side by side on the cluster, under one MLflow parent run that records
mean +- std of the final metrics."""
from __future__ import annotations

import concurrent.futures as cf
import sys
from dataclasses import replace
from typing import Optional

from ..config import Config
from ..core.metrics import aggregate_over_seeds
from ..data.registry import get_benchmark
from ..preflight import PreflightError, check_config, checked_benchmark, connect_ray
from ..rundir import default_run_name, run_name
from .launch import RunContext, RunOptions, RunResult, run_experiment

# The lines of the table over seeds: the key aggregate_over_seeds averages, and its label (pooled: over the test
# images of all seen tasks together; task-mean: the mean of the per-task accuracies).
SEED_TABLE = (("final_accuracy", "final accuracy A_T, pooled"),
              ("final_accuracy_task_mean", "final accuracy A_T, task-mean"),
              ("average_incremental_accuracy", "average incremental accuracy, pooled"),
              ("average_incremental_accuracy_task_mean", "average incremental accuracy, task-mean"),
              ("forgetting", "forgetting"))


def run_seeds(cfg: Config, seeds: list[int], opts: RunOptions = RunOptions(),
              context: RunContext = RunContext()) -> dict:
    """Run one experiment per seed (runs ``<name>-seed<k>``, :func:`~inflora_ray.rundir.run_name`, with
    ``opts.name`` as the base), concurrently where the cluster has room.

    Returns ``{"runs": {seed: RunResult | None}, "aggregate": {...}, "parent_run_id": ...}``; raises
    ``RuntimeError`` naming the failed seeds after the others finished.
    """
    if len(set(seeds)) != len(seeds) or not seeds:
        raise PreflightError(f"seeds {seeds}: give each seed once (each seed is one run)")
    if opts.resume:
        raise PreflightError("several seeds cannot be resumed together; resume each seed's run by name")
    base = opts.name or cfg.run.name or default_run_name(cfg, with_seed=False)
    check_config(cfg, opts.address)
    connect_ray(opts.address)  # once, before the seeds' threads
    if context.data is None and not get_benchmark(cfg.data.benchmark).in_memory:
        # the dataset is listed (and verified) once for every seed's run
        context = replace(context, data=checked_benchmark(cfg).scanned)
    parent = None
    if cfg.tracking.enabled:
        from ..tracking import start_parent

        joined = ",".join(map(str, seeds))
        parent = start_parent(cfg, base, params={"seeds": joined, "method": cfg.method.name,
                                                 "benchmark": cfg.data.benchmark},
                              tags={"seed": "parent", "seeds": joined})
    results: dict[int, Optional[RunResult]] = {}

    def one(seed: int) -> RunResult:
        return run_experiment(cfg.with_values({"experiment.seed": seed}), replace(opts, name=run_name(base, seed)),
                              replace(context, parent_run_id=parent.run_id if parent else None,
                                      label=f"[seed {seed}] ", quiet_table=True))

    with cf.ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        futures = {pool.submit(one, s): s for s in seeds}
        for fut in cf.as_completed(futures):
            seed = futures[fut]
            try:
                results[seed] = fut.result()
            except Exception as e:
                print(f"[seed {seed}] error: {e}", file=sys.stderr, flush=True)
                results[seed] = None
    agg = aggregate_over_seeds([r.summary if r else None for _, r in sorted(results.items())])
    if parent is not None:
        parent.finish_parent(agg, ok=all(results.values()))
    print(f"\n== {base}: {len(seeds)} seeds ==")
    for key, label in SEED_TABLE:
        if f"{key}_mean" in agg:
            print(f"{label:43s}{100 * agg[f'{key}_mean']:.2f} +- {100 * agg[f'{key}_std']:.2f}")
    if any(r is None for r in results.values()):
        failed = sorted(s for s, r in results.items() if r is None)
        raise RuntimeError(f"seeds {failed} failed (see above); the others finished")
    return {"runs": results, "aggregate": agg, "parent_run_id": parent.run_id if parent else None}
