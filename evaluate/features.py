"""Batched feature extraction with an on-disk cache, shared by the evaluators.

Feature functions of a backbone (`FeatureSpec`), for images x (B, 3, H, W):

* ``cls``: ``model(x)``, the final-normed [CLS] (B, D) (the pooled 2048-d
  feature for ResNet-50). kNN (docs/protocols.md, "k-NN") and retrieval (docs/protocols.md, "Image retrieval").
* ``last_blocks``: with z_l the last n block outputs (each through the final
  LayerNorm, `get_intermediate_layers`), [z_{L-n}[:, 0], ..., z_{L-1}[:, 0]]
  (B, nD); with ``avgpool_patchtokens`` (n = 1 only) the [CLS] and the mean of
  the patch tokens interleaved as the official code lays them out,
  [cls_0, avg_0, cls_1, avg_1, ...] (B, 2D). Linear probe (docs/protocols.md, "Linear probe").
* ``copy_detection``: [CLS] ++ GeM_p(patch tokens) of the last block (B, 2D),
  `evaluate.descriptors.copy_detection_descriptor`. Copy detection (docs/protocols.md, "Copy detection").
Any of them multi-scale: with ``scales`` (s_1..s_k) the feature is
(1/k) sum_i f(resize_bilinear(x, s_i)), not normalised (the multi-scale option of docs/protocols.md, "Image retrieval");
a side shorter than one patch is first enlarged to one patch (`rescale`).

Precision: fp32 on the CPU; on CUDA bf16 autocast by default (``fp32=True``
forces fp32 as the official evaluators run). The extraction loop itself is
`pretrain.monitor.extract_features`, which the training monitor uses too.

Cache: one file per (model, dataset, transform, feature, precision), written
with `pretrain.checkpoint.atomic_save` as ``{"key": dict, "features": (N, F),
"labels": (N,)}``. The key holds a content hash of the model's weights (so a
retrained checkpoint, another ``--key`` or another random seed never hits a
stale entry, whatever its path), the dataset root, the split's name, a hash of
its sample list (paths and labels; image contents are not hashed), the
transform's repr and the feature spec. The file is named
``<split>-<sha256(key)[:16]>.pth``; a file whose stored key differs, or which
does not load, is recomputed and replaced.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from common.progress import write as progress_write
from data.imagefolder import load_rgb
from pretrain.backbones import is_vit
from pretrain.checkpoint import UnreadableCheckpoint, atomic_save, safe_load
from pretrain.monitor import compute_features, extract_features

from .descriptors import copy_detection_descriptor

FEATURE_KINDS = ("cls", "last_blocks", "copy_detection")
CACHE_VERSION = 1


@dataclass(frozen=True)
class FeatureSpec:
    """Which function of the backbone to extract (see the module docstring)."""
    kind: str = "cls"
    n_last_blocks: int = 1
    avgpool_patchtokens: bool = False
    gem_p: float = 4.0
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {self.kind!r}: use one of {FEATURE_KINDS}")
        if self.avgpool_patchtokens and self.n_last_blocks != 1:
            raise UserError(f"avg-pooled patch tokens go with the last block only, not n_last_blocks "
                            f"{self.n_last_blocks}: pass --n-last-blocks 1 or drop --avgpool")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")

    def describe(self) -> str:
        """A text identity of the spec (part of the cache key)."""
        return json.dumps({"kind": self.kind, "n_last_blocks": self.n_last_blocks,
                           "avgpool": self.avgpool_patchtokens, "gem_p": self.gem_p,
                           "scales": list(self.scales)}, sort_keys=True)

    def single_scale(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The feature of ``images`` (B, 3, H, W) at their own size: (B, F)."""
        if self.kind == "cls":
            return model(images)
        if not is_vit(model):
            raise UserError(f"feature '{self.kind}' needs a ViT's tokens: use the 'cls' feature for convnets")
        if self.kind == "copy_detection":
            return copy_detection_descriptor(model.get_intermediate_layers(images, 1)[0].float(), self.gem_p)
        layers = model.get_intermediate_layers(images, self.n_last_blocks)
        features = torch.cat([layer[:, 0] for layer in layers], dim=-1)
        if self.avgpool_patchtokens:
            patch_mean = layers[-1][:, 1:].mean(dim=1)
            features = torch.stack([features, patch_mean], dim=-1).flatten(1)  # [cls_0, avg_0, cls_1, ...]
        return features

    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F): the mean of `single_scale` over ``scales`` (bilinear resizes)."""
        min_side = getattr(model, "patch_size", 1)
        total = None
        for scale in self.scales:
            feature = self.single_scale(model, rescale(images, scale, min_side)).float()
            total = feature if total is None else total + feature
        return total / len(self.scales)


def rescale(images: torch.Tensor, scale: float, min_side: int = 1) -> torch.Tensor:
    """Bilinear resize by ``scale`` (align_corners False), each side kept >= ``min_side``.

    Sides floor(H * s), floor(W * s) as ``interpolate(scale_factor=s)`` gives
    them (the official multiscale call, used whenever it yields at least one
    patch per side). A side that would fall below one patch (a 1024 x 103
    panorama at 1/2 scale) is resized to exactly ``min_side`` instead, where the
    official code would fail on an empty token grid.
    """
    height, width = images.shape[-2:]
    target = (max(math.floor(height * scale), min_side), max(math.floor(width * scale), min_side))
    if target == (height, width):
        return images
    if target == (math.floor(height * scale), math.floor(width * scale)):
        return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    return F.interpolate(images, size=target, mode="bilinear", align_corners=False)


class ImageList(torch.utils.data.Dataset):
    """Images given by a loader: ``dataset[i] = (transform(load(i)), i)``.

    ``paths`` name the images (they make the cache key); ``load(i)`` returns
    an RGB PIL image (default: `data.imagefolder.load_rgb` of ``paths[i]``),
    e.g. a reader's query loader that crops. ``variant`` tells the cache what
    ``load`` does beyond reading the file (e.g. "crop to bbx").
    """

    def __init__(self, paths, transform=None, load=None, variant: str = ""):
        self.paths = [os.fspath(path) for path in paths]
        self.root = os.path.commonpath(self.paths) if self.paths else ""
        self.samples = [(path, index) for index, path in enumerate(self.paths)]
        self.transform, self.load, self.variant = transform, load, variant

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = self.load(index) if self.load is not None else load_rgb(self.paths[index])
        return (self.transform(image) if self.transform is not None else image), index


def dataset_key(dataset) -> dict:
    """What identifies a dataset's features: its samples (hashed), transform and loader variant."""
    listing = "\n".join(f"{path}\t{label}" for path, label in dataset.samples)
    return {"root": os.path.abspath(dataset.root),
            "samples": hashlib.sha256(listing.encode()).hexdigest(), "num_samples": len(dataset.samples),
            "transform": repr(dataset.transform), "variant": getattr(dataset, "variant", "")}


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # 1-D: 0-d buffers can be viewed as bytes too
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extraction_defaults(device: torch.device) -> tuple[int, int]:
    """(batch size, loader workers) for extraction on ``device``: on CUDA 256 images a batch (bf16 ViT-S/16
    extracts thousands of images/s there) and up to 8 workers to decode and resize for it; on the CPU 64 and 2."""
    if device.type == "cuda":
        return 256, min(8, os.cpu_count() or 1)
    return 64, 2


