"""Training throughput (images/s) and peak memory of one DINO step.

    python -m bench.train_throughput [--configs demo vit_small16] [--steps 5] [--batch 8]

Compute only: the crops are random tensors of the configured sizes, so the
number measures the model step (student + teacher forward, loss, backward,
clipping, AdamW, EMA), not image decoding. Each config runs ``--warmup``
untimed steps first. Prints one row per config.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from PIL import Image

from pretrain.config import resolve
from pretrain.distributed import DistInfo
from pretrain.trainer import Trainer, peak_memory_gb

CONFIGS = {
    "demo": dict(preset="demo"),
    "vit_small16": dict(preset="paper", arch="vit_small", patch_size=16),  # 2x224 + 10x96
}


def make_folder(root: str, size: int) -> str:
    """A one-class folder of a few images (the trainer needs a dataset to size its schedules)."""
    os.makedirs(f"{root}/c", exist_ok=True)
    for i in range(4):
        Image.new("RGB", (size, size), (i * 40, 80, 120)).save(f"{root}/c/{i}.png")
    return root


def bench_trainer(name: str, tmp: str, device: torch.device, schedule_length: int) -> Trainer:
    """A Trainer of config ``name`` on a dummy folder in ``tmp``, with flat schedules of ``schedule_length``."""
    spec = dict(CONFIGS[name])
    preset = spec.pop("preset")
    cfg = resolve(preset, data=make_folder(tmp + "/data", 8), output_dir=tmp + "/run",
                  batch_size_per_gpu=1, num_workers=0, **spec)
    trainer = Trainer(cfg, DistInfo(device=device))
    trainer.lr_schedule = trainer.wd_schedule = trainer.momentum_schedule = [0.999] * schedule_length
    return trainer


def random_crops(trainer: Trainer, batch: int) -> list[torch.Tensor]:
    """Random global and local crops of the trainer's sizes: (batch, 3, S, S) each."""
    cfg = trainer.cfg
    crops = [torch.randn(batch, 3, cfg.global_crops_size, cfg.global_crops_size) for _ in range(2)]
    return crops + [torch.randn(batch, 3, cfg.local_crops_size, cfg.local_crops_size)
                    for _ in range(cfg.local_crops_number)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench_trainer(name, tmp, device, steps + warmup + 1)
        cfg, crops = trainer.cfg, random_crops(trainer, batch)
        for it in range(warmup):
            trainer.train_step(crops, epoch=1, it=it)
        synchronize(device)
        start = time.perf_counter()
        for it in range(steps):
            trainer.train_step(crops, epoch=1, it=warmup + it)
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"config": name, "batch": batch, "crops": f"2x{cfg.global_crops_size}+{cfg.local_crops_number}x{cfg.local_crops_size}",
            "images_per_s": batch * steps / seconds, "peak_memory_gb": peak_memory_gb(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=None, help="per step (default: 64 demo, 8 ViT-S on CPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, threads {torch.get_num_threads()}")
    print(f"{'config':<14}{'crops':<16}{'batch':>6}{'images/s':>10}{'peak GB':>9}")
    for name in args.configs:
        batch = args.batch or (64 if name == "demo" or device.type == "cuda" else 8)
        row = measure(name, batch, args.steps, args.warmup, device)
        print(f"{row['config']:<14}{row['crops']:<16}{row['batch']:>6}{row['images_per_s']:>10.1f}{row['peak_memory_gb']:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
