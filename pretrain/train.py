"""Command line: ``python -m pretrain.train --data DIR --output-dir DIR [--preset demo] [...]``.

Single process, or one process per GPU under ``torchrun`` (see README,
"Pretraining"). Resumes from ``<output-dir>/checkpoint.pth`` when present.
"""
from __future__ import annotations

import argparse
import json
import os

from common.errors import UserError, run_cli
from common.transforms import eval_transform
from data.imagefolder import ImageFolder, split_root

from . import config as config_module
from .distributed import init_distributed, main_process_lock
from .monitor import make_knn_monitor
from .trainer import Trainer


def knn_monitor_for(cfg, device):
    """The periodic kNN monitor on ``cfg.knn_data`` (train/ + val/), on the
    evaluation view at the global crop size."""
    train_dir, val_dir = split_root(cfg.knn_data)
    transform = eval_transform(cfg.global_crops_size)
    return make_knn_monitor(ImageFolder(train_dir, transform), ImageFolder(val_dir, transform), device)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset`` and one flag per config field (the launchers check their arguments with the same ones)."""
    parser.add_argument("--preset", default="vanilla",
                        help=f"named recipe the flags below override: {', '.join(config_module.PRESETS)} "
                             "(README 'Presets'; default: vanilla, the official code's defaults)")
    config_module.add_arguments(parser)


def config_from_args(args: argparse.Namespace) -> config_module.TrainConfig:
    """The preset resolved with the flags that were given."""
    return config_module.resolve(args.preset, **{k: v for k, v in vars(args).items() if k != "preset"})


def resolved_config(argv=None) -> config_module.TrainConfig:
    """The config a ``python -m pretrain.train`` command line runs (loader workers capped at the CPU count)."""
    parser = argparse.ArgumentParser(description="DINO self-supervised pretraining")
    add_train_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    if not cfg.data:
        raise UserError("no training data given: pass --data <image folder> (or DATA=... to make)")
    if cfg.num_workers > (os.cpu_count() or 1):
        cfg.num_workers = os.cpu_count() or 1
    return cfg


def main(argv=None) -> int:
    cfg = resolved_config(argv)
    dist_info = init_distributed()
    with main_process_lock(cfg.output_dir, "pretrain", dist_info) as lock:  # one run per folder
        monitor = knn_monitor_for(cfg, dist_info.device) if cfg.knn_every and cfg.knn_data else None
        summary = Trainer(cfg, dist_info, monitor, lock).fit()
    if dist_info.is_main:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
