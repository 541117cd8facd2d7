"""Emergence diagnostics: do a backbone's features spread out, and do its [CLS] heads land on the object?

    python -m evaluate.emergence --ckpt runs/demo/checkpoint.pth --data-root data/suite
    python -m evaluate.emergence --ckpt runs/demo/checkpoint.pth --key student
    python -m evaluate.emergence --random-like runs/demo/checkpoint.pth      # that run's random twin

Feature geometry (`feature_geometry`) of features F (N, D), each row first
L2-normalised to f_i (as the k-NN does):

    mean_pairwise_cosine = mean over i != j of f_i . f_j
                         = (||sum_i f_i||^2 - sum_i ||f_i||^2) / (N (N - 1))   (sum_i ||f_i||^2 = N: unit rows)
                           1 when every feature points one way (collapse), about 0 when they spread
    effective_rank       = exp(H(p)),  H(p) = -sum_k p_k log p_k (0 log 0 = 0),  p_k = lambda_k / sum_l lambda_l,
                           lambda the eigenvalues of the (D, D) covariance of the centred f_i;
                           in [1, D], m for variance spread evenly over m orthogonal directions,
                           and 1 by definition when there is no variance at all (all f_i equal)

Object attention share (`object_attention_share`) on a VOC split, each image
and its class labels resized as `evaluate.attention_masks` resizes them
(H = h p, W = w p), with A_k (h, w) head k's last-block [CLS] attention:

    c(patch)   = object pixels / non-void pixels of the patch   (object: label not 0 and not 255; void: 255);
                 a patch that is all void is dropped from every sum below
    share_k    = sum_patches A_k(patch) c(patch) / sum_patches A_k(patch)   head k's attention on the objects
    area       = mean over patches of c(patch)                               what a uniform attention would get
    per_head_k = 100 * mean over images with an object of share_k;  best_head = max_k per_head_k;
    object_area = 100 * mean over the same images of area

`diagnose` gives one backbone's whole diagnosis on a data root holding the
suite's parts (see `evaluate.eval_plan`): the 20-NN top-1 on the
classification part at eval-all's k-NN crop, the feature geometry of that
part's val [CLS] features at the same crop, and the object attention share on
the VOC part at eval-all's VOC size. A DINO backbone should beat its random
twin on all three: higher top-1, lower mean cosine, higher rank, a best head
well above ``object_area``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from common.atomic import atomic_write_text
from common.errors import UserError, run_cli
from common.progress import progress_bar
from data.voc import VOCSegmentation
from pretrain.backbones import describe

from .attention_masks import RESIZE_MODES, VOCAttentionPairs, cls_attentions
from .eval_plan import PART_FOLDERS, EvalOptions, ModelInfo, find_part, plan
from .features import FeatureExtractor, FeatureSpec, as_extractor, default_device
from .knn import knn_datasets, run_knn
from .model_source import add_evaluator_arguments, feature_extractor, load_model, trained_crop_size

BACKGROUND, VOID = 0, 255
KNN_K = 20
ZERO_VARIANCE = 1e-12  # total variance of unit rows is at most 1; below this it is rounding, not spread
RANDOM_TWIN, TEACHER, STUDENT = "random init", "DINO (teacher)", "DINO (student)"
# the diagnosis' numbers, in table order: key -> row label
ROWS = {"knn20_top1": "k-NN 20 top-1 (%)", "mean_pairwise_cosine": "mean pairwise cosine",
        "effective_rank": "effective rank", "best_head_object_share": "best-head object share (%)",
        "per_head_object_share": "per-head object shares (%)", "object_area": "object area (%)"}


# ---------------------------------------------------------------- feature geometry
def feature_geometry(features: torch.Tensor) -> dict[str, float]:
    """{'mean_pairwise_cosine', 'effective_rank'} of (N, D) features, N >= 2 (see the module docstring)."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature geometry needs (N, D) features with N >= 2, got shape {tuple(features.shape)}")
    unit = torch.nn.functional.normalize(features.double(), dim=1)  # a zero row stays zero
    total = unit.sum(dim=0)
    n = len(unit)
    mean_cosine = (total @ total - (unit * unit).sum()) / (n * (n - 1))
    centred = unit - unit.mean(dim=0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / (n - 1)).clamp(min=0)
    variance = eigenvalues.sum()
    if variance <= ZERO_VARIANCE:
        return {"mean_pairwise_cosine": float(mean_cosine), "effective_rank": 1.0}
    p = eigenvalues / variance
    entropy = -(p * torch.log(torch.where(p > 0, p, 1.0))).sum()
    return {"mean_pairwise_cosine": float(mean_cosine), "effective_rank": float(torch.exp(entropy))}


