"""``python -m inflora_ray.rehearse``: a cluster on this machine, on loopback, until Ctrl-C.

Starts what a cluster user has: an S3-compatible object store (moto's server) with a bucket, an MLflow
tracking server (SQLite, artifacts in the bucket) and a Ray cluster of a head and worker nodes with token
authentication. Prints the variables to export (also written to ``--env-file``), then waits; Ctrl-C or SIGTERM
stops exactly what it started. See docs/rehearsal.md.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .tools.rehearsal import BUCKET, Rehearsal, RehearsalError


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m inflora_ray.rehearse`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m inflora_ray.rehearse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="Ray worker nodes (default: 2)")
    p.add_argument("--cpus-per-node", type=float, default=1, help="CPUs each worker node offers (default: 1)")
    p.add_argument("--head-cpus", type=float, default=0,
                   help="CPUs the head offers (default: 0, a head that schedules no training)")
    p.add_argument("--bucket", default=BUCKET, help=f"bucket to create in the object store (default: {BUCKET})")
    p.add_argument("--env-file", type=Path, help="also write the export lines here (then: source FILE)")
    return p


def exports(env: dict[str, str]) -> str:
    """``export K=V`` lines, shell-quoted."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def usage(r: Rehearsal) -> str:
    """What to run against the rehearsal, with its bucket in the paths."""
    return f"""
# then, from the repository root:
python -m inflora_ray.data prepare imagenet-r --source /data/imagenet-r --out {r.uri('shards/imagenet-r')}
ray job submit --working-dir . --runtime-env-json '{{"excludes": [".git", ".venv", "runs", "mlruns"]}}' -- \\
    python -m inflora_ray.run --config imagenet-r-5 data.shards={r.uri('shards/imagenet-r')} \\
    --num-workers {len(r.cluster.workers)} --storage-path {r.uri('runs')}
# dashboard: {r.cluster.address}   MLflow: {r.tracking_uri}   logs: {r.root}
"""


def main(argv: Optional[list[str]] = None) -> int:
    """Bring the rehearsal up, print how to use it, wait for Ctrl-C / SIGTERM, tear it down."""
    args = build_parser().parse_args(argv)
    if args.workers < 0 or args.cpus_per_node <= 0 or args.head_cpus < 0:
        print("error: --workers >= 0, --cpus-per-node > 0 and --head-cpus >= 0", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("starting the object store, MLflow server and Ray nodes (about a minute)...", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        rehearsal = Rehearsal(workers=args.workers, cpus_per_node=args.cpus_per_node, head_cpus=args.head_cpus,
                              bucket=args.bucket)
    except RehearsalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        text = exports(rehearsal.env())
        if args.env_file is not None:
            args.env_file.write_text(text)
        print(text + usage(rehearsal), flush=True)
        print(f"up in {time.time() - t0:.0f} s; Ctrl-C stops everything it started", file=sys.stderr, flush=True)
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        left = rehearsal.stop()
        if left:
            print(f"killed leftover processes {left}", file=sys.stderr)
        if args.env_file is not None:
            args.env_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
