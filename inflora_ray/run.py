"""``python -m inflora_ray.run`` (installed as ``inflora-run``): the whole task sequence as one Ray Train job.

Connects to the cluster in ``RAY_ADDRESS`` when set (so ``ray job submit -- python -m inflora_ray.run`` works),
otherwise starts a local Ray. The work is done by :mod:`inflora_ray.ray_train`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from . import storage
from .cli import add_config_flags, flag_overrides, run_cli
from .logs import setup_logging
from .preflight import PreflightError, check_settings
from .presets import load_config
from .ray_train.launch import RunContext, RunOptions, run_experiment
from .ray_train.resume import load_run_config, load_start_config, resume_storage_path
from .ray_train.seeds import run_seeds

FLAGS = ["--num-workers", "--use-gpu", "--cpus-per-worker", "--storage-path", "--name", "--max-failures",
         "--tracking-uri", "--no-tracking"]


def build_parser() -> argparse.ArgumentParser:
    """The ``inflora-run`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m inflora_ray.run",
        description="Run an InfLoRA continual-learning experiment as a Ray Train job.",
        epilog="Overrides are section.key=value, e.g. method.rank=8 train.epochs=3 run.num_workers=2.")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    p.add_argument("--config", help="preset name or YAML file (default: quickstart; with --start-from, the "
                                     "checkpoint's own config)")
    add_config_flags(p, FLAGS)
    p.add_argument("--verbose", action="store_true",
                   help="show every event on the console, the Ray workers' included (they are always in the run's "
                        "log, run.log in the run folder)")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped run (name or run directory)")
    p.add_argument("--start-from", metavar="CHECKPOINT",
                   help="start a new run from a checkpoint directory, with that run's settings and the overrides")
    p.add_argument("--allow-config-change", action="store_true",
                   help="let --resume / --start-from change settings that alter results (recorded in the run)")
    p.add_argument("--stop-after-task", type=int, metavar="K", help="stop after task K (0-based)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--seeds", help="comma-separated seeds, run concurrently under one MLflow parent run")
    p.add_argument("--print-config", action="store_true",
                   help="check the config as a run would before training (model, rank, data) and print it")
    return p


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; each seed at most once."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PreflightError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated or not seeds:
        raise PreflightError(f"--seeds {text!r}: " + (f"seed(s) {repeated} given twice; each seed is one run"
                                                     if repeated else "no seed given"))
    return seeds


def _main(args: argparse.Namespace) -> None:
    overrides = list(args.overrides) + flag_overrides(args, FLAGS)
    if args.seeds and args.resume:
        raise PreflightError("--seeds cannot be combined with --resume; resume each seed's run by name")
    if args.start_from and (args.config or args.resume):
        raise PreflightError(f"--start-from takes its settings from the checkpoint; give what should differ as "
                             f"overrides (section.key=value), not {'--config' if args.config else '--resume'}")
    context, name = RunContext(), None
    if args.resume:
        storage_path = resume_storage_path(args.config or "quickstart", overrides)
        cfg, name, stored = load_run_config(storage_path, args.resume, overrides)
        context = RunContext(stored_config=stored)
    elif args.start_from:
        args.start_from = storage.absolute(args.start_from)  # the workers open it, from other directories
        cfg, state = load_start_config(args.start_from, overrides)
        context = RunContext(start_state=state)
    else:
        cfg = load_config(args.config or "quickstart", overrides)
    if args.print_config:
        check_settings(cfg)  # what a run would refuse before training, without starting anything
        print(cfg.to_yaml())
        return
    opts = RunOptions(name=name, resume=bool(args.resume), start_from=args.start_from,
                      stop_after_task=args.stop_after_task, allow_config_change=args.allow_config_change,
                      address=args.address or os.environ.get("RAY_ADDRESS"))
    if args.seeds:
        run_seeds(cfg, parse_seeds(args.seeds), opts)
    else:
        run_experiment(cfg, opts, context)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``inflora-run``; returns the exit code (0 ok, 2 bad input, 1 run failed)."""
    args = build_parser().parse_intermixed_args(argv)
    setup_logging(verbose=args.verbose)
    return run_cli(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
