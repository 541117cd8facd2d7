"""Which model a tool scores, and the flags that name it: one loader for every evaluator, eval-all and the report.

Model flags (`add_model_arguments`), the same in every evaluator (``evaluate.knn``, ``linear``,
``retrieval``, ``copy_detection``, ``video_segmentation``, ``attention_masks``, ``emergence``),
``evaluate.eval_all``, ``analysis.report`` and the figure commands of ``analysis``:

* ``--ckpt PATH``: a checkpoint (ours, the official DINO files, a released backbone, a timm state dict);
  ``--ckpt random`` (or ``--arch`` alone): a random initialisation of ``--arch``/``--patch``;
* ``--arch``, ``--patch``: the architecture of ``random``; with a checkpoint they are inferred from the file
  and, when given, must agree with it;
* ``--key teacher|student``: the checkpoint entry read (default teacher);
* ``--random-like CKPT``: CKPT's random twin, its architecture with seeded random weights (the trained
  model's baseline); it shares CKPT's run name, so its results land beside the trained model's;
* ``--seed``: the torch seed set before the model is built (a random initialisation is reproducible).

Extraction flags (`add_extraction_arguments`): ``--device``, ``--batch-size``, ``--num-workers``,
``--fp32``, ``--cache-dir`` (default ``results/<run>/features``), ``--no-cache``, ``--no-progress``.
The evaluators take both sets plus ``--json`` (`add_evaluator_arguments`).

`load_model` (flags) and `load_model_source` (keywords) return a `ModelSource`: the backbone, its run name
(``results/<run>``), the method name of its rows in the results tables (the run name, or
``random init (<arch>)``), whether its weights are random, the checkpoint's training args and the key read.
The weights come from `pretrain.checkpoint.load_backbone_with_args`.
"""
from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from common.errors import UserError
from pretrain.backbones import ARCHS, CUSTOM_VIT, describe
from pretrain.checkpoint import load_backbone_with_args

from .features import FeatureExtractor, weights_fingerprint

RANDOM = "random"
KEYS = ("teacher", "student")
ARCH_CHOICES = ARCHS + (CUSTOM_VIT,)  # 'vit': a custom-size ViT checkpoint (its size comes from the file)
NO_MODEL = ("no model given: pass --ckpt <checkpoint>, --ckpt random with --arch (and --patch), "
            "or --random-like <checkpoint>")


def run_name(ckpt: str, arch: str | None = None, patch: int | None = None) -> str:
    """Name of a model's results folder: ``runs/<name>/checkpoint*.pth`` -> <name>;
    another file -> its stem; ``random`` -> ``random-<arch>-p<patch>``."""
    if str(ckpt) == RANDOM:
        return f"{RANDOM}-{arch}-p{patch}" if patch else f"{RANDOM}-{arch}"
    path = Path(ckpt)
    return path.parent.name if path.name.startswith("checkpoint") and path.parent.name else path.stem


def trained_crop_size(args: dict | None) -> int | None:
    """The global crop side of a checkpoint of ours (from its training ``args``), else None."""
    return int(args["global_crops_size"]) if args and "global_crops_size" in args else None


def pretraining_data(train_args: dict | None, random: bool) -> str:
    """The ``train_data`` cell: "suite" for the embedded suite, else the data folder's name."""
    if random:
        return "none (random init)"
    data = Path(str((train_args or {}).get("data") or ""))
    if not str(data) or str(data) == ".":
        return ""
    if (data / "SUITE.json").is_file() or (data.parent / "SUITE.json").is_file():
        return "suite"
    return (data.parent if data.name == "train" else data).name


@dataclass
class ModelSource:
    """A loaded model and what names it.

    ``method`` names its rows in the results tables, ``run`` its results folder (``results/<run>``);
    ``random``: its weights are a random initialisation (``random`` or a twin); ``twin``: it is the random
    twin of the checkpoint ``ckpt`` (``--random-like``); ``train_args``: the checkpoint's training args
    (ours; None otherwise); ``key``: the checkpoint entry read (teacher or student); ``ckpt``: the file
    its architecture or weights came from (None for ``random``).
    """
    model: nn.Module
    method: str
    run: str
    random: bool
    train_args: dict | None = None
    key: str = "teacher"
    ckpt: str | None = None
    twin: bool = False

    @functools.cached_property
    def weights(self) -> str:
        """The weights' fingerprint (`evaluate.features.weights_fingerprint`)."""
        return weights_fingerprint(self.model)

    @property
    def spec(self) -> dict:
        return describe(self.model)

    @property
    def crop_size(self) -> int | None:
        return trained_crop_size(self.train_args)

    def info(self):
        """What `evaluate.eval_plan.plan` needs to know of the model (a `ModelInfo`)."""
        from .eval_plan import ModelInfo  # here: eval_plan imports the evaluators, which import this module
        spec = self.spec
        return ModelInfo(spec["arch"], spec["patch"], getattr(self.model, "embed_dim", 0), self.crop_size,
                         pretraining_data(self.train_args, self.random))

    def results_dir(self, name: str) -> Path:
        """``results/<run>/<name>``, ``<name>-random-init`` for a random twin (it shares its checkpoint's run)."""
        return Path("results") / self.run / (f"{name}-random-init" if self.twin else name)