# ---------------------------------------------------------------- object attention share
def patch_object_fractions(labels: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) label maps, H and W multiples of p -> (c (B, h, w) float64, kept (B, h, w) bool).

    c = object pixels / non-void pixels of each p x p patch (0 where dropped); ``kept``: the patch has a
    non-void pixel.
    """
    batch, height, width = labels.shape
    blocks = labels.reshape(batch, height // patch_size, patch_size, width // patch_size, patch_size)
    void = blocks == VOID
    objects = ((blocks != BACKGROUND) & ~void).sum(dim=(2, 4)).double()
    non_void = (~void).sum(dim=(2, 4)).double()
    kept = non_void > 0
    return torch.where(kept, objects / non_void.clamp(min=1), 0.0), kept


def attention_object_shares(attentions: torch.Tensor, fractions: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w) attentions, (B, h, w) fractions c and kept patches -> (B, heads) share_k."""
    weights = attentions.double() * kept[:, None]
    mass = weights.sum(dim=(2, 3)).clamp(min=torch.finfo(torch.float64).tiny)
    return (weights * fractions[:, None]).sum(dim=(2, 3)) / mass


@torch.no_grad()
def object_attention_share(model: torch.nn.Module, voc_root, split: str = "val", image_size: int = 480,
                           resize: str = "square", batch_size: int = 16, device=None, num_workers: int = 0,
                           progress: bool = False) -> dict:
    """{'per_head': [percent per head], 'best_head': percent, 'object_area': percent} on a VOC split's class
    masks (see the module docstring); images without an object are left out."""
    if not hasattr(model, "get_last_selfattention") or not hasattr(model, "patch_size"):
        raise UserError(f"the object attention share needs a ViT backbone, not {type(model).__name__}")
    if resize not in RESIZE_MODES:
        raise UserError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    voc = VOCSegmentation(voc_root, split, mask_kinds=("class",))
    pairs = VOCAttentionPairs(voc, "class", model.patch_size, image_size, resize)
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size if resize == "square" else 1,
                                         num_workers=num_workers)
    device = device or default_device()
    model = model.float().eval().to(device)
    shares, areas = [], []
    for images, labels in progress_bar(loader, desc="object attention", unit="batch", disable=not progress):
        attentions = cls_attentions(model, images.to(device)).cpu()
        fractions, kept = patch_object_fractions(labels.long(), model.patch_size)
        has_object = (fractions > 0).flatten(1).any(dim=1)
        shares.append(attention_object_shares(attentions, fractions, kept)[has_object])
        areas.append((fractions.sum(dim=(1, 2)) / kept.sum(dim=(1, 2)).clamp(min=1))[has_object])
    shares, areas = torch.cat(shares), torch.cat(areas)
    if not len(shares):
        raise UserError(f"no image of '{voc.split_file}' has an object in its class mask: no attention share")
    per_head = (100 * shares.mean(dim=0)).tolist()
    return {"per_head": per_head, "best_head": max(per_head), "object_area": float(100 * areas.mean())}


# ---------------------------------------------------------------- one backbone's diagnosis
@contextlib.contextmanager
def cached_extractor(source, device=None, batch_size: int = 64, progress: bool = False):
    """``source`` (a backbone or a `FeatureExtractor`) as an extractor with a feature cache, so that the
    k-NN's val features are read back, not extracted twice; a scratch cache when it has none."""
    if isinstance(source, FeatureExtractor) and source.cache_dir is not None:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="emergence-") as scratch:
        extractor = as_extractor(source, device, batch_size, num_workers=0, progress=progress)
        yield dataclasses.replace(extractor, cache_dir=scratch)


