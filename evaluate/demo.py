"""``make demo``: the whole pipeline on the CPU in a few minutes (about 8 on 2 cores, most of it pretraining).

1. generate the embedded suite, every part (``data/suite``; skipped when up to date),
2. pretrain the ``demo`` preset on its classification train split in ``runs/demo``: a run folder
   left by an interrupted demo with the same config and the same suite is resumed (a finished one is
   kept as it is); any other is replaced by a fresh run (`prepare_run_folder`),
3. run `evaluate.eval_all` -- k-NN, linear probe, retrieval, copy detection,
   DAVIS propagation, VOC attention masks, with the suite-scaled settings of
   `evaluate.eval_plan` (the linear probe on cached features) -- first for
   the run's random twin (a random initialisation of the same architecture
   drawn with the same seed: the student's own starting weights), then for
   the trained teacher, both into ``results/<run>`` (recomputed from
   scratch: ``force``),
4. print one table, one row per metric: random init, DINO, their difference,
   and each evaluator's time for both models,
5. the emergence diagnosis (`evaluate.emergence.diagnose`: 20-NN top-1,
   feature geometry, [CLS] attention on the objects) of the random twin, the
   trained teacher and the trained student, printed as a second table (the
   k-NN features of the twin and the teacher are read back from eval-all's
   cache); save everything in ``<run>/demo_results.json`` (``knn_k20`` and
   ``margin_top1`` as before, plus ``metrics``, ``emergence`` {model:
   diagnosis} and ``seconds``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common.atomic import atomic_write_text
from common.errors import UserError, one_line_message, run_cli
from data import suite as suite_cli
from pretrain import train as train_cli
from pretrain.config import to_dict

from .emergence import RANDOM_TWIN, STUDENT, TEACHER, diagnose, format_diagnoses
from .eval_all import Outcome, evaluate_all
from .eval_plan import EvalOptions
from .features import FeatureExtractor, default_device
from .model_source import load_model_source, run_name

RANDOM, DINO = RANDOM_TWIN, TEACHER


def headline(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    """{metric: {evaluator, seconds}} for the headline metrics of the evaluators that produced numbers."""
    return {metric: {"evaluator": outcome.name, "value": outcome.metrics[metric], "seconds": outcome.seconds}
            for outcome in outcomes for metric in outcome.headline if metric in outcome.metrics}


def comparison(random_outcomes: list[Outcome], dino_outcomes: list[Outcome]) -> dict[str, dict]:
    """{metric: {random init, DINO (teacher), difference, evaluator, seconds {model: s}}} for the metrics both have."""
    random_rows, dino_rows = headline(random_outcomes), headline(dino_outcomes)
    rows = {}
    for metric, dino in dino_rows.items():
        if metric in random_rows:
            random = random_rows[metric]
            rows[metric] = {RANDOM: random["value"], DINO: dino["value"], "difference": dino["value"] - random["value"],
                            "evaluator": dino["evaluator"],
                            "seconds": {RANDOM: random["seconds"], DINO: dino["seconds"]}}
    return rows


def format_comparison(rows: dict[str, dict]) -> str:
    """One line per metric; an evaluator's times on its first metric's line."""
    lines = [f"{'metric':<22} {RANDOM:>11} {'DINO':>8} {'difference':>11}   time random / DINO",
             "-" * 78]
    seen = set()
    for metric, row in rows.items():
        times = "" if row["evaluator"] in seen else \
            f"   {row['evaluator']}: {row['seconds'][RANDOM]:.1f} s / {row['seconds'][DINO]:.1f} s"
        seen.add(row["evaluator"])
        lines.append(f"{metric:<22} {row[RANDOM]:>11.2f} {row[DINO]:>8.2f} {row['difference']:>+11.2f}{times}")
    return "\n".join(lines)


def evaluate_pair(checkpoint, suite_root, results=None, linear_epochs=None, seed: int = 0):
    """eval-all of the random twin, then of the trained teacher; print the comparison.

    Returns (the `comparison` rows, one line per failed evaluation).
    """
    options = EvalOptions(linear_epochs=linear_epochs, linear_cached=True)
    outcomes = {}
    for name, random_like, ckpt in ((RANDOM, checkpoint, None), (DINO, None, checkpoint)):
        subject = load_model_source(ckpt, random_like=random_like, seed=seed)
        outcomes[name] = evaluate_all(subject, suite_root, results, options, force=True, seed=seed,
                                      num_workers=0, progress=False)
    rows = comparison(outcomes[RANDOM], outcomes[DINO])
    print()
    print(format_comparison(rows))
    failed = [f"{o.name} ({name}): {o.message}" for name in outcomes for o in outcomes[name] if o.status == "failed"]
    for line in failed:
        print(f"FAILED {line}")
    return rows, failed


def emergence_of_run(checkpoint, suite_root, results=None, seed: int = 0):
    """The emergence diagnosis of the random twin (as `evaluate_pair` draws it), the trained teacher and the
    trained student, with eval-all's feature cache (``results``, default results/<run>); print the table.

    Returns ({model: diagnosis} of the models diagnosed, one line per model that failed).
    """
    cache = Path(results or Path("results") / run_name(str(checkpoint))) / "features"
    models = ((RANDOM, None, checkpoint, "teacher"), (DINO, checkpoint, None, "teacher"),
              (STUDENT, checkpoint, None, "student"))
    diagnoses, failed = {}, []
    for name, ckpt, random_like, key in models:
        try:
            subject = load_model_source(ckpt, key=key, random_like=random_like, seed=seed)
            extractor = FeatureExtractor(subject.model, default_device(), num_workers=0, cache_dir=cache,
                                         progress=False)
            diagnoses[name] = diagnose(extractor, suite_root, subject.train_args)
        except UserError as error:
            failed.append(f"emergence ({name}): {one_line_message(error)}")
    print()
    print(format_diagnoses(diagnoses))
    for line in failed:
        print(f"FAILED {line}")
    return diagnoses, failed


RUN_RECORD = "demo_run.json"


def prepare_run_folder(output_dir: Path, train_args: list[str], suite_root) -> bool:
    """Keep ``output_dir`` when it holds a demo run of exactly this config on exactly this suite (so the
    trainer resumes it, or finds it finished); else remove it and record what the new run is. True: kept.

    What identifies a run is written to ``<output_dir>/demo_run.json`` before training starts: the
    resolved training config and the classification part's SUITE.json (its generator version included).
    """
    try:
        suite = json.loads((Path(suite_root) / "classification" / "SUITE.json").read_text())
    except (OSError, ValueError):
        suite = None  # not a generated suite: the config alone identifies the run
    identity = {"config": to_dict(train_cli.resolved_config(train_args)), "suite": suite}
    identity = json.loads(json.dumps(identity))  # tuples as JSON lists, as read back
    record = output_dir / RUN_RECORD
    try:
        kept = json.loads(record.read_text()) == identity
    except (OSError, ValueError):
        kept = False
    if not kept:
        if output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True)
        atomic_write_text(record, json.dumps(identity, indent=2))
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CPU demo: suite -> DINO pretraining -> six evaluations "
                                                 "of random init vs the trained teacher -> emergence diagnosis")
    parser.add_argument("--suite", default="data/suite")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--results", default=None, help="eval-all folder (default results/<run>)")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo preset's epochs")
    parser.add_argument("--linear-epochs", type=int, default=None, help="default: the suite's (100)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the pretraining (initial weights, crops) and of the evaluations")
    parser.add_argument("--suite-seed", type=int, default=0,
                        help="seed of the generated suite (the same suite for every --seed by default)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the run folder and pretrain from scratch (default: resume an interrupted "
                             "demo run of the same config)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    print("[1/4] embedded suite", flush=True)
    suite_cli.main(["--out", args.suite, "--seed", str(args.suite_seed), "--no-progress"])
    suite_seconds = time.perf_counter() - started

    print("[2/4] DINO pretraining (preset 'demo')", flush=True)
    output_dir = Path(args.output_dir)
    classification = Path(args.suite) / "classification"
    train_args = ["--preset", "demo", "--data", str(classification / "train"), "--knn-data", str(classification),
                  "--output-dir", str(output_dir), "--seed", str(args.seed)]
    if args.epochs:
        train_args += ["--epochs", str(args.epochs)]
    if args.fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    if prepare_run_folder(output_dir, train_args, args.suite):
        print(f"keeping the demo run in {output_dir} (same config and suite: an interrupted run resumes, a "
              "finished one is reused; --fresh starts over)", flush=True)
    train_cli.main(train_args)
    train_seconds = time.perf_counter() - started - suite_seconds

    print("[3/4] six evaluations, random init then the trained teacher", flush=True)
    rows, failed = evaluate_pair(output_dir / "checkpoint.pth", args.suite, args.results, args.linear_epochs,
                                 args.seed)
    eval_seconds = time.perf_counter() - started - suite_seconds - train_seconds
    print("[4/4] emergence: random init, the trained teacher and student", flush=True)
    diagnoses, emergence_failed = emergence_of_run(output_dir / "checkpoint.pth", args.suite, args.results,
                                                   args.seed)
    failed += emergence_failed
    total = time.perf_counter() - started
    emergence_seconds = total - suite_seconds - train_seconds - eval_seconds
    print(f"suite {suite_seconds:.0f} s | pretraining {train_seconds:.0f} s | evaluation {eval_seconds:.0f} s "
          f"(both models) | emergence {emergence_seconds:.0f} s (three models) | total {total:.0f} s")
    knn = {name: {"top1": rows.get("knn_top1", {}).get(name), "top5": rows.get("knn_top5", {}).get(name)}
           for name in (RANDOM, DINO)}
    atomic_write_text(output_dir / "demo_results.json", json.dumps(
        {"knn_k20": knn, "margin_top1": rows.get("knn_top1", {}).get("difference"), "metrics": rows,
         "emergence": diagnoses, "failed": failed,
         "seconds": {"suite": suite_seconds, "pretraining": train_seconds, "evaluation": eval_seconds,
                     "emergence": emergence_seconds},
         "seconds_total": total}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