@dataclass
class FeatureExtractor:
    """A frozen backbone plus how to extract from it: device, batch, precision, cache.

    ``extractor(dataset, spec, split)`` -> (features (N, F) float32 CPU,
    labels (N,) int64), read from ``cache_dir`` when a matching entry exists.
    ``extractor.batch(images, spec)`` -> (B, F) float32 on the device (no
    cache): the linear probe's augmented crops. The weights' fingerprint is
    taken once, at the first cached call: the backbone is frozen. ``refresh``
    recomputes each entry the first time this extractor is asked for it, even
    when the cache holds it, and replaces it.
    """
    model: nn.Module
    device: torch.device | str | None = None
    batch_size: int | None = None  # None: `extraction_defaults`
    num_workers: int | None = None
    fp32: bool = False
    cache_dir: str | os.PathLike | None = None
    progress: bool = True
    refresh: bool = False
    _fingerprint: str | None = field(default=None, init=False, repr=False)
    _refreshed: set = field(default_factory=set, init=False, repr=False)

    def __post_init__(self):
        self.device = torch.device(self.device) if self.device is not None else default_device()
        batch_size, num_workers = extraction_defaults(self.device)
        self.batch_size = self.batch_size or batch_size
        self.num_workers = num_workers if self.num_workers is None else self.num_workers
        self.model = self.model.eval().to(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 on CUDA unless ``fp32``; None (no autocast, fp32) on the CPU."""
        return torch.bfloat16 if self.device.type == "cuda" and not self.fp32 else None

    def batch(self, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
        return compute_features(self.model, images, self.device, spec, self.autocast_dtype)

    def cache_key(self, dataset, spec: FeatureSpec, split: str) -> dict:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        precision = "bf16-autocast" if self.autocast_dtype is not None else "fp32"
        return {"version": CACHE_VERSION, "model": self._fingerprint, "split": split,
                **dataset_key(dataset), "feature": spec.describe(), "precision": precision}

    def __call__(self, dataset, spec: FeatureSpec = FeatureSpec(), split: str = "features",
                 batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        path = key = None
        if self.cache_dir is not None:
            key = self.cache_key(dataset, spec, split)
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            path = Path(self.cache_dir) / f"{_file_safe(split)}-{digest}.pth"
            cached = read_cache(path, key, len(dataset)) if not self.refresh or path in self._refreshed else None
            if cached is not None:
                return cached
        features, labels = extract_features(self.model, dataset, batch_size or self.batch_size, self.device,
                                            self.num_workers, progress=f"{split} features" if self.progress else None,
                                            feature_fn=spec, autocast_dtype=self.autocast_dtype)
        if path is not None:
            atomic_save({"key": key, "features": features, "labels": labels}, path)
            self._refreshed.add(path)
        return features, labels


def as_extractor(source, device=None, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                 fp32: bool = True) -> FeatureExtractor:
    """``source`` itself when it is a `FeatureExtractor` (its own device, precision, cache), else an
    uncached one around the backbone ``source``."""
    if isinstance(source, FeatureExtractor):
        return source
    return FeatureExtractor(source, device, batch_size, num_workers, fp32=fp32, progress=progress)


def read_cache(path: Path, key: dict, num_samples: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) from a cache file holding exactly ``key``; None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        entry = safe_load(path)
    except UnreadableCheckpoint as error:
        progress_write(f"feature cache '{path}' {error.reason}; recomputing")
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or len(entry.get("features", ())) != num_samples:
        return None
    return entry["features"], entry["labels"]


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "features"

