"""Results tables: this run's measured numbers beside the paper's, one CSV per paper table.

Schema (docs/design.md, "Results tables"; results/reference/README.md). Long
format, one row per (model, metric); the fixed columns, in this order::

    table   the table's name = the CSV's stem, e.g. "table2_linear_knn"
    method  paper rows: the method as the paper labels it ("DINO", ...);
            measured rows: the checkpoint's name
    arch    backbone name as this project spells it ("vit_small", "resnet50")
    patch   patch size as text ("16", "8"); "" for convnets
    metric  one of the table's metrics (below)
    value   float, in percent (0-100) like the paper: evaluators returning
            fractions must multiply by 100 before calling `measured_rows`
    source  "paper" (read from results/reference/) or "measured" (this run)

followed by the table's descriptive columns, if any (read from the reference
CSV's header): ``train_data`` (table3_retrieval, table5_davis), ``dim`` and
``resolution`` (table4_copy_detection), ``mass`` (voc_attention_jaccard).
Every column except ``value`` is text.

A table's metrics are those its reference CSV holds, plus the few in
`MEASURED_ONLY_METRICS`: numbers our evaluators compute anyway and the paper
does not report (top-5, revisitop "easy", DAVIS recall/decay). They have no
paper row to compare with, but are worth keeping. Retrieval also accepts
``<dataset>_mAP_<protocol>`` for any other dataset (`MEASURED_ONLY_PATTERNS`:
the embedded suite's ``rsynth``), listed after the paper's metrics.

``results/<run>/<table>.csv`` lists the measured rows first (grouped by
checkpoint, metrics in the table's order), then the paper's rows in the
paper's own order. Measured first because they are what the user just
produced and what ``head`` shows; the paper's order is kept intact because it
carries meaning (Table 2 groups models by size and throughput) that sorting
by arch would scramble. `format_table` pivots to one line per model, so a
measured ``vit_small/16`` line reads directly against the paper's.

    rows = measured_rows("table2_linear_knn", "my_run", "vit_small", 16,
                         {"knn_top1": 71.3})
    write_table("results/my_run", "table2_linear_knn", rows)
    print(format_table(read_table("results/my_run/table2_linear_knn.csv")))

Command line: ``python -m evaluate.results_table TABLE [--run results/<run>]``
prints the paper's table, or the run's table when ``--run`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from pathlib import Path

import pandas as pd

from common.atomic import atomic_write_text
from common.errors import UserError, run_cli

FIXED_COLUMNS = ("table", "method", "arch", "patch", "metric", "value", "source")
TABLES = ("table2_linear_knn", "table3_retrieval", "table4_copy_detection",
          "table5_davis", "voc_attention_jaccard")
# Metrics our evaluators report that the paper's table does not (no paper row).
MEASURED_ONLY_METRICS = {
    "table2_linear_knn": ("linear_top5", "knn_top5"),
    "table3_retrieval": ("roxford5k_mAP_easy", "rparis6k_mAP_easy"),
    "table4_copy_detection": (),
    "table5_davis": ("J_recall", "J_decay", "F_recall", "F_decay"),
    "voc_attention_jaccard": (),
}
# Measured-only metrics named by a pattern: retrieval on any revisitop-layout dataset
# (the embedded suite's "rsynth", a user's own), <dataset>_mAP_<protocol>.
MEASURED_ONLY_PATTERNS = {"table3_retrieval": re.compile(r"[A-Za-z0-9_-]+_mAP_(easy|medium|hard)")}
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "results" / "reference"
PAPER, MEASURED = "paper", "measured"


def check_table(table: str) -> str:
    """Return ``table`` if it names a results table; otherwise raise a one-line UserError."""
    if table not in TABLES:
        raise UserError(f"unknown results table '{table}': valid tables are {', '.join(TABLES)}")
    return table


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a results or reference CSV: every column text except ``value`` (float).

    Raises UserError when the file is missing, empty, lacks a schema column
    or holds a value that is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results table '{path}' does not exist: run the evaluator first")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"results table '{path}' is not a readable CSV ({type(error).__name__}): "
                        "delete it and re-run the evaluator") from None
    missing = [column for column in FIXED_COLUMNS if column not in frame.columns]
    if missing or list(frame.columns[:len(FIXED_COLUMNS)]) != list(FIXED_COLUMNS):
        raise UserError(f"results table '{path}' does not start with the columns "
                        f"{', '.join(FIXED_COLUMNS)}: delete it and re-run the evaluator")
    values = pd.to_numeric(frame["value"], errors="coerce")
    if values.isna().any():
        bad = frame["value"][values.isna()].iloc[0]
        raise UserError(f"results table '{path}' holds a value that is not a number ('{bad}'): "
                        "delete it and re-run the evaluator")
    frame["value"] = values.astype(float)
    return frame


def load_reference(table: str, reference_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The paper's rows of ``table`` (results/reference/<table>.csv), all with source 'paper'."""
    check_table(table)
    return read_table(Path(reference_dir or REFERENCE_DIR) / f"{table}.csv")


