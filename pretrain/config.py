"""Training configuration: one dataclass with the official defaults, presets.

``TrainConfig()`` holds the official code's defaults (PROTOCOLS A7). Presets
(`pretrain.presets`) are named sets of overrides applied on top; command-line
flags override the preset. The resolved config is saved as ``config.json`` in the run folder and
under ``args`` in every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from common.errors import UserError

from .presets import PRESETS, arch_mismatch


@dataclass
class TrainConfig:
    # data and run
    data: str = ""
    output_dir: str = "runs/dino"
    seed: int = 0
    num_workers: int = 10
    # backbone
    arch: str = "vit_small"
    patch_size: int = 16
    embed_dim: int | None = None  # sizes for arch "vit" (small CPU models)
    depth: int | None = None
    num_heads: int | None = None
    img_size: int = 224  # side the position table is defined for
    drop_path_rate: float = 0.1
    # head
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    # loss
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    # optimisation
    epochs: int = 100
    batch_size_per_gpu: int = 64
    lr: float = 0.0005  # at global batch 256; scaled linearly
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0  # the cosine schedule's final value (official: 1, the teacher freezes at the end)
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    optimizer: str = "adamw"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    # multi-crop
    global_crops_size: int = 224
    local_crops_size: int = 96
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    jitter_saturation: float = 0.2  # ColorJitter saturation / hue and the grayscale probability
    jitter_hue: float = 0.1
    jitter_hue_space: str = "hsv"  # hsv (ColorJitter's shift) | yiq (luma-preserving rotation, demo)
    grayscale_p: float = 0.2
    blur_radius: tuple[float, float] = (0.1, 2.0)  # PIL Gaussian blur radius range, in pixels
    # where the multi-crop is made: loader (PIL per image in the workers) | device (batched on the training
    # device) | auto (device on CUDA, loader on the CPU)
    augment_on: str = "auto"
    # where JPEGs are decoded: loader (the workers) | device (the workers read bytes; nvJPEG on CUDA) |
    # auto (device when the crops are made on a CUDA device, else loader)
    decode_on: str = "auto"
    # bookkeeping
    saveckp_freq: int = 20
    save_every_steps: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    # torch.compile of student and teacher: on | off (compiling takes about a minute, even for a small model;
    # whether it pays on a GPU is still to be measured, so it is off by default)
    compile: str = "off"
    fused_optimizer: bool = True  # fused AdamW (CPU and CUDA); False: the foreach implementation
    keep_checkpoints: int = 2  # newest step/epoch checkpoints kept (checkpoint-itNNNNNNNN.pth); a corrupt newest falls back
    log_every_steps: int = 10
    knn_every: int = 0  # epochs between kNN monitor runs (0: off)
    knn_data: str = ""  # ImageFolder root with train/ and val/ for the monitor
    max_steps: int = 0  # stop after this many steps of this invocation (a resumed run counts afresh; 0: run all epochs); for tests
    # bad data: undecodable images are skipped (logged in bad_images.tsv); more than this fraction stops the run
    max_bad_fraction: float = 0.01
    max_image_pixels: int = 89_478_485  # larger images count as bad (PIL's own limit)
    preset: str = "vanilla"


def resolve(preset: str = "vanilla", **overrides) -> TrainConfig:
    """A config from a preset plus explicit overrides (None values ignored)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "arch" in given and arch_mismatch(preset, given["arch"]):
        raise UserError(arch_mismatch(preset, given["arch"]))
    values = dict(PRESETS[preset])
    values.update(given)
    tuple_fields = {f.name for f in dataclasses.fields(TrainConfig) if isinstance(f.default, tuple)}
    values.update({k: tuple(v) for k, v in values.items() if k in tuple_fields})  # argparse gives lists
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}")
    return TrainConfig(preset=preset, **values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field (default None = take the preset's)."""
    for item in dataclasses.fields(TrainConfig):
        if item.name == "preset":
            continue
        flag = "--" + item.name.replace("_", "-")
        default = item.default
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL")
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=float, nargs=2, default=None, metavar=("LO", "HI"))
        elif item.name in ("embed_dim", "depth", "num_heads"):
            parser.add_argument(flag, type=int, default=None)
        else:
            parser.add_argument(flag, type=type(default), default=None)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
