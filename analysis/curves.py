"""Training curves from a run's ``log.jsonl``: schedules, loss, collapse monitors, teacher vs student k-NN.

    python -m analysis.curves --log runs/demo/log.jsonl [--out results/demo/figures]

The trainer writes one JSON object per line (`pretrain.trainer`): ``kind``
"step" every ``log_every_steps`` iterations (loss, lr, wd, teacher momentum
and temperature, and the collapse monitors of `pretrain.loss.DINOLoss`:
teacher entropy H(q) and KL(q || p)), "epoch" at each epoch's end (means,
and the k-NN monitor of teacher and student when it ran), "summary" at the
end. Three figures:

* ``training_curves.png``: loss, lr, weight decay, teacher momentum and
  teacher temperature against the iteration;
* ``collapse_monitors.png``: H(q) against its bounds 0 and ln K (the paper's
  collapse study: uniform collapse drives H to ln K, collapse to one
  dimension drives it to 0, and both drive the KL to 0) and KL(q || p);
* ``knn_teacher_student.png``: 20-NN top-1 of the teacher and the student at
  each monitored epoch (the paper observes the teacher ahead).

A run killed mid-write leaves a truncated last line: it is skipped with a
problem line, as is any other line that is not a JSON object; the figures
are drawn from the rest.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt

from common.errors import UserError, run_cli

from .figures import FigureFile, FigureSet, save_figure

SCHEDULES = (("loss", "loss"), ("lr", "learning rate"), ("wd", "weight decay"),
             ("teacher_momentum", "teacher momentum"), ("teacher_temp", "teacher temperature"))


@dataclass
class TrainingLog:
    """The records of one log.jsonl by kind, and one line per line that could not be read."""
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    summary: dict | None = None
    problems: list[str] = field(default_factory=list)


def read_log(path: str | Path) -> TrainingLog:
    """Parse ``path`` line by line; unreadable lines become problems (a truncated last one says so)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no training log at '{path}': pass the log.jsonl of a pretraining run (runs/<name>/log.jsonl)")
    log = TrainingLog()
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            why = "is truncated (the run was killed mid-write?)" if number == len(lines) else "is not a JSON object"
            log.problems.append(f"{path}: line {number} {why}: skipped")
            continue
        kind = record.get("kind")
        if kind == "step":
            log.steps.append(record)
        elif kind == "epoch":
            log.epochs.append(record)
        elif kind == "summary":
            log.summary = record
    if not log.steps and not log.epochs:
        raise UserError(f"'{path}' holds no step or epoch record: is it a log.jsonl written by pretrain.train?")
    return log


def series(records: list[dict], key: str, x_key: str = "iteration") -> tuple[list[float], list[float]]:
    """(x, y) of the records that have a finite ``key``."""
    pairs = [(record[x_key], record[key]) for record in records
             if isinstance(record.get(key), (int, float)) and math.isfinite(record[key]) and x_key in record]
    return [x for x, _ in pairs], [y for _, y in pairs]


def training_curves(log: TrainingLog):
    """One panel per schedule of `SCHEDULES` against the iteration; (figure, keys missing from the log)."""
    fig, axes = plt.subplots(1, len(SCHEDULES), figsize=(3.2 * len(SCHEDULES), 2.8))
    missing = []
    for axis, (key, label) in zip(axes, SCHEDULES):
        x, y = series(log.steps, key)
        if x:
            axis.plot(x, y, lw=1.2)
        else:
            missing.append(key)
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("iteration", fontsize=8)
        axis.tick_params(labelsize=7)
    fig.tight_layout()
    return fig, missing


