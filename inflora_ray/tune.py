"""``python -m inflora_ray.tune`` (installed as ``inflora-tune``): Ray Tune sweeps where every trial is a full
continual run. The work is done by :mod:`inflora_ray.ray_tune`."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .cli import EXIT_TRIALS_ERRORED, add_config_flags, flag_overrides, run_cli
from .logs import setup_logging
from .presets import load_config
from .ray_tune.search_space import SpaceError, check_combinations, read_space
from .ray_tune.sweep import SweepOptions, check_size, run_sweep

FLAGS = ["--storage-path", "--num-workers", "--use-gpu", "--tracking-uri"]


def build_parser() -> argparse.ArgumentParser:
    """The ``inflora-tune`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m inflora_ray.tune",
                                description="Sweep InfLoRA hyperparameters with Ray Tune; each trial is a full run.")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value for every trial")
    p.add_argument("--config", default="quickstart", help="preset name or YAML file")
    p.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per point of the space (grid: repeats)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials at once (default: as many as the cluster can ever hold, autoscaling included)")
    p.add_argument("--seeds-per-trial", type=int, default=1, metavar="K",
                   help="seeds each trial runs side by side; trials are ranked on the mean (default 1)")
    p.add_argument("--max-trials", type=int, default=1000,
                   help="refuse a sweep that would start more trials than this (default 1000)")
    p.add_argument("--trial-retries", type=int, default=2,
                   help="restarts of a trial that failed for a transient cause: its process or node lost, or a run's "
                        "restarts spent on errors that pass (default 2)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--search", choices=("random", "optuna", "grid"), default="random")
    p.add_argument("--first-tasks", type=int, metavar="K",
                   help="tune on the first K tasks only, then run the best config over the whole sequence")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: tasks before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor")
    p.add_argument("--sweep-name", "--name", dest="sweep_name", help="sweep name (default: sweep-<experiment>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name, re-using finished trials")
    add_config_flags(p, FLAGS)
    p.add_argument("--verbose", action="store_true",
                   help="show every event on the console, the Ray workers' included (they are always in the run's "
                        "log, run.log in the run folder)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    return p


def _main(args: argparse.Namespace) -> Optional[int]:
    if args.resume and not args.sweep_name:
        raise SpaceError("--resume needs --name SWEEP")
    if args.num_samples < 1:
        raise SpaceError("--num-samples must be >= 1")
    cfg = load_config(args.config, list(args.overrides) + flag_overrides(args, FLAGS))
    opts = SweepOptions(
        name=args.sweep_name, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
        scheduler=args.scheduler, search=args.search, first_tasks=args.first_tasks, resume=args.resume,
        address=args.address or os.environ.get("RAY_ADDRESS"), grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, seeds_per_trial=args.seeds_per_trial,
        trial_retries=args.trial_retries, max_trials=args.max_trials)
    space = read_space(args.space)
    check_size(space, opts)  # before the space's values are checked against the config, which builds models
    check_combinations(space, cfg, args.space)
    out = run_sweep(cfg, space, opts)
    return EXIT_TRIALS_ERRORED if out.get("errored") else None


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``inflora-tune``; returns the exit code (0 ok, 2 bad input, 1 the sweep failed, 3 a
    winner was named but some trials ended with an error, 130 interrupted)."""
    args = build_parser().parse_intermixed_args(argv)
    setup_logging(verbose=args.verbose)
    return run_cli(lambda: _main(args), usage_errors=(SpaceError,))


if __name__ == "__main__":
    sys.exit(main())
