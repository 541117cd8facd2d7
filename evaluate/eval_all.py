"""Every evaluation of one model, written as the paper's tables: ``make eval-all``.

    python -m evaluate.eval_all --ckpt runs/demo/checkpoint.pth                 # the embedded suite
    python -m evaluate.eval_all --ckpt dino_vits16.pth --data-root /data/dino  # real datasets
    python -m evaluate.eval_all --ckpt random --arch vit_small --patch 16      # a random initialisation
    python -m evaluate.eval_all --random-like runs/demo/checkpoint.pth         # that run's random twin

Which evaluators run, on which folders, with which settings (the paper's on
real data, scaled ones on the embedded suite): `evaluate.eval_plan`. Each
evaluator is the module's own ``run_*`` function (knn, linear, retrieval,
copy_detection, video_segmentation, attention_masks). The model and extraction
flags are every evaluator's (`evaluate.model_source`); ``--cache-dir`` defaults
to ``<out>/features``.

Outputs, in ``--out`` (default ``results/<run>``, the run of ``--random-like``
for a twin, so both land in one table):

* ``<table>.csv``: `evaluate.results_table` rows, this model's measured rows
  (method = the run's name, or ``random init (<arch>)``) beside the paper's;
  written as soon as each evaluator finishes, so an interrupted run keeps
  what it has done. The tables' descriptive columns say what they can:
  ``train_data`` = the model's pretraining data ("suite" for the embedded
  suite, "none (random init)"), ``resolution`` / ``dim`` for copy detection,
  ``mass`` for VOC.
* ``eval_all/<method>.json``: per evaluator its data, settings, weights
  fingerprint, every number it returned (k-NN for all k, per-block Copydays
  mAP, ...) and its time.
* ``features/``: the feature cache (`evaluate.features`), ``davis/`` (or
  ``davis-random-init/``): the DAVIS predictions.

Re-runs: an evaluator is skipped when the table holds this method's metrics
and its record matches (same data, settings and weights); ``--force``
recomputes everything (features included). A part whose layout is broken is
reported in one line and the others still run; the exit status is then 1,
after a summary of the failures. A checkpoint that does not load: one line,
exit 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.atomic import atomic_write_text
from common.errors import UserError, one_line_message, run_cli
from common.run_lock import RunLock

from . import results_table as rt
from .attention_masks import run_attention_masks
from .copy_detection import run_copy_detection
from .eval_plan import KINDS, KNN_TABLE_K, EvalOptions, Evaluation, plan
from .features import FeatureExtractor
from .knn import run_knn
from .linear import run_linear
from .model_source import ModelSource, add_extraction_arguments, add_model_arguments, load_model
from .retrieval import run_retrieval
from .video_segmentation import PropagationOptions, run_video_segmentation


@dataclass
class Context:
    """How to run: output folder, extractor (device, batch, feature cache, progress bars), force, seed.
    ``subject``: the model under evaluation (`evaluate.model_source.load_model`)."""
    out: Path
    extractor: FeatureExtractor
    subject: ModelSource
    force: bool = False
    seed: int = 0


def _knn(evaluation: Evaluation, context: Context):
    settings = evaluation.settings
    results = run_knn(context.extractor, evaluation.data, settings["image_size"], ks=tuple(settings["ks"]),
                      temperature=settings["temperature"])
    top1, top5 = results[KNN_TABLE_K]
    return {"knn_top1": top1, "knn_top5": top5}, {f"k{k}": {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()}


def _linear(evaluation: Evaluation, context: Context):
    """One probe per base lr of the settings; the best val top-1 is reported (the paper sweeps the lr)."""
    s = evaluation.settings
    results = {lr: run_linear(context.extractor, evaluation.data, s["image_size"], epochs=s["epochs"],
                              batch_size=s["batch_size"], base_lr=lr, augment=not s["cached_features"],
                              seed=context.seed) for lr in s["base_lrs"]}
    best = max(results, key=lambda lr: results[lr].top1)
    return results[best].metrics(), {"base_lr": best, "best_epoch": results[best].best_epoch,
                                     "top1_per_base_lr": {str(lr): r.top1 for lr, r in results.items()}}


def _retrieval(evaluation: Evaluation, context: Context):
    s = evaluation.settings
    return run_retrieval(context.extractor, evaluation.data, s["dataset"], s["imsize"], s["multiscale"]), {}


def _copy_detection(evaluation: Evaluation, context: Context):
    s = evaluation.settings
    result = run_copy_detection(context.extractor, evaluation.data, s["imsize"], s["distractors"], s["whitening"])
    details = {key: value for key, value in result.items() if key != "copydays_strong_mAP"}
    return {"copydays_strong_mAP": result["copydays_strong_mAP"]}, details


def _davis(evaluation: Evaluation, context: Context):
    options = PropagationOptions(evaluation.settings["frame_height"], evaluation.settings["side_multiple"])
    output = context.out / ("davis-random-init" if context.subject.random else "davis")
    scores = run_video_segmentation(context.subject.model, evaluation.data, output, options=options,
                                    force=context.force, device=context.extractor.device,
                                    progress=context.extractor.progress)
    return scores, {"predictions": str(output)}


def _voc(evaluation: Evaluation, context: Context):
    s = evaluation.settings
    scores = run_attention_masks(context.subject.model, evaluation.data, "val", s["masks"], s["image_size"],
                                 s["resize"], s["mass"], context.extractor.batch_size,
                                 context.extractor.num_workers, context.extractor.device,
                                 progress=context.extractor.progress)
    return scores, {}


RUNNERS = {"knn": _knn, "linear": _linear, "retrieval": _retrieval, "copy_detection": _copy_detection,
           "davis": _davis, "voc": _voc}
assert set(RUNNERS) == set(KINDS)


@dataclass
class Outcome:
    """What happened to one evaluator: status 'done', 'skipped' or 'failed'; ``headline``: its main metrics."""
    name: str
    table: str
    status: str
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    headline: tuple[str, ...] = ()


def record_path(out: Path, method: str) -> Path:
    return out / "eval_all" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', method).strip('_') or 'model'}.json"


def read_records(path: Path) -> dict:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def is_stale(evaluation: Evaluation, context: Context, record: dict | None) -> bool:
    """A record exists but was made with other data, settings or weights."""
    return record is not None and (record.get("identity") != evaluation.identity()
                                   or record.get("weights") != context.subject.weights)


def is_done(evaluation: Evaluation, context: Context, record: dict | None) -> bool:
    """The table holds this method's metrics, and the record (if any) is not stale."""
    if is_stale(evaluation, context, record):
        return False
    metrics = list(record["metrics"]) if record and record.get("metrics") else list(evaluation.metrics)
    return rt.has_measured(context.out, evaluation.table, context.subject.method, metrics)


