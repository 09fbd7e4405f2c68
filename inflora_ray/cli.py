"""What the command-line entry points share: the flags that stand for config keys, and the exit codes."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

from .config import ConfigError
from .redact import redact_text

# Flags that are shortcuts for a config key: flag -> (config key, argparse keyword arguments).
CONFIG_FLAGS: dict[str, tuple[str, dict]] = {
    "--num-workers": ("run.num_workers", dict(type=int, help="Ray Train workers (data-parallel ranks)")),
    "--use-gpu": ("run.use_gpu", dict(action="store_true", default=None, help="one GPU per worker")),
    "--cpus-per-worker": ("run.cpus_per_worker", dict(type=float, help="CPUs per Ray Train worker")),
    "--storage-path": ("run.storage_path", dict(help="local dir, NFS path or s3:// / gs:// URI")),
    "--name": ("run.name", dict(help="run name (default: <experiment>-<method>-<time>-seed<seed>)")),
    "--max-failures": ("run.max_failures", dict(type=int, help="worker failures to recover from")),
    "--tracking-uri": ("tracking.uri", dict(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else a "
                                                 "local store in the working directory)")),
    "--no-tracking": ("tracking.enabled", dict(action="store_false", default=None, help="do not log to MLflow")),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_config_flags(parser: argparse.ArgumentParser, flags: list[str]) -> None:
    """Add the named shortcut flags to ``parser``; each help text ends with the config key it sets."""
    for flag in flags:
        key, kwargs = CONFIG_FLAGS[flag]
        parser.add_argument(flag, dest=_dest(flag), **{**kwargs, "help": f"{kwargs['help']}; = {key}"})


def flag_overrides(args: argparse.Namespace, flags: list[str]) -> list[str]:
    """The ``section.key=value`` overrides of the shortcut flags that were given."""
    out = []
    for flag in flags:
        value = getattr(args, _dest(flag))
        if value is not None:
            out.append(f"{CONFIG_FLAGS[flag][0]}={value if isinstance(value, str) else json.dumps(value)}")
    return out


EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TRIALS_ERRORED = 3  # a sweep named its winner, but some of its trials ended with an error


def run_cli(body: Callable[[], Optional[int]], usage_errors: tuple = ()) -> int:
    """Run a CLI body: exit 0 on success (or the code the body returns), 2 on bad input found before compute
    (or an error no retry can fix), 1 if the run failed, 130 if it was interrupted (Ctrl-C, SIGTERM) after
    saving what it had."""
    from .preflight import PreflightError
    from .ray_train.errors import NonRetryableError
    from .ray_train.launch import RunInterrupted

    try:
        code = body()
    except (ConfigError, PreflightError, NonRetryableError, OSError, *usage_errors) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except (RunInterrupted, KeyboardInterrupt) as e:
        print(f"stopped: {redact_text(str(e)) or 'interrupted before the run started; nothing was trained'}",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except RuntimeError as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_OK if code is None else code


def exit_without_working_directory() -> None:
    """Exit with code 2 and a message saying what to do when the working directory was deleted (or moved
    away): the entry points import this module before torch, whose native libraries abort the process from
    there with an unrelated message ("oneMKL FATAL ERROR: Cannot load libtorch_cpu.so")."""
    try:
        os.getcwd()
    except FileNotFoundError:
        from .preflight import DELETED_CWD

        print(f"error: {DELETED_CWD}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None


exit_without_working_directory()
