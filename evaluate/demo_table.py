"""The README's demo table, regenerated from ``demo_results.json`` files of demo runs (one per seed).

    python -m evaluate.demo_table runs/demo runs/demo-seed1 runs/demo-seed2

prints one Markdown table: for each headline metric of `evaluate.demo`, the
first run's random init, DINO and difference, then the differences of every
run and their range; then the emergence rows (`evaluate.emergence`): 20-NN
of teacher and student, mean pairwise cosine, effective rank, best head's
share of [CLS] attention on the objects against the object area; then the
collapse warnings of each run's training log and what the run cost. Nothing
is typed by hand: the README pastes this output under the command that
produced it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import UserError, run_cli

from .emergence import RANDOM_TWIN, STUDENT, TEACHER

RESULTS_FILE = "demo_results.json"
# headline metrics of the demo, in table order: key in demo_results["metrics"] -> label
METRICS = {"knn_top1": "20-NN top-1", "linear_top1": "linear top-1",
           "rsynth_mAP_medium": "retrieval mAP Medium", "rsynth_mAP_hard": "retrieval mAP Hard",
           "copydays_strong_mAP": "copy detection mAP (strong)", "J&F_mean": "DAVIS J&F",
           "voc12_jaccard": "VOC attention Jaccard"}
# emergence rows: (key in a diagnosis, label, models shown)
EMERGENCE = (("knn20_top1", "20-NN top-1: teacher minus student", (STUDENT,)),
             ("mean_pairwise_cosine", "mean pairwise cosine of val [CLS]", (RANDOM_TWIN, TEACHER)),
             ("effective_rank", "effective rank of val [CLS]", (RANDOM_TWIN, TEACHER)),
             ("best_head_object_share", "best head's attention on objects (%)", (RANDOM_TWIN, TEACHER)),
             ("object_area", "object area (%) = uniform attention", (RANDOM_TWIN,)))


def read_run(folder) -> dict:
    """A demo run's results, plus ``seed``, the training log's collapse ``warnings`` and ``images_per_second``."""
    folder = Path(folder)
    try:
        results = json.loads((folder / RESULTS_FILE).read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"'{folder}' is not a finished demo run ({error}): run python -m evaluate.demo "
                        f"--output-dir {folder} first") from None
    warnings, speed = [], None
    log = folder / "log.jsonl"
    for line in (log.read_text().splitlines() if log.is_file() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "warning" and "collapse" in str(record.get("message", "")):
            warnings.append(record["message"])
        if record.get("kind") == "summary" and record.get("images_per_second"):
            speed = record["images_per_second"]
    return {**results, "seed": config.get("seed"), "warnings": warnings, "images_per_second": speed}


def _range(values: list[float]) -> str:
    """'+a' for one value, '+min … +max' for several."""
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{min(values):+.2f} … {max(values):+.2f}"


def markdown_table(runs: list[dict]) -> str:
    """The table (see the module docstring); ``runs[0]`` gives the random/DINO columns."""
    first = runs[0]
    seeds = ", ".join(str(run["seed"]) for run in runs)
    lines = [f"| metric | random init | DINO | difference | difference, seeds {seeds} |", "|---|---|---|---|---|"]
    for key, label in METRICS.items():
        row = first["metrics"].get(key)
        if row is None:
            continue
        differences = [run["metrics"][key]["difference"] for run in runs if key in run["metrics"]]
        lines.append(f"| {label} | {row[RANDOM_TWIN]:.2f} | {row[TEACHER]:.2f} | **{row['difference']:+.2f}** | "
                     f"{_range(differences)} |")
    emergence = first.get("emergence") or {}
    for key, label, models in EMERGENCE:
        if not all(emergence.get(model, {}).get(key) is not None for model in models):
            continue
        if models == (STUDENT,):  # the teacher's lead over its student, per run
            leads = [run["emergence"][TEACHER][key] - run["emergence"][STUDENT][key] for run in runs]
            lines.append(f"| {label} | | {leads[0]:+.2f} | | {_range(leads)} |")
        elif models == (RANDOM_TWIN,):
            lines.append(f"| {label} | {emergence[RANDOM_TWIN][key]:.2f} | | | |")
        else:
            values = {model: emergence[model][key] for model in models}
            differences = [run["emergence"][TEACHER][key] - run["emergence"][RANDOM_TWIN][key] for run in runs]
            lines.append(f"| {label} | {values[RANDOM_TWIN]:.2f} | {values[TEACHER]:.2f} | "
                         f"{values[TEACHER] - values[RANDOM_TWIN]:+.2f} | {_range(differences)} |")
    warnings = [len(run["warnings"]) for run in runs]
    lines.append(f"| collapse warnings in the training log | | {warnings[0]} | | {', '.join(map(str, warnings))} |")
    return "\n".join(lines)


def cost_line(runs: list[dict]) -> str:
    """One line: each run's pretraining and total time, and its training speed."""
    parts = []
    for run in runs:
        seconds = run.get("seconds", {})
        speed = f", {run['images_per_second']:.0f} images/s" if run.get("images_per_second") else ""
        parts.append(f"seed {run['seed']}: pretraining {seconds.get('pretraining', 0):.0f} s{speed}, "
                     f"whole demo {run.get('seconds_total', 0):.0f} s")
    return "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluate.demo_table",
                                     description="the README's demo table from demo runs (first run: the columns)")
    parser.add_argument("runs", nargs="+", help="demo run folders (each holding demo_results.json)")
    args = parser.parse_args(argv)
    runs = [read_run(folder) for folder in args.runs]
    print(markdown_table(runs))
    print()
    print(cost_line(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