def random_method(model: nn.Module) -> str:
    return f"random init ({describe(model)['arch']})"


def load_model_source(ckpt: str | os.PathLike | None = None, arch: str | None = None, patch: int | None = None,
                      key: str = "teacher", random_like: str | os.PathLike | None = None,
                      seed: int = 0) -> ModelSource:
    """Seed torch with ``seed``, then load the model the flags name (see the module docstring).

    ``random_like``: the random twin of that checkpoint (``ckpt``, ``arch`` and ``patch`` are ignored);
    ``ckpt`` "random", or None with ``arch``: a random initialisation; else the checkpoint's ``key`` entry.
    UserError when nothing is named or the weights do not load.
    """
    if key not in KEYS:
        raise UserError(f"unknown checkpoint key '{key}': use one of {', '.join(KEYS)}")
    torch.manual_seed(seed)
    if random_like:
        model, train_args = load_backbone_with_args(random_like, key=key, random_weights=True)
        return ModelSource(model, random_method(model), run_name(random_like), True, train_args, key,
                           str(random_like), twin=True)
    if ckpt is None and arch is None:
        raise UserError(NO_MODEL)
    if ckpt is None or str(ckpt) == RANDOM:
        model, _ = load_backbone_with_args(None, arch, patch, key=key)
        spec = describe(model)
        return ModelSource(model, random_method(model), run_name(RANDOM, spec["arch"], spec["patch"]), True,
                           None, key)
    model, train_args = load_backbone_with_args(ckpt, arch, patch, key=key)
    return ModelSource(model, run_name(ckpt), run_name(ckpt), False, train_args, key, str(ckpt))


def load_model(args: argparse.Namespace) -> ModelSource:
    """`load_model_source` of the flags `add_model_arguments` defines."""
    return load_model_source(args.ckpt, args.arch, args.patch, args.key, args.random_like, args.seed)


def feature_extractor(source: ModelSource, args: argparse.Namespace, **overrides) -> FeatureExtractor:
    """``source``'s model wrapped as the extraction flags say: device, batch, workers, precision, progress,
    and the feature cache (``--cache-dir``, default ``results/<run>/features``; none with ``--no-cache``).
    ``overrides``: other `FeatureExtractor` fields (e.g. ``refresh``)."""
    cache_dir = None if args.no_cache else (args.cache_dir or Path("results") / source.run / "features")
    settings = dict(device=args.device, batch_size=args.batch_size, num_workers=args.num_workers, fp32=args.fp32,
                    cache_dir=cache_dir, progress=not args.no_progress)
    return FeatureExtractor(source.model, **(settings | overrides))


# ------------------------------------------------------------- the flags

def int_at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (else a parse-time error naming the bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"int >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def device_name(text: str) -> str:
    """A torch device the evaluators run on: cpu, cuda or cuda:<index>."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise argparse.ArgumentTypeError(f"invalid device '{text}' (choose from cpu, cuda, cuda:<index>)")
    return text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name the model (see the module docstring); `load_model` reads them."""
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", default=None,
                       help="checkpoint path, or 'random' (with --arch, --patch); --arch alone means random")
    group.add_argument("--arch", default=None, choices=ARCH_CHOICES,
                       help="backbone arch: needed for random, inferred from a checkpoint (which it must match)")
    group.add_argument("--patch", type=positive_int, default=None,
                       help="ViT patch size (random: default 16; inferred from a checkpoint)")
    group.add_argument("--key", default="teacher", choices=KEYS, help="checkpoint entry (default teacher)")
    group.add_argument("--random-like", default=None, metavar="CKPT",
                       help="a random initialisation of CKPT's architecture (the trained model's baseline; "
                            "its results go to CKPT's run)")
    group.add_argument("--seed", type=int, default=0, help="torch seed before the model is built (default 0)")


def add_device_argument(parser) -> None:
    parser.add_argument("--device", type=device_name, default=None, metavar="{cpu,cuda,cuda:N}",
                        help="where to run (default: cuda when present, else cpu)")


def add_extraction_arguments(parser: argparse.ArgumentParser, batch_size: int | None = None) -> None:
    """The flags of feature extraction: device, batch, workers, precision, feature cache, progress bars.
    ``batch_size``: the tool's default (None: 256 on CUDA, 64 on the CPU)."""
    group = parser.add_argument_group("extraction")
    add_device_argument(group)
    group.add_argument("--batch-size", type=positive_int, default=batch_size,
                       help=f"images per batch (default {batch_size})" if batch_size else
                       "images per batch (default: 256 on CUDA, 64 on the CPU)")
    group.add_argument("--num-workers", type=non_negative_int, default=None,
                       help="loader workers (default: up to 8 on CUDA, 2 on the CPU)")
    group.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA (the CPU is always fp32)")
    group.add_argument("--cache-dir", default=None, help="feature cache folder (default results/<run>/features)")
    group.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_evaluator_arguments(parser: argparse.ArgumentParser, batch_size: int | None = None) -> None:
    """What every evaluator takes: the model flags, the extraction flags and ``--json``."""
    add_model_arguments(parser)
    add_extraction_arguments(parser, batch_size)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
