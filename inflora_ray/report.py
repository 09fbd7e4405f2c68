"""``python -m inflora_ray.report`` (installed as ``inflora-report``): the comparison table of finished runs,
from an MLflow experiment or from run folders, as Markdown (stdout), CSV and a plot; see docs/report.md.
The work is done by :mod:`inflora_ray.tracking.report` and :mod:`inflora_ray.tracking.report_table`."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

from .cli import run_cli
from .config import config_from_dict
from .tracking import report_table
from .tracking.report import ReportError, runs_from_folders, runs_from_mlflow
from .tracking.store import TrackingUnavailable, check_server, resolve_uri


def build_parser() -> argparse.ArgumentParser:
    """The ``inflora-report`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m inflora_ray.report", description="Mean +- std over seeds of the "
                                "final metrics per method (rows) and benchmark (columns), from finished runs.")
    p.add_argument("--runs", nargs="+", metavar="DIR", help="run folders, or storage folders holding run folders")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment to read (and to log to)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default)")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.sweep_id = 'x'\" (--experiment)")
    p.add_argument("--benchmark", help="only runs of this data.benchmark")
    p.add_argument("--method", help="only runs of this method.name")
    p.add_argument("--sweep", help="only runs of this tracking.sweep_id")
    p.add_argument("--group-by", default=",".join(report_table.DEFAULT_GROUP_BY), metavar="KEY[,KEY]",
                   help="flat config keys whose values make the rows (default: method.name)")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV (a line per row x benchmark x metric)")
    p.add_argument("--plot", metavar="PATH", help="also plot pooled accuracy after each task (PNG)")
    p.add_argument("--log-to-mlflow", nargs="?", const="", metavar="PARENT_RUN_NAME",
                   help="log table.md, table.csv and the plot to a new parent run in --experiment")
    return p


def _main(args: argparse.Namespace) -> None:
    if not args.runs and not args.experiment:
        raise ReportError("give the runs to report: --runs DIR [DIR ...] or --experiment NAME")
    if args.runs and args.filter:
        raise ReportError("--filter applies to --experiment (MLflow); with --runs use --benchmark/--method/--sweep")
    if args.log_to_mlflow is not None and not args.experiment:
        raise ReportError("--log-to-mlflow needs --experiment NAME: the MLflow experiment to log the report to")
    cfg = config_from_dict({"tracking": {"uri": args.tracking_uri, "experiment": args.experiment}})
    uri = resolve_uri(cfg)
    if args.runs and args.log_to_mlflow is not None:
        check_server(uri)  # before reading anything
    where = {"benchmark": args.benchmark, "method": args.method, "sweep": args.sweep}
    skipped: list[str] = []
    runs = runs_from_folders(args.runs, where, skipped) if args.runs else runs_from_mlflow(uri, args.experiment,
                                                                                           args.filter, where)
    for item in skipped:
        print(f"skipped {item}", file=sys.stderr)
    table = report_table.build_table(runs, tuple(k.strip() for k in args.group_by.split(",") if k.strip()))
    sys.stdout.write(report_table.to_markdown(table))
    if table.notes or table.left_out():
        print(f"warning: {len(table.notes)} note(s), {len(table.left_out())} unfinished run(s) not included; see "
              "below the table", file=sys.stderr)
    if not (args.csv or args.plot or args.log_to_mlflow is not None):
        return
    with tempfile.TemporaryDirectory() as d:
        paths = report_table.write_outputs(table, d)
        for kind, dest in (("csv", args.csv), ("plot", args.plot)):
            if dest:
                shutil.copyfile(paths[kind], dest)
        if args.log_to_mlflow is not None:
            name = args.log_to_mlflow or f"report-{time.strftime('%Y%m%d-%H%M%S')}"
            run_id = report_table.log_to_mlflow(table, cfg, name, list(paths.values()))
            print(f"logged to MLflow run {run_id} ({name!r}) in experiment {args.experiment!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``inflora-report``; returns the exit code (0 ok, 2 bad input, 1 failure)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _main(args), usage_errors=(ReportError, TrackingUnavailable))


if __name__ == "__main__":
    sys.exit(main())