def run_evaluation(evaluation: Evaluation, context: Context, records: dict) -> Outcome:
    """Run one evaluator (or skip it), write its table rows and its record; never raises a UserError."""
    subject, headline = context.subject, evaluation.metrics[:3]
    record = records.get(evaluation.name)
    if not context.force and is_done(evaluation, context, record):
        record = record or {}
        return Outcome(evaluation.name, evaluation.table, "skipped", record.get("metrics", {}),
                       record.get("seconds", 0.0), headline=headline)
    started = time.perf_counter()
    try:  # stale outputs (DAVIS predictions of other weights) are replaced, not refused
        run_context = replace(context, force=context.force or is_stale(evaluation, context, record))
        metrics, details = RUNNERS[evaluation.kind](evaluation, run_context)
        seconds = time.perf_counter() - started
        rows = rt.measured_rows(evaluation.table, subject.method, subject.spec["arch"], subject.spec["patch"],
                                metrics, **evaluation.descriptors)
        rt.write_table(context.out, evaluation.table, rows)
    except UserError as error:
        return Outcome(evaluation.name, evaluation.table, "failed", message=one_line_message(error))
    records[evaluation.name] = {"table": evaluation.table, "identity": evaluation.identity(),
                                "weights": subject.weights, "metrics": metrics, "details": details,
                                "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = record_path(context.out, subject.method)
    atomic_write_text(path, json.dumps(records, indent=1, sort_keys=True) + "\n")
    return Outcome(evaluation.name, evaluation.table, "done", metrics, seconds, headline=headline)


def outcome_line(evaluation: Evaluation, outcome: Outcome) -> str:
    if outcome.status == "failed":
        return f"{evaluation.name:<22} FAILED  {outcome.message}"
    values = "  ".join(f"{metric} {outcome.metrics[metric]:.2f}" for metric in outcome.headline
                       if metric in outcome.metrics)
    when = "skipped (already in the table)" if outcome.status == "skipped" else f"{outcome.seconds:6.1f} s"
    return f"{evaluation.name:<22} {when}  {values}  [{evaluation.describe()}]"


def evaluate_all(subject: ModelSource, data_root, out=None, options: EvalOptions = EvalOptions(), force: bool = False,
                 seed: int = 0, batch_size: int | None = None, num_workers: int | None = None, fp32: bool = False,
                 progress: bool = True, log=print, device=None, cache_dir=None, cache: bool = True) -> list[Outcome]:
    """Plan, then run every evaluator of ``subject`` on ``data_root`` into ``out``; one line per evaluator.

    Features are cached in ``cache_dir`` (default ``<out>/features``; none when ``cache`` is false).
    Returns the outcomes, planning failures (a broken part) included as 'failed'.
    """
    out = Path(out or Path("results") / subject.run)
    evaluations, plan_failures = plan(data_root, subject.info(), options)
    extractor = FeatureExtractor(subject.model, device, batch_size, num_workers, fp32,
                                 cache_dir=(cache_dir or out / "features") if cache else None, progress=progress,
                                 refresh=force)
    context = Context(out, extractor, subject, force, seed)
    records = read_records(record_path(out, subject.method))
    log(f"eval-all: '{subject.method}' ({subject.spec['arch']}, patch {subject.spec['patch']}) "
        f"on {data_root} -> {out}")
    outcomes = []
    for part, message in plan_failures:
        outcomes.append(Outcome(part, "", "failed", message=message))
        log(f"{part:<22} FAILED  {message}")
    for evaluation in evaluations:
        outcome = run_evaluation(evaluation, context, records)
        outcomes.append(outcome)
        log(outcome_line(evaluation, outcome))
    return outcomes


def summary_tables(out: Path, subject: ModelSource, tables) -> str:
    """Each table's measured rows (every model in ``out``) and the paper's rows for the same arch/patch."""
    spec = subject.spec
    texts = []
    for table in dict.fromkeys(tables):
        path = Path(out) / f"{table}.csv"
        if not path.is_file():
            continue
        frame = rt.read_table(path)
        patch = "" if spec["patch"] is None else str(spec["patch"])
        same_model = (frame["arch"] == spec["arch"]) & (frame["patch"] == patch)
        texts.append(rt.format_table(frame[(frame["source"] == rt.MEASURED) | same_model]))
    return "\n\n".join(texts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.eval_all", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data-root", default="data/suite", help="folder holding the parts (default data/suite)")
    parser.add_argument("--out", default=None, help="results folder (default results/<run>)")
    parser.add_argument("--force", action="store_true", help="recompute what is already in --out")
    parser.add_argument("--only", nargs="+", default=None, choices=KINDS, help="run only these evaluators")
    parser.add_argument("--linear-epochs", type=int, default=None, help="linear probe epochs (default 100)")
    parser.add_argument("--linear-cached", type=int, choices=(0, 1), default=None,
                        help="1: cached un-augmented features (suite default), 0: augmented crops (paper)")
    add_extraction_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    options = EvalOptions(tuple(args.only) if args.only else None, args.linear_epochs,
                          None if args.linear_cached is None else bool(args.linear_cached))
    subject = load_model(args)
    out = Path(args.out or Path("results") / subject.run)
    with RunLock.acquire(out, "eval-all"):  # one writer per results folder
        outcomes = evaluate_all(subject, args.data_root, out, options, args.force, args.seed, args.batch_size,
                                args.num_workers, args.fp32, not args.no_progress, device=args.device,
                                cache_dir=args.cache_dir, cache=not args.no_cache)
    tables = [outcome.table for outcome in outcomes if outcome.status != "failed"]
    if tables:
        print()
        print(summary_tables(out, subject, tables))
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        print(f"\n{len(failed)} of {len(outcomes)} evaluations failed:")
        for outcome in failed:
            print(f"  {outcome.name}: {outcome.message}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