def diagnose(source, data_root, train_args: dict | None = None, device=None, batch_size: int = 64,
             progress: bool = False) -> dict:
    """One backbone's diagnosis on the classification and VOC parts under ``data_root``.

    ``source``: a backbone (fp32, a scratch cache) or a `FeatureExtractor` (its device, precision and cache:
    eval-all's cache makes the k-NN free); ``train_args``: the checkpoint's, for the k-NN crop.
    Returns {`ROWS` key: value} -- 'knn20_top1' (percent), 'mean_pairwise_cosine', 'effective_rank',
    'best_head_object_share', 'per_head_object_share' (list), 'object_area' (percents) -- plus 'image_sizes'
    {'knn', 'voc'}; the values of a part whose folder is absent are None, as is the attention share of a
    backbone without attention (a convnet). UserError when ``data_root`` holds neither part, or when one is
    broken (eval-all's planning failure, e.g. an unreadable SUITE.json).
    """
    root = Path(data_root)
    parts = {part: find_part(root, part) if root.is_dir() else None for part in ("classification", "voc")}
    if not any(parts.values()):
        looked_for = " or ".join("|".join(PART_FOLDERS[part]) + "/" for part in parts)
        raise UserError(f"data root '{root}' holds no {looked_for}: pass --data-root (make data writes data/suite)")
    with cached_extractor(source, device, batch_size, progress) as extractor:
        model = extractor.model
        spec = describe(model)
        info = ModelInfo(spec["arch"], spec["patch"], getattr(model, "embed_dim", 0), trained_crop_size(train_args))
        evaluations, failures = plan(root, info, EvalOptions(only=("knn", "voc")))
        if failures:
            raise UserError(f"{failures[0][0]} part: {failures[0][1]}")
        settings = {evaluation.kind: evaluation for evaluation in evaluations}
        diagnosis = dict.fromkeys(ROWS) | {"image_sizes": {"knn": None, "voc": None}}
        if "knn" in settings:
            knn = settings["knn"]
            size = knn.settings["image_size"]
            top1, _ = run_knn(extractor, knn.data, size, ks=(KNN_K,), temperature=knn.settings["temperature"])[KNN_K]
            val_features, _ = extractor(knn_datasets(knn.data, size)[1], FeatureSpec("cls"), "val")
            diagnosis |= {"knn20_top1": float(top1), **feature_geometry(val_features)}
            diagnosis["image_sizes"]["knn"] = size
        if "voc" in settings and hasattr(model, "get_last_selfattention"):
            voc = settings["voc"]
            share = object_attention_share(model, voc.data, "val", voc.settings["image_size"], voc.settings["resize"],
                                           extractor.batch_size, extractor.device, progress=progress)
            diagnosis |= {"best_head_object_share": share["best_head"], "per_head_object_share": share["per_head"],
                          "object_area": share["object_area"]}
            diagnosis["image_sizes"]["voc"] = voc.settings["image_size"]
    return diagnosis


def format_value(key: str, value) -> str:
    """A table cell: '-' for a missing value, per-head shares joined by ' / ', numbers with 2 decimals."""
    if value is None:
        return "-"
    if key == "per_head_object_share":
        return " / ".join(f"{share:.1f}" for share in value)
    return f"{value:.2f}"


def format_diagnoses(diagnoses: dict[str, dict]) -> str:
    """A text table: one row per `ROWS` entry, one column per model (``diagnoses``: {model name: diagnosis})."""
    names = list(diagnoses)
    cells = {key: [format_value(key, diagnoses[name].get(key)) for name in names] for key in ROWS}
    widths = [max(len(name), *(len(cells[key][column]) for key in ROWS)) for column, name in enumerate(names)]
    label_width = max(map(len, ROWS.values()))
    lines = [f"{'emergence':<{label_width}}  " + "  ".join(f"{name:>{width}}" for name, width in zip(names, widths))]
    lines.append("-" * len(lines[0]))
    for key, label in ROWS.items():
        lines.append(f"{label:<{label_width}}  " + "  ".join(f"{cell:>{width}}" for cell, width
                                                             in zip(cells[key], widths)))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.emergence",
                                     description="emergence diagnostics of a backbone: 20-NN top-1, feature "
                                                 "geometry, [CLS] attention on the objects")
    parser.add_argument("--data-root", default="data/suite", help="folder holding classification/ and voc/ "
                                                                  "(default data/suite)")
    add_evaluator_arguments(parser, batch_size=64)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    source = load_model(args)
    label = f"{RANDOM_TWIN} ({source.run})" if source.random else f"{source.run} ({source.key})"
    diagnosis = diagnose(feature_extractor(source, args), args.data_root, source.train_args,
                         progress=not args.no_progress)
    print(format_diagnoses({label: diagnosis}))
    sizes = diagnosis["image_sizes"]
    print(f"k-NN crop {sizes['knn'] or '-'}, VOC size {sizes['voc'] or '-'}; "
          f"object area = the share a uniform attention gets")
    if args.json:
        atomic_write_text(args.json, json.dumps({label: diagnosis}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
