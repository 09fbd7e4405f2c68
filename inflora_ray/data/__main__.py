"""Dataset tools.

    python -m inflora_ray.data prepare BENCHMARK --source PATH --out URI [--rows-per-group N] [...]
        convert a raw benchmark (cifar100, imagenet-r, domainnet) into Parquet shards (local path, s3://, gs://)
    python -m inflora_ray.data manifest imagenet-r --source PATH --out FILE [--no-hashes]
        write the ImageNet-R split manifest (per file: path, split, label, size, sha256) of a copy
    python -m inflora_ray.data verify URI [--no-hashes]
        check prepared shards against their manifest (sizes; sha256 unless --no-hashes)
"""
from __future__ import annotations

import argparse
import json
import sys

from .base import DataError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from . import shards

    p = argparse.ArgumentParser(prog="python -m inflora_ray.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="convert a raw benchmark into Parquet shards")
    pp.add_argument("benchmark", choices=list(shards.PREPARABLE))
    pp.add_argument("--source", required=True, help="the raw dataset's folder (as data.root)")
    pp.add_argument("--out", required=True, help="output directory: local path or s3:// / gs:// URI")
    pp.add_argument("--rows-per-group", type=int, default=shards.DEFAULT_ROWS_PER_GROUP,
                    help="max rows per Parquet row group (a row group never mixes classes)")
    pp.add_argument("--rows-per-file", type=int, default=shards.DEFAULT_ROWS_PER_FILE,
                    help="max rows per Parquet file")
    pp.add_argument("--num-tasks", type=int, default=None,
                    help="task directories (natural class order); default: the paper's task count "
                         "(any class order / task count can still be trained from the shards)")
    pp.add_argument("--split-manifest", default=None,
                    help="imagenet-r: split manifest to use and verify (default: the split rule)")
    pp.add_argument("--verify-hashes", action="store_true", help="imagenet-r: check sha256 against the manifest")
    pp.add_argument("--download", action="store_true", help="cifar100: download into --source if missing")
    pp.add_argument("--threads", type=int, default=4, help="threads reading/encoding images")
    pp.add_argument("--overwrite", action="store_true", help="replace shards already at --out")

    pm = sub.add_parser("manifest", help="write the ImageNet-R split manifest of a copy")
    pm.add_argument("benchmark", choices=["imagenet-r"])
    pm.add_argument("--source", required=True, help="the imagenet-r/ folder")
    pm.add_argument("--out", required=True, help="output JSON file (local path or URI)")
    pm.add_argument("--no-hashes", action="store_true", help="skip sha256 of every file (sizes only)")

    pv = sub.add_parser("verify", help="check prepared shards against their manifest")
    pv.add_argument("uri")
    pv.add_argument("--no-hashes", action="store_true", help="sizes only (no full read)")

    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            man = shards.prepare_shards(args.benchmark, args.source, args.out, rows_per_group=args.rows_per_group,
                                        rows_per_file=args.rows_per_file, num_tasks=args.num_tasks,
                                        overwrite=args.overwrite, download=args.download,
                                        split_manifest=args.split_manifest, verify_hashes=args.verify_hashes,
                                        threads=args.threads, log=_log)
            print(json.dumps({"out": args.out, "benchmark": man["benchmark"], "num_classes": man["num_classes"],
                              "rows": {s: man["splits"][s]["num_rows"] for s in shards.SPLITS}}))
        elif args.command == "manifest":
            from .. import storage
            from .imagenet_r import build_split_manifest

            man = build_split_manifest(args.source, hashes=not args.no_hashes, progress=_log)
            storage.write_json(args.out, man)
            print(json.dumps({"out": args.out, "version": man["version"], "classes": len(man["classes"]),
                              "train": man["num_train"], "test": man["num_test"]}))
        else:
            print(json.dumps(shards.verify_shards(args.uri, hashes=not args.no_hashes)))
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
