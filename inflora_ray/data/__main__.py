"""Dataset tools: inflora-data (or python -m inflora_ray.data).

    inflora-data prepare BENCHMARK --source PATH --out URI [--rows-per-group N] [...]
        convert a raw benchmark (one stored as files) into Parquet shards (local path, s3://, gs://)
    inflora-data manifest BENCHMARK --source PATH --out FILE [--no-hashes]
        write the split manifest (per file: path, split, label, size, sha256) of a copy (ImageNet-R)
    inflora-data verify URI [--no-hashes]
        check prepared shards against their manifest (sizes; unless --no-hashes: sha256, and every image decoded)
    inflora-data sample BENCHMARK --out DIR
        write a small generated dataset (random images) in the benchmark's on-disk layout, to try the others
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..redact import redact_text, remember_secrets
from .base import DataError
from .registry import get_benchmark, shardable_benchmarks, split_manifest_benchmarks


def _log(msg: str) -> None:
    """Progress to stderr (stdout carries the JSON result), credentials redacted."""
    print(redact_text(msg), file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    """The command line: subcommands prepare, manifest, verify; benchmark choices from the registry."""
    from .shards import DEFAULT_ROWS_PER_FILE, DEFAULT_ROWS_PER_GROUP

    p = argparse.ArgumentParser(prog="inflora-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="convert a raw benchmark into Parquet shards")
    pp.add_argument("benchmark", choices=shardable_benchmarks())
    pp.add_argument("--source", required=True, help="the raw dataset's folder (as data.root)")
    pp.add_argument("--out", required=True, help="output directory: local path or s3:// / gs:// URI")
    pp.add_argument("--rows-per-group", type=int, default=DEFAULT_ROWS_PER_GROUP,
                    help="max rows per Parquet row group (a row group never mixes classes)")
    pp.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE,
                    help="max rows per Parquet file")
    pp.add_argument("--num-tasks", type=int, default=None,
                    help="task directories (natural class order); default: the paper's task count "
                         "(any class order / task count can still be trained from the shards)")
    pp.add_argument("--split-manifest", default=None,
                    help="benchmarks with a split manifest: the manifest to use and verify "
                         "(default: the split rule)")
    pp.add_argument("--verify-hashes", action="store_true", help="with a split manifest: check sha256 against it")
    pp.add_argument("--download", action="store_true",
                    help="downloadable benchmarks: download into --source if missing")
    pp.add_argument("--no-verify-release", action="store_true",
                    help="benchmarks with official checksums (CIFAR-100): read a modified copy, skipping the MD5 "
                         "check against the official release (the files are still read with a restricted "
                         "unpickler)")
    pp.add_argument("--threads", type=int, default=4, help="threads reading/encoding images")
    pp.add_argument("--overwrite", action="store_true", help="replace shards already at --out")

    pm = sub.add_parser("manifest", help="write the split manifest of a copy (ImageNet-R)")
    pm.add_argument("benchmark", choices=split_manifest_benchmarks())
    pm.add_argument("--source", required=True, help="the dataset's folder (imagenet-r/)")
    pm.add_argument("--out", required=True, help="output JSON file (local path or URI)")
    pm.add_argument("--no-hashes", action="store_true", help="skip sha256 of every file (sizes only)")

    pv = sub.add_parser("verify", help="check prepared shards against their manifest")
    pv.add_argument("uri")
    pv.add_argument("--no-hashes", action="store_true", help="sizes only (no full read)")

    ps = sub.add_parser("sample", help="write a small generated dataset in a benchmark's on-disk layout")
    ps.add_argument("benchmark", choices=shardable_benchmarks())
    ps.add_argument("--out", required=True, help="a new or empty local folder (what data.root / --source name)")
    return p


def _run(args: argparse.Namespace) -> dict:
    """Carry out the parsed command; return its JSON summary."""
    from . import shard_writer, shards

    if args.command == "prepare":
        man = shard_writer.prepare_shards(args.benchmark, args.source, args.out, rows_per_group=args.rows_per_group,
                                          rows_per_file=args.rows_per_file, num_tasks=args.num_tasks,
                                          overwrite=args.overwrite, download=args.download,
                                          split_manifest=args.split_manifest, verify_hashes=args.verify_hashes,
                                          verify_release=not args.no_verify_release, threads=args.threads, log=_log)
        return {"out": args.out, "benchmark": man["benchmark"], "num_classes": man["num_classes"],
                "rows": {s: man["splits"][s]["num_rows"] for s in shards.SPLITS}}
    if args.command == "manifest":
        from .. import storage

        build_split_manifest = get_benchmark(args.benchmark).release_module().build_split_manifest
        man = build_split_manifest(args.source, hashes=not args.no_hashes, progress=_log)
        storage.write_json(args.out, man)
        return {"out": args.out, "version": man["version"], "classes": len(man["classes"]),
                "train": man["num_train"], "test": man["num_test"]}
    if args.command == "sample":
        from . import sample

        sample.WRITERS[args.benchmark](Path(args.out).expanduser())
        return {"out": args.out, "benchmark": args.benchmark, "num_classes": sample.CLASSES[args.benchmark],
                "note": "random images: for trying the tools, not for training"}
    return shards.verify_shards(args.uri, hashes=not args.no_hashes)


def main(argv=None) -> int:
    """Run the data CLI on ``argv`` (default: sys.argv[1:]); 0 on success, 2 on a data error."""
    args = _parser().parse_args(argv)
    # A URI may carry credentials (s3://KEY:SECRET@bucket/..., ?access_token=): none reaches the output.
    remember_secrets(*(getattr(args, name, None) for name in ("source", "out", "uri", "split_manifest")))
    try:
        print(redact_text(json.dumps(_run(args))))
    except (DataError, ValueError, OSError) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
