"""End-to-end training throughput from JPEG files: the official choices against our default path.

    python -m bench.end_to_end [--preset paper|demo] [--arch vit_small] [--patch 16] [--global-size 224]
                               [--local-size 96] [--locals 10] [--out-dim 65536] [--batch 4] [--steps 3]
                               [--warmup 1] [--workers N] [--device auto] [--threads N]

What a pretraining run does per step, measured whole: the `pretrain.trainer.Trainer`'s
own DataLoader reads 500x375 photo-like JPEGs (`bench.augment_throughput.photo_like`,
quality 90) through its sampler and workers, the crops are made where the
variant makes them, and the train step runs (`bench.train_throughput` times the
step alone on ready crops). Rows, each in its own process (its own peak memory):

* **baseline**: the official implementation's choices: PIL decode and per-image
  PIL multi-crop in the loader workers (``--augment-on loader``), and the step
  of `bench.train_throughput.official_choices` (explicit attention, per-parameter
  AdamW, clipping and EMA loops, a host read of the loss per step, fp16 + scaler
  on CUDA);
* **ours**: the preset's own pipeline (paper: ``--augment-on auto --decode-on
  auto``, so on CUDA the workers only read bytes and the batch is decoded by
  nvJPEG and augmented on the GPU, and on the CPU the workers run the PIL
  pipeline; demo: augmented in the training process) and our step;
* **ours-device** (on the CPU, where it is not already the default): ours with
  ``--augment-on device --decode-on device``, the GPU path run on the CPU.

``--preset demo`` runs the demo preset as it is (its model, crops and
pipeline) on 32-px PNGs of the suite, batch 64, 20 steps; the size flags are
then ignored. Columns: images/s over ``--steps`` timed steps after
``--warmup`` untimed ones (the workers' prefetch queue is filled during the
warm-up, so a pipeline slower than the step shows), where the crops are made
and decoded, peak memory (CUDA: ``max_memory_allocated``; CPU: the training
process's maximum resident set, the workers not included), and the ratio to
the baseline.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import numpy as np
import torch

from bench.augment_throughput import photo_like
from bench.train_throughput import flat_schedules, official_choices, synchronize, variant_precision
from bench.variant_process import add_model_arguments, bench_main, result_of
from data.suite_classification import render_object_image
from pretrain.config import resolve
from pretrain.distributed import DistInfo
from pretrain.presets import PRESETS
from pretrain.trainer import Trainer, peak_memory_gb

VARIANTS = ("baseline", "ours", "ours-device")
RESULT_TAG = "E2E-RESULT "
UNIQUE_IMAGES = 32  # distinct JPEGs written; the folder repeats them (hard links) to the size a run reads


def write_images(root: str, count: int, kind: str = "jpeg") -> str:
    """``count`` files in ``root/c``: `UNIQUE_IMAGES` distinct ones (``jpeg``: photo-like 500x375
    JPEGs; ``suite``: 32-px PNGs of the generated suite), hard-linked round to ``count``."""
    os.makedirs(f"{root}/c", exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".jpg" if kind == "jpeg" else ".png"
    for i in range(count):
        path = f"{root}/c/{i:06d}{suffix}"
        if i >= UNIQUE_IMAGES:
            os.link(f"{root}/c/{i % UNIQUE_IMAGES:06d}{suffix}", path)
        elif kind == "jpeg":
            photo_like(rng).save(path, quality=90)
        else:
            render_object_image(rng, i % 10, 32)[0].save(path)
    return root


def variant_settings(variant: str, device: torch.device) -> dict:
    """Trainer options of a variant: its precision and, but for ours (the preset's own choice), where
    the crops are made and decoded."""
    pipeline = {"baseline": dict(augment_on="loader", decode_on="loader"), "ours": {},
                "ours-device": dict(augment_on="device", decode_on="device")}[variant]
    return dict(precision=variant_precision("baseline" if variant == "baseline" else "ours", device), **pipeline)


def bench_config(args: argparse.Namespace, data: str, output_dir: str, variant: str, device: torch.device):
    """The run's config: ``--preset paper`` with the sizes of the flags, or the demo preset as it is."""
    common = dict(data=data, output_dir=output_dir, batch_size_per_gpu=args.batch, num_workers=args.workers,
                  **variant_settings(variant, device))
    if args.preset == "demo":
        return resolve("demo", **common)
    # the paper recipe's settings on any ViT (the `paper` preset itself describes ViT-S only)
    sizes = dict(arch=args.arch, patch_size=args.patch, global_crops_size=args.global_size,
                 local_crops_size=args.local_size, local_crops_number=args.locals, out_dim=args.out_dim)
    return resolve("vanilla", **{**PRESETS["paper"], **sizes, **common})


def run_variant(variant: str, args: argparse.Namespace, device: torch.device) -> dict:
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(tmp + "/data", args.batch * steps, "suite" if args.preset == "demo" else "jpeg")
        cfg = bench_config(args, data, tmp + "/run", variant, device)
        trainer = flat_schedules(Trainer(cfg, DistInfo(device=device)), steps + 1)
        loader = trainer.make_loader()
        trainer.sampler.set_epoch(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        context = official_choices(trainer) if variant == "baseline" else contextlib.nullcontext()
        with context:
            batches = iter(loader)

            def step(crops, it: int) -> None:
                loss = trainer.train_step(crops, epoch=1, it=it).loss
                if variant == "baseline":
                    loss.item()  # the official loop checks math.isfinite(loss.item()) every step
            for it in range(args.warmup):
                step(next(batches), it)
            synchronize(device)
            start = time.perf_counter()
            for it in range(args.warmup, steps):
                step(next(batches), it)
            synchronize(device)
            seconds = (time.perf_counter() - start) / args.steps
        memory = peak_memory_gb(device)
        del batches, loader
    crops = f"2x{cfg.global_crops_size}+{cfg.local_crops_number}x{cfg.local_crops_size}"
    return {"variant": variant, "images_per_s": args.batch / seconds, "arch": f"{cfg.arch}/{cfg.patch_size}",
            "crops": crops, "step_s": seconds, "peak_memory_gb": memory,
            "augment_on": trainer.augment_on, "decode_on": trainer.decode_on}


def variant_in_subprocess(variant: str, argv: list[str]) -> dict:
    """`run_variant` in a fresh Python process (its own peak memory); the result comes back as JSON."""
    return result_of("bench.end_to_end", argv, variant, RESULT_TAG)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=("paper", "demo"),
                        help="paper: the sizes below on 500x375 JPEGs; demo: the demo preset on 32-px suite PNGs")
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 4 on CPU, 128 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 3 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 5 CUDA)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers (default: 10 on CUDA, the official default; 1 on the CPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--run-variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = args.device == "cuda"
    demo = args.preset == "demo"
    args.batch = args.batch or (128 if on_cuda else 64 if demo else 4)
    args.steps = args.steps or (20 if on_cuda or demo else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_cuda or demo else 1)
    args.workers = args.workers if args.workers is not None else (min(10, os.cpu_count() or 1) if on_cuda else 1)
    args.threads = args.threads or torch.get_num_threads()
    return args


def compare(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    device = torch.device(args.device)
    variants = ["baseline", "ours"] + (["ours-device"] if device.type == "cpu" and args.preset == "paper" else [])
    rows = [variant_in_subprocess(variant, argv) for variant in variants]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    files = "32-px PNGs" if args.preset == "demo" else "500x375 JPEGs"
    print(f"end to end from {files}, {args.preset} preset: {rows[0]['arch']}, {rows[0]['crops']}, batch {args.batch}, "
          f"{args.workers} loader workers, {name}")
    print(f"{'variant':<13}{'crops on':<10}{'decode on':<11}{'images/s':>10}{'step s':>9}{'peak GB':>9}"
          f"{'vs baseline':>13}")
    for row in rows:
        print(f"{row['variant']:<13}{row['augment_on']:<10}{row['decode_on']:<11}{row['images_per_s']:>10.2f}"
              f"{row['step_s']:>9.3f}{row['peak_memory_gb']:>9.2f}"
              f"{row['images_per_s'] / rows[0]['images_per_s']:>12.2f}x")
    return rows


def main(argv=None) -> int:
    return bench_main(argv, parse_args, lambda args: run_variant(args.run_variant, args, torch.device(args.device)),
                      compare, RESULT_TAG)


if __name__ == "__main__":
    raise SystemExit(main())
