"""Training configuration: one dataclass with the official defaults, presets.

``TrainConfig()`` holds the official code's defaults (docs/protocols.md, "Default settings and presets"). Presets
(`pretrain.presets`) are named sets of overrides applied on top; command-line
flags override the preset. The resolved config is saved as ``config.json`` in the run folder and
under ``args`` in every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from common.errors import UserError

from .augment import HUE_SPACES
from .backbones import ARCHS, CUSTOM_VIT, VIT_PATCHES, VIT_SPECS
from .presets import PRESETS, arch_mismatch


def option(default, help: str, choices: tuple | None = None):
    """A config field with its documentation (``--help`` shows it, with the default) and its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "sgd")
PIPELINE_PLACES = ("auto", "loader", "device")
ON_OFF = ("on", "off")


@dataclass
class TrainConfig:
    """Every setting of a pretraining run; the defaults are the official code's (docs/recipes.md).

    Checked on construction (`validate`): a value outside its choices or range raises a one-line `UserError`
    naming the allowed values; ``--flag`` parsing applies the same choices.
    """

    # data and run
    data: str = option("", "training images: an ImageFolder root (<class>/<image>) or a flat folder of images")
    output_dir: str = option("runs/dino", "run folder: checkpoints, log.jsonl, TensorBoard events, config.json")
    seed: int = option(0, "seed of the initial weights and of every crop (the run is reproducible from it)")
    num_workers: int = option(10, "data-loader worker processes (capped at the CPU count)")
    # backbone
    arch: str = option("vit_small", "backbone; 'vit' is a ViT of the sizes --embed-dim/--depth/--num-heads",
                       choices=(*ARCHS, CUSTOM_VIT))
    patch_size: int = option(16, "ViT patch side in pixels (16 or 8 for the named ViTs)")
    embed_dim: int | None = option(None, "arch 'vit' only: token width")
    depth: int | None = option(None, "arch 'vit' only: number of blocks")
    num_heads: int | None = option(None, "arch 'vit' only: attention heads per block")
    img_size: int = option(224, "side the position-embedding table is defined for (other sides are interpolated)")
    drop_path_rate: float = option(0.1, "stochastic depth of the student "
                                        "(linearly over the blocks; the teacher has none)")
    # head
    out_dim: int = option(65536, "K, the head's output dimension (prototypes)")
    hidden_dim: int = option(2048, "width of the head's hidden layers")
    bottleneck_dim: int = option(256, "width of the head's bottleneck before the weight-normalised last layer")
    norm_last_layer: bool = option(True, "freeze the last layer's weight-norm gain at 1 (true: more stable; "
                                         "false: the paper's ViT-S recipes)")
    use_bn_in_head: bool = option(False, "BatchNorm in the head's hidden layers (SyncBatchNorm under DDP on CUDA)")
    # loss
    warmup_teacher_temp: float = option(0.04, "teacher temperature at the start of its warm-up")
    teacher_temp: float = option(0.04, "teacher temperature after the warm-up (sharpening)")
    warmup_teacher_temp_epochs: int = option(0, "epochs of the linear teacher-temperature warm-up")
    student_temp: float = option(0.1, "student temperature")
    center_momentum: float = option(0.9, "EMA momentum of the center subtracted from the teacher's logits")
    # optimisation
    epochs: int = option(100, "epochs of the run (the schedules span them)")
    batch_size_per_gpu: int = option(64, "images per process and step (global batch = this x processes)")
    lr: float = option(0.0005, "peak learning rate at a global batch of 256 (scaled linearly with the batch)")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine schedule")
    warmup_epochs: int = option(10, "epochs of the linear learning-rate warm-up from 0")
    weight_decay: float = option(0.04, "weight decay at the start of its cosine schedule")
    weight_decay_end: float = option(0.4, "weight decay at the end of its cosine schedule")
    momentum_teacher: float = option(0.996, "teacher EMA momentum at the start of its cosine schedule")
    momentum_teacher_end: float = option(1.0, "teacher EMA momentum at the end (the official 1 freezes the teacher "
                                              "at the end; the demo holds 0.995)")
    clip_grad: float = option(3.0, "per-parameter gradient-norm clip (0: none)")
    freeze_last_layer: int = option(1, "epochs during which the head's last layer gets no update")
    optimizer: str = option("adamw", "optimizer", choices=OPTIMIZERS)
    precision: str = option("auto", "autocast dtype of the forward passes (auto: bf16 on CUDA, fp32 on the CPU; "
                                    "fp16 adds a gradient scaler)", choices=PRECISIONS)
    # multi-crop
    global_crops_size: int = option(224, "side of the 2 global crops")
    local_crops_size: int = option(96, "side of the local crops")
    global_crops_scale: tuple[float, float] = option((0.4, 1.0), "area range of the global crops, of the image")
    local_crops_scale: tuple[float, float] = option((0.05, 0.4), "area range of the local crops, of the image")
    local_crops_number: int = option(8, "local crops per image (0: no multi-crop)")
    jitter_saturation: float = option(0.2, "colour jitter: saturation strength")
    jitter_hue: float = option(0.1, "colour jitter: hue strength")
    jitter_hue_space: str = option("hsv", "how the hue turns: hsv (ColorJitter's shift) or yiq (a rotation that "
                                          "keeps the luma; the demo)", choices=HUE_SPACES)
    grayscale_p: float = option(0.2, "probability of turning a crop grey")
    local_invert_p: float = option(0.0, "probability of inverting a local crop (x -> 255 - x), drawn per crop "
                                        "after the grayscale; not in the paper (0: its pipeline, unchanged)")
    blur_radius: tuple[float, float] = option((0.1, 2.0), "Gaussian blur radius range, in pixels")
    augment_on: str = option("auto", "where the multi-crop is made: loader (PIL per image in the workers), device "
                                     "(batched on the training device), auto (device on CUDA, loader on the CPU)",
                             choices=PIPELINE_PLACES)
    decode_on: str = option("auto", "where JPEGs are decoded: loader (the workers), device (the workers read bytes; "
                                    "nvJPEG on CUDA), auto (device when the crops are made on a GPU)",
                            choices=PIPELINE_PLACES)
    # bookkeeping
    saveckp_freq: int = option(20, "keep checkpoint<epoch>.pth every N epochs (0: none)")
    save_every_steps: int = option(0, "also checkpoint every N steps (0: only at epoch ends)")
    compile: str = option("off", "torch.compile student and teacher (compiling takes a minute or more; off until "
                                 "make gpu-check shows it pays)", choices=ON_OFF)
    fused_optimizer: bool = option(True, "fused AdamW (one kernel for all parameters); false: the foreach one")
    keep_checkpoints: int = option(2, "newest step/epoch checkpoints kept "
                                      "(a corrupt newest falls back to the previous)")
    log_every_steps: int = option(10, "steps between log records (loss, schedules, collapse monitors)")
    knn_every: int = option(0, "epochs between runs of the 20-NN monitor (0: off; needs --knn-data)")
    knn_data: str = option("", "ImageFolder root with train/ and val/ for the 20-NN monitor")
    max_steps: int = option(0, "stop after this many steps of this invocation (a resumed run counts afresh; 0: all)")
    max_bad_fraction: float = option(0.01, "undecodable images are skipped and logged; above this fraction of the "
                                           "images the run stops")
    max_image_pixels: int = option(89_478_485, "larger images count as bad (PIL's own limit)")
    tensorboard: bool = option(True, "write TensorBoard event files beside log.jsonl (rank 0)")
    preset: str = option("vanilla", "the preset this config was resolved from (set by resolve)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """One-line `UserError` for a value outside its choices or range."""
        for item in dataclasses.fields(self):
            choices = item.metadata.get("choices")
            value = getattr(self, item.name)
            if choices and value not in choices:
                raise UserError(f"--{flag_name(item.name)} '{value}' is not one of {', '.join(map(str, choices))}")
        for name in ("momentum_teacher", "momentum_teacher_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--{flag_name(name)} {value} is not a momentum: pass a value in [0, 1] "
                                "(1 freezes the teacher)")
        for name in ("grayscale_p", "local_invert_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--{flag_name(name)} {value} is not a probability: pass a value in [0, 1]")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"--warmup-epochs {self.warmup_epochs} is longer than the run (--epochs {self.epochs}): "
                            "lower --warmup-epochs")
        for name in ("epochs", "batch_size_per_gpu", "out_dim", "global_crops_size", "local_crops_size", "patch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{flag_name(name)} {getattr(self, name)} must be at least 1")
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise UserError(f"--{flag_name(name)} {low} {high} is not an area range: pass 0 < LO <= HI <= 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise UserError(f"--max-bad-fraction {self.max_bad_fraction} is not a fraction: pass a value in [0, 1]")
        if self.arch == CUSTOM_VIT and None in (self.embed_dim, self.depth, self.num_heads):
            raise UserError("arch 'vit' needs --embed-dim, --depth and --num-heads")
        if self.arch in VIT_SPECS and self.patch_size not in VIT_PATCHES:
            raise UserError(f"arch '{self.arch}' does not support patch {self.patch_size}: use PATCH=16 or PATCH=8")


def flag_name(field_name: str) -> str:
    return field_name.replace("_", "-")


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
    """One ``--flag`` per config field, with the field's help, choices and default (the code default; a
    preset may change it). The parsed default is None: take the preset's value."""
    for item in dataclasses.fields(TrainConfig):
        if item.name == "preset":
            continue
        flag = "--" + flag_name(item.name)
        default, choices = item.default, item.metadata.get("choices")
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{item.metadata['help']} (default: {shown if shown not in ('', None) else 'none'})"
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=float, nargs=2, default=None, metavar=("LO", "HI"), help=help_text)
        elif item.name in ("embed_dim", "depth", "num_heads"):
            parser.add_argument(flag, type=int, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=None, choices=choices, help=help_text)


def config_flags(settings: dict) -> list[str]:
    """The command-line flags that set ``settings`` (config field -> value): the inverse of `add_arguments`
    (``{"batch_size_per_gpu": 8, "global_crops_scale": (0.4, 1.0)}`` -> ``--batch-size-per-gpu 8
    --global-crops-scale 0.4 1.0``)."""
    flags = []
    for key, value in settings.items():
        flag = "--" + flag_name(key)
        flags += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    return flags


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
