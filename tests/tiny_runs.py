"""A tiny training configuration and the helpers to run it in this process or as a subprocess."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pretrain.config import config_flags, resolve
from pretrain.distributed import free_port

REPO = Path(__file__).resolve().parents[1]

TINY = dict(arch="vit", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, drop_path_rate=0.0,
            out_dim=64, hidden_dim=64, bottleneck_dim=32, global_crops_size=32, local_crops_size=16,
            local_crops_number=2, batch_size_per_gpu=8, num_workers=0, lr=0.005, warmup_epochs=1,
            epochs=2, momentum_teacher=0.99, saveckp_freq=1, log_every_steps=1)


def tiny_cfg(data, out, **overrides):
    return resolve("vanilla", data=str(data), output_dir=str(out), **{**TINY, **overrides})


def cli_args(cfg_overrides: dict) -> list[str]:
    return config_flags(cfg_overrides)


def train_command(settings: dict, processes: int = 1, preset: str = "vanilla") -> list[str]:
    """``python -m pretrain.train`` (or under torchrun with ``processes`` > 1) with ``settings`` as flags."""
    train = ["-m", "pretrain.train", "--preset", preset, *cli_args(settings)]
    if processes == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *train]


def subprocess_env() -> dict:
    """One thread per process (same arithmetic in every run), the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def step_records(log: Path) -> dict[int, dict]:
    """{iteration: the last step record for it} of a log.jsonl (complete lines only)."""
    records = {}
    for line in log.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            record = json.loads(line)
            if record.get("kind") == "step":
                records[record["iteration"]] = record
    return records