def collapse_curves(log: TrainingLog, out_dim: int | None = None):
    """Teacher entropy (with 0 and ln K) and teacher-student KL against the iteration, or None if not logged."""
    x_h, entropy = series(log.steps, "teacher_entropy")
    x_kl, kl = series(log.steps, "teacher_student_kl")
    if not x_h:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 2.9))
    left.plot(x_h, entropy, lw=1.2, label="H(teacher)")
    left.axhline(0.0, color="grey", lw=0.8, ls=":")
    if out_dim:
        left.axhline(math.log(out_dim), color="tab:red", lw=0.8, ls="--", label=f"ln K (uniform), K={out_dim}")
    left.set_title("teacher output entropy", fontsize=9)
    left.legend(fontsize=7)
    right.plot(x_kl, kl, lw=1.2, color="tab:orange")
    right.axhline(0.0, color="grey", lw=0.8, ls=":")
    right.set_title("KL(teacher || student)", fontsize=9)
    for axis in (left, right):
        axis.set_xlabel("iteration", fontsize=8)
        axis.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def knn_curves(log: TrainingLog, k: int = 20):
    """Teacher and student k-NN top-1 per monitored epoch (x = epochs done), or None if the monitor never ran."""
    x_teacher, teacher = series(log.epochs, f"knn_top1_k{k}", "epoch")
    x_student, student = series(log.epochs, f"student_knn_top1_k{k}", "epoch")
    if not x_teacher and not x_student:
        return None
    fig, axis = plt.subplots(figsize=(4.5, 3))
    if x_teacher:
        axis.plot([e + 1 for e in x_teacher], teacher, marker="o", label="teacher")
    if x_student:
        axis.plot([e + 1 for e in x_student], student, marker="s", label="student")
    axis.set_xlabel("epochs done", fontsize=8)
    axis.set_ylabel(f"{k}-NN top-1 (%)", fontsize=8)
    axis.set_title(f"{k}-NN monitor: teacher vs student", fontsize=9)
    axis.legend(fontsize=7)
    fig.tight_layout()
    return fig


def curve_figures(log_path: str | Path, out_dir: str | Path, out_dim: int | None = None) -> FigureSet:
    """The three figures of the module docstring for ``log_path``, in ``out_dir``; what is missing is a problem."""
    log = read_log(log_path)
    out_dir = Path(out_dir)
    figures, problems = [], list(log.problems)
    fig, missing = training_curves(log)
    figures.append(FigureFile(save_figure(fig, out_dir / "training_curves.png"), "Training curves",
                              f"{len(log.steps)} logged steps, {len(log.epochs)} epochs"))
    if missing:
        problems.append(f"{log_path}: no {', '.join(missing)} in the step records")
    fig = collapse_curves(log, out_dim)
    if fig is None:
        problems.append(f"{log_path}: no collapse monitors logged (a run from before they were added)")
    else:
        figures.append(FigureFile(save_figure(fig, out_dir / "collapse_monitors.png"), "Collapse monitors",
                                  "Uniform collapse: entropy to ln K and KL to 0; collapse to one dimension: "
                                  "entropy and KL to 0 (paper, Fig. 7)."))
    fig = knn_curves(log)
    if fig is None:
        problems.append(f"{log_path}: no k-NN monitor in the epoch records (train with --knn-every N --knn-data DIR)")
    else:
        figures.append(FigureFile(save_figure(fig, out_dir / "knn_teacher_student.png"), "Teacher vs student k-NN",
                                  "Weighted 20-NN top-1 on the monitor's val split after each monitored epoch."))
    return FigureSet(figures, problems)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.curves", description="training curves from log.jsonl")
    parser.add_argument("--log", required=True, help="a run's log.jsonl")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: the log's folder)")
    parser.add_argument("--out-dim", type=int, default=None, help="K, for the ln K line (default: the run's config)")
    args = parser.parse_args(argv)
    log_path = Path(args.log)
    out_dim = args.out_dim
    config = log_path.parent / "config.json"
    if out_dim is None and config.is_file():
        out_dim = json.loads(config.read_text()).get("out_dim")
    result = curve_figures(log_path, args.out or log_path.parent, out_dim)
    for figure in result.figures:
        print(f"wrote {figure.path}")
    for problem in result.problems:
        print(f"warning: {problem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