def extra_columns(reference: pd.DataFrame) -> list[str]:
    """The descriptive columns that follow the fixed ones (e.g. ``train_data``)."""
    return list(reference.columns[len(FIXED_COLUMNS):])


def valid_metrics(table: str, reference_dir: str | os.PathLike | None = None) -> list[str]:
    """Metric names accepted for ``table``: the paper's (in the paper's order), then measured-only ones."""
    paper_metrics = list(dict.fromkeys(load_reference(table, reference_dir)["metric"]))
    return paper_metrics + [m for m in MEASURED_ONLY_METRICS[table] if m not in paper_metrics]


def measured_rows(table: str, method: str, arch: str, patch: int | str | None,
                  metrics: dict[str, float], reference_dir: str | os.PathLike | None = None,
                  **descriptors) -> pd.DataFrame:
    """Rows (source 'measured') for one checkpoint's ``{metric: value}`` on ``table``.

    ``method`` is the checkpoint's name, ``patch`` None/"" for convnets, values
    in percent. ``descriptors`` fill the table's descriptive columns (e.g.
    ``dim=1536, resolution="320x320"``; ``mass=0.6``); those not given are "".
    An unknown table, metric or descriptor is a UserError naming the valid ones.
    """
    reference = load_reference(table, reference_dir)
    allowed = valid_metrics(table, reference_dir)
    pattern = MEASURED_ONLY_PATTERNS.get(table)
    for metric in metrics:
        if metric not in allowed and not (pattern and pattern.fullmatch(metric)):
            also = f" or names matching {pattern.pattern}" if pattern else ""
            raise UserError(f"unknown metric '{metric}' for results table '{table}': "
                            f"valid metrics are {', '.join(allowed)}{also}")
    extras = extra_columns(reference)
    for name in descriptors:
        if name not in extras:
            valid = ", ".join(extras) if extras else "none"
            raise UserError(f"unknown column '{name}' for results table '{table}': valid descriptive "
                            f"columns are {valid}")
    if not metrics:
        raise ValueError("measured_rows needs at least one metric")
    method = str(method).strip()
    if not method or "\n" in method:
        raise ValueError(f"method (checkpoint name) must be one non-empty line, got {method!r}")
    rows = []
    for metric, value in metrics.items():
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric '{metric}' of '{method}' is {value}: an evaluator bug, not a result")
        rows.append({"table": table, "method": method, "arch": str(arch), "patch": _patch_text(patch),
                     "metric": metric, "value": value, "source": MEASURED,
                     **{name: _text(descriptors.get(name, "")) for name in extras}})
    return pd.DataFrame(rows, columns=list(reference.columns))


def write_table(run_dir: str | os.PathLike, table: str, rows: pd.DataFrame,
                reference_dir: str | os.PathLike | None = None) -> Path:
    """Write ``<run_dir>/<table>.csv``: measured rows, then the paper's; return its path.

    ``rows`` come from `measured_rows` (concatenate several checkpoints' if
    needed). Rows already measured in that file are kept, except those with
    the same identity as a new row (every column but ``value`` and
    ``source``): re-running a checkpoint replaces its numbers, other
    checkpoints' and other metrics' stay. Paper rows are re-read from the
    reference each time. The file is replaced atomically (temp file in the
    same folder, flush + fsync, os.replace), under an exclusive lock on
    ``.<table>.csv.lock`` so that evaluators writing the same table at once
    do not drop each other's rows.
    """
    reference = load_reference(table, reference_dir)
    columns = list(reference.columns)
    if set(rows.columns) != set(columns) or (len(rows) and (rows["source"] != MEASURED).any()):
        raise ValueError(f"rows for '{table}' must come from measured_rows (columns {columns})")
    if len(rows) and (rows["table"] != table).any():
        raise ValueError(f"rows for table '{rows['table'].iloc[0]}' passed to write_table('{table}')")
    path = Path(run_dir) / f"{table}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = [column for column in columns if column not in ("value", "source")]
    with _exclusive_lock(path.with_name(f".{path.name}.lock")):
        previous = _previous_measured(path, columns)
        new_keys = set(rows[identity].itertuples(index=False, name=None))
        previous = previous[[key not in new_keys for key in previous[identity].itertuples(index=False, name=None)]]
        measured = _frames([previous, rows[columns]], columns)
        metric_rank = {metric: rank for rank, metric in enumerate(valid_metrics(table, reference_dir))}
        measured = measured.assign(_rank=measured["metric"].map(metric_rank).fillna(len(metric_rank)))
        measured = measured.sort_values(["method", "arch", "patch", *identity[5:], "_rank"], kind="stable")
        combined = _frames([measured.drop(columns="_rank"), reference], columns)
        atomic_write_text(path, combined.to_csv(index=False))
    return path


