"""The comparison table researchers publish: rows = method (or the config keys of ``--group-by``), columns =
benchmark, cells = mean +- sample std over seeds of the final metrics with the number of seeds, as Markdown,
CSV and a plot. Unfinished runs, repeated or differing seeds and runs whose settings differ inside a cell
are shown in the output, never averaged in silently."""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field

from ..config import Config, alters_results
from ..core.metrics import aggregate_over_seeds
from .report import (
    BENCHMARK_KEY,
    FINAL_METRICS,
    SEED_KEY,
    TASKS_KEY,
    VAL_FRACTION_KEY,
    VAL_SEED_KEY,
    ReportError,
    ComparedRun,
)

DEFAULT_GROUP_BY = ("method.name",)
# Short names of the metrics in the Markdown header (every accuracy says which definition it is).
SHORT = {"final_accuracy": "A_T pooled", "final_accuracy_task_mean": "A_T task-mean",
         "average_incremental_accuracy": "A_avg pooled", "average_incremental_accuracy_task_mean": "A_avg task-mean",
         "forgetting": "F"}
UNSET = "(unset)"
LEGEND = ("A_T: final accuracy (after the last task), A_avg: average incremental accuracy (the mean over tasks of "
          "the accuracy after each), F: forgetting, all in %. pooled: correct / total over the test images of all "
          "seen tasks together (as InfLoRA and SD-LoRA report it); task-mean: the mean over the seen tasks of each "
          "one's accuracy (as L2P, DualPrompt and CODA-Prompt report it). Mean +- sample std over the runs (seeds) "
          "of each cell; n: runs averaged. Only runs that finished every task count. Accuracies are on the test "
          "images, except in columns marked \"validation\": runs with data.val_fraction (a sweep's trials), "
          "measured on images held out of the training data.")
# Keys that name or label runs rather than configure them (besides those that cannot alter results).
_LABELS = {SEED_KEY, BENCHMARK_KEY, TASKS_KEY, "experiment.name"}


@dataclass
class Cell:
    """The runs of one group on one benchmark: those averaged and those left out, and what to flag."""
    runs: list[ComparedRun] = field(default_factory=list)
    left_out: list[ComparedRun] = field(default_factory=list)
    notes: list[int] = field(default_factory=list)  # numbers of the table's notes about this cell

    def stats(self) -> dict[str, float]:
        """``<metric>_mean`` / ``<metric>_std`` over the runs (:func:`aggregate_over_seeds`)."""
        return aggregate_over_seeds([r.summary() for r in self.runs])

    def count(self, metric: str) -> int:
        """How many runs have a value of ``metric`` (forgetting is undefined for a single task)."""
        return sum(not math.isnan(r.summary()[metric]) for r in self.runs)

    def seeds(self) -> list[str]:
        """The seeds of the runs averaged, in order (a repeated seed appears as often as it was run)."""
        return sorted((r.seed for r in self.runs), key=lambda s: (len(s), s))


@dataclass
class Table:
    """Rows (tuples of group values) x columns ((benchmark, number of tasks, eval split)) of :class:`Cell`:
    accuracies measured on validation images never share a column with test accuracies."""
    group_by: tuple[str, ...]
    cells: dict[tuple[tuple[str, ...], tuple[str, int, str]], Cell]
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[tuple[str, ...]]:
        """The rows in order, numbers by value (rank 4 before rank 16)."""
        return sorted({r for r, _ in self.cells}, key=lambda row: tuple(_order(v) for v in row))

    @property
    def columns(self) -> list[tuple[str, int, str]]:
        """(benchmark, tasks, split), the test columns of a benchmark before its validation ones."""
        return sorted({c for _, c in self.cells}, key=lambda c: (c[0], c[1], c[2] != "test"))

    def ordered(self) -> list[tuple[tuple[str, ...], tuple[str, int, str], Cell]]:
        """The cells with their row and column, row by row."""
        return [(r, c, self.cells[(r, c)]) for r in self.rows for c in self.columns if (r, c) in self.cells]

    def left_out(self) -> list[tuple[tuple[str, ...], tuple[str, int, str], ComparedRun]]:
        """Every run not averaged in, with its row and column."""
        return [(r, c, run) for r, c, cell in self.ordered() for run in cell.left_out]

    def note(self, text: str, *cells: Cell) -> None:
        self.notes.append(text)
        for cell in cells:
            cell.notes.append(len(self.notes))


