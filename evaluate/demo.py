"""``make demo``: the whole pipeline on the CPU in a few minutes.

1. generate the embedded classification suite (``data/suite/classification``),
2. pretrain the ``demo`` preset on its train split (fresh run in ``runs/demo``),
3. score weighted 20-NN top-1 of a random initialisation of the same
   architecture (the student's own starting weights) and of the trained
   teacher, and print them side by side.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from data.errors import run_cli
from data.suite import write_classification
from pretrain import train as train_cli
from pretrain.backbones import describe
from pretrain.checkpoint import atomic_write_text, build_from_spec, load_backbone_with_args

from .knn import run_knn, trained_crop_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CPU demo: suite -> DINO pretraining -> kNN vs random init")
    parser.add_argument("--suite", default="data/suite")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo preset's epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    print("[1/3] embedded suite", flush=True)
    write_classification(args.suite, seed=args.seed)
    data_root = Path(args.suite) / "classification"

    print("[2/3] DINO pretraining (preset 'demo')", flush=True)
    output_dir = Path(args.output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    train_args = ["--preset", "demo", "--data", str(data_root / "train"), "--output-dir", str(output_dir),
                  "--seed", str(args.seed)]
    if args.epochs:
        train_args += ["--epochs", str(args.epochs)]
    train_cli.main(train_args)
    train_seconds = time.perf_counter() - started

    print("[3/3] weighted 20-NN on the suite's val split", flush=True)
    checkpoint = output_dir / "checkpoint.pth"
    trained_model, train_args = load_backbone_with_args(checkpoint)
    torch.manual_seed(args.seed)  # the same stream the trainer drew the student's initial weights from
    random_model = build_from_spec(describe(trained_model)).eval()
    size = trained_crop_size(train_args)
    results = {}
    for name, model in (("random init", random_model), ("DINO (teacher)", trained_model)):
        top1, top5 = run_knn(model, str(data_root), size, ks=(20,), num_workers=0)[20]
        results[name] = {"top1": top1, "top5": top5}
    total = time.perf_counter() - started
    margin = results["DINO (teacher)"]["top1"] - results["random init"]["top1"]

    print()
    print(f"{'model':<16} {'20-NN top-1':>12} {'top-5':>8}")
    for name, scores in results.items():
        print(f"{name:<16} {scores['top1']:>12.2f} {scores['top5']:>8.2f}")
    print(f"margin: {margin:+.2f} points top-1 | pretraining {train_seconds:.0f} s, total {total:.0f} s")
    atomic_write_text(output_dir / "demo_results.json", json.dumps(
        {"knn_k20": results, "margin_top1": margin, "seconds_total": total}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