def has_measured(run_dir: str | os.PathLike, table: str, method: str,
                 metrics: list[str] | tuple[str, ...] | None = None) -> bool:
    """True when ``<run_dir>/<table>.csv`` already holds measured rows of checkpoint
    ``method`` for every metric in ``metrics`` (any metric when None): lets
    eval-all skip evaluators whose results are there."""
    path = Path(run_dir) / f"{check_table(table)}.csv"
    if not path.is_file():
        return False
    frame = read_table(path)
    done = set(frame.loc[(frame["source"] == MEASURED) & (frame["method"] == method), "metric"])
    return bool(done) if metrics is None else set(metrics) <= done


def format_table(frame: pd.DataFrame) -> str:
    """An aligned text table: one line per model (source, method, arch, patch,
    descriptive columns), one column per metric; '-' where a model has no value.
    Paper values print with 1 decimal as in the paper, measured ones with 2."""
    extras = [column for column in frame.columns if column not in FIXED_COLUMNS]
    identity = ["source", "method", "arch", "patch", *extras]
    metrics = list(dict.fromkeys(frame["metric"]))
    tables = list(dict.fromkeys(frame["table"]))
    if len(tables) == 1 and tables[0] in TABLES:  # metric columns in the table's own order
        try:
            order = valid_metrics(tables[0])
        except UserError:  # reference folder missing: keep the order of appearance
            order = metrics
        metrics = sorted(metrics, key=lambda m: order.index(m) if m in order else len(order))
    lines: dict[tuple, dict[str, str]] = {}
    for record in frame.to_dict("records"):
        digits = 1 if record["source"] == PAPER else 2
        cells = lines.setdefault(tuple(record[c] for c in identity), {})
        cells[record["metric"]] = f"{record['value']:.{digits}f}"
    header = identity + metrics
    body = [list(key) + [cells.get(metric, "-") for metric in metrics] for key, cells in lines.items()]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    numeric = [False] * len(identity) + [True] * len(metrics)

    def render(cells):
        return "  ".join(str(cell).rjust(width) if right else str(cell).ljust(width)
                         for cell, width, right in zip(cells, widths, numeric)).rstrip()

    title = ", ".join(tables) or "(empty table)"
    return "\n".join([f"{title}  (percent; paper = Caron et al., ICCV 2021)", render(header),
                      render(["-" * width for width in widths]), *map(render, body)])


def _previous_measured(path: Path, columns: list[str]) -> pd.DataFrame:
    """Measured rows already in ``path`` (none if absent), conformed to ``columns``."""
    if not path.exists():
        return pd.DataFrame(columns=columns)
    previous = read_table(path)
    previous = previous[previous["source"] == MEASURED]
    return previous.reindex(columns=columns, fill_value="")


def _frames(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """Concatenate row frames (skipping empty ones, which pandas warns about) in ``columns`` order."""
    frames = [frame[columns] for frame in frames if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path):
    """Hold an advisory exclusive lock on ``lock_path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no concurrent writers to guard against in practice
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _patch_text(patch) -> str:
    """Patch size as the CSVs hold it: "" for convnets, else a positive integer's digits."""
    if patch is None or patch == "":
        return ""
    if isinstance(patch, bool) or int(patch) != float(patch) or int(patch) <= 0:
        raise ValueError(f"patch must be a positive integer or None, got {patch!r}")
    return str(int(patch))


def _text(value) -> str:
    """A descriptive cell as text (1536 -> "1536", 0.6 -> "0.6")."""
    return "" if value is None else str(value)


def main(argv=None) -> None:
    """Print the paper's table, or a run's (``--run results/<run>``), as aligned text."""
    parser = argparse.ArgumentParser(prog="python -m evaluate.results_table", description=main.__doc__)
    parser.add_argument("table", help=f"one of: {', '.join(TABLES)}")
    parser.add_argument("--run", default=None, help="results folder of a run (results/<run>)")
    args = parser.parse_args(argv)
    check_table(args.table)
    frame = read_table(Path(args.run) / f"{args.table}.csv") if args.run else load_reference(args.table)
    print(format_table(frame))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