def _order(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _md(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def column_label(column: tuple[str, int, str]) -> str:
    """``digits (5 tasks)``, or ``digits (5 tasks, validation)`` for accuracies on held-out training images."""
    split = "" if column[2] == "test" else f", {column[2]}"
    return f"{column[0]} ({column[1]} tasks{split})"


def _label(row: tuple[str, ...]) -> str:
    return ", ".join(row)


def _settings_differ(runs: list[ComparedRun], group_by: tuple[str, ...]) -> dict[str, Counter]:
    """The settings (other than the group keys, the seed and keys that cannot alter results) on which
    ``runs`` disagree: ``{key: Counter(value -> runs)}``."""
    sections = tuple(f"{s}." for s in Config.model_fields)
    keys = {k for r in runs for k in r.params if k.startswith(sections)}
    out = {}
    for key in sorted(keys - set(group_by) - _LABELS):
        values = Counter(_setting(r, key) for r in runs)
        if len(values) > 1 and alters_results(key):
            out[key] = values
    return out


def _setting(run: ComparedRun, key: str) -> str:
    """``run``'s value of ``key`` as runs compare on it: the held-out settings of a run evaluated on the test set
    (``data.val_fraction`` unset or 0, or a run from before these settings existed) are all the same."""
    if key in (VAL_FRACTION_KEY, VAL_SEED_KEY) and run.eval_split == "test":
        return "(none held out)"
    return run.params.get(key, UNSET)


def _flag(table: Table) -> None:
    """Add the notes: repeated seeds and differing settings in a cell, seed sets that differ between rows."""
    for row, col, cell in table.ordered():
        where = f"{_label(row)}, {column_label(col)}"
        repeated = {s: n for s, n in Counter(r.seed for r in cell.runs).items() if n > 1}
        for seed, n in sorted(repeated.items()):
            names = ", ".join(r.name for r in cell.runs if r.seed == seed)
            table.note(f"{where}: seed {seed} appears {n} times ({names}); each run is averaged in", cell)
        differ = _settings_differ(cell.runs, table.group_by)
        if differ:
            listed = "; ".join(f"{k}: " + ", ".join(f"{v} ({n} run{'s' * (n > 1)})" for v, n in sorted(c.items()))
                               for k, c in differ.items())
            table.note(f"{where}: the runs differ in settings other than the group keys and the seed ({listed}); "
                       "they are averaged together: add these keys to --group-by, or select runs with --filter",
                       cell)
    for col in table.columns:
        cells = {row: table.cells[(row, col)] for row in table.rows if (row, col) in table.cells}
        sets = {row: list(dict.fromkeys(cell.seeds())) for row, cell in cells.items() if cell.runs}
        if len({tuple(s) for s in sets.values()}) > 1:
            listed = "; ".join(f"{_label(row)}: {', '.join(s)}" for row, s in sets.items())
            table.note(f"{column_label(col)}: the rows were averaged over different seeds ({listed})",
                       *(cells[row] for row in sets))


def build_table(runs: list[ComparedRun], group_by: tuple[str, ...] = DEFAULT_GROUP_BY) -> Table:
    """Group ``runs`` into rows (their values of the ``group_by`` keys) and columns (benchmark and number of
    tasks); finished runs are averaged, the others are kept as left out; the notes flag what to check."""
    if not runs:
        raise ReportError("no runs match: check the folders or the experiment and the filters")
    if not group_by:
        raise ReportError("--group-by: give at least one config key, e.g. method.name")
    known = {k for r in runs for k in r.params}
    unknown = [k for k in group_by if k not in known]
    if unknown:
        examples = ", ".join(sorted(k for k in known if k.startswith(("method.", "train.")))[:8])
        raise ReportError(f"--group-by {','.join(unknown)}: no run has this setting; give flat config keys such "
                          f"as {examples}")
    table = Table(tuple(group_by), {})
    for run in runs:
        key = (tuple(run.params.get(k, UNSET) for k in group_by),
               (run.params[BENCHMARK_KEY], run.num_tasks, run.eval_split))
        cell = table.cells.setdefault(key, Cell())
        (cell.runs if run.finished else cell.left_out).append(run)
    _flag(table)
    return table


def _pct(cell: Cell, metric: str) -> str:
    """Mean +- std in percent as text (the mean alone for one run, '-' for none)."""
    stats, n = cell.stats(), cell.count(metric)
    if f"{metric}_mean" not in stats:
        return "-"
    mean = f"{100 * stats[f'{metric}_mean']:.1f}"
    return f"{mean} +- {100 * stats[f'{metric}_std']:.1f}" if n > 1 else mean


def _n_text(cell: Cell) -> str:
    text = str(len(cell.runs))
    if cell.left_out:
        text += f" ({len(cell.left_out)} left out)"
    if cell.notes:
        text += " [" + ", ".join(f"note {i}" for i in cell.notes) + "]"
    return text


def to_markdown(table: Table) -> str:
    """The table as Markdown, followed by its notes and the runs left out."""
    head = [*table.group_by] + [f"{column_label(c)} {h}" for c in table.columns for h in (*SHORT.values(), "n")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in table.rows:
        cells = []
        for col in table.columns:
            cell = table.cells.get((row, col))
            if cell is None:
                cells += [""] * len(SHORT) + ["0"]
                continue
            cells += [*(_pct(cell, metric) for metric in SHORT), _n_text(cell)]
        lines.append("| " + " | ".join([*map(_md, row), *cells]) + " |")
    lines += ["", LEGEND]
    if table.notes:
        lines += ["", "**Notes**", ""] + [f"{i}. {text}" for i, text in enumerate(table.notes, 1)]
    left = table.left_out()
    if left:
        lines += ["", "**Not included** (unfinished: not averaged in)", "",
                  "| run | group | benchmark | seed | status | tasks done |", "|---|---|---|---|---|---|"]
        lines += [f"| {_md(run.name)} | {_md(_label(row))} | {column_label(col)} | {run.seed} | {_md(run.status)} | "
                  f"{run.tasks_done}/{run.num_tasks} |" for row, col, run in left]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("benchmark", "num_tasks", "split", "metric", "mean_pct", "std_pct", "n", "seeds", "left_out", "notes")


def to_csv(table: Table) -> str:
    """The table in long form: one line per group x benchmark x metric (columns: the group keys, then
    :data:`CSV_COLUMNS`; ``metric`` is the key of metrics.json: ``final_accuracy`` and
    ``average_incremental_accuracy`` pooled, ``..._task_mean`` task-mean; mean and std in %, std empty for a
    single run, seeds space-separated; ``split``: test, or validation for images held out of the training data)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*table.group_by, *CSV_COLUMNS])
    for row, (bench, tasks, split), cell in table.ordered():
        stats = cell.stats()
        for metric in FINAL_METRICS:
            n = cell.count(metric)
            mean = f"{100 * stats[f'{metric}_mean']:.4f}" if f"{metric}_mean" in stats else ""
            std = f"{100 * stats[f'{metric}_std']:.4f}" if n > 1 else ""
            writer.writerow([*row, bench, tasks, split, metric, mean, std, n, " ".join(cell.seeds()), len(cell.left_out),
                             " ".join(map(str, cell.notes))])
    return out.getvalue()


def curves(table: Table) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Pooled accuracy (%) after each task per column and row: ``{column: {row: (means, stds)}}`` over the
    finished runs (std 0 for a single run)."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for row, col, cell in table.ordered():
        if not cell.runs:
            continue
        per_task = list(zip(*(r.pooled for r in cell.runs)))
        means = [100 * statistics.fmean(v) for v in per_task]
        stds = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_task]
        out.setdefault(column_label(col), {})[_label(row)] = (means, stds)
    return out


def write_outputs(table: Table, folder: str) -> dict[str, str]:
    """``table.md``, ``table.csv`` and ``accuracy_after_task.png`` in ``folder``; returns their paths by kind."""
    from .plots import plot_pooled_by_group

    paths = {kind: os.path.join(folder, name) for kind, name in
             (("markdown", "table.md"), ("csv", "table.csv"), ("plot", "accuracy_after_task.png"))}
    with open(paths["markdown"], "w") as f:
        f.write(to_markdown(table))
    with open(paths["csv"], "w") as f:
        f.write(to_csv(table))
    plot_pooled_by_group(curves(table), paths["plot"])
    return paths


def log_to_mlflow(table: Table, cfg: Config, name: str, files: list[str]) -> str:
    """A parent run ``name`` in the experiment of ``cfg`` (``tracking.uri``, ``tracking.experiment``) holding
    ``files`` as artifacts and the counts of runs as metrics; returns its run id. It is tagged
    ``report=parent`` (and ``seed=parent``), so no report counts it as a run."""
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run ..." lines: stdout is the table
        return _log(table, cfg, name, files)


def _log(table: Table, cfg: Config, name: str, files: list[str]) -> str:
    from .mlflow_runs import start_parent

    runs = [r for cell in table.cells.values() for r in cell.runs]
    left = table.left_out()

    def values(key: str) -> str:
        return ",".join(sorted({r.params.get(key, UNSET) for r in runs} or {UNSET}))

    tracker = start_parent(cfg, name, params={"group_by": ",".join(table.group_by), "notes": len(table.notes)},
                           tags={"report": "parent", "seed": "parent", "method": values("method.name"),
                                 "benchmark": values(BENCHMARK_KEY), "num_tasks": values(TASKS_KEY),
                                 "model": values("model.name")})
    tracker.finish_parent({"runs_averaged": len(runs), "runs_left_out": len(left)}, files=tuple(files))
    if tracker.lost:
        raise RuntimeError(f"logging the report to MLflow failed: {tracker.lost}")
    return tracker.run_id
