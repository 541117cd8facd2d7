"""Weighted k-NN classification on frozen teacher features (docs/protocols.md, "k-NN").

    python -m evaluate.knn --ckpt runs/demo/checkpoint.pth --data data/suite/classification
    python -m evaluate.knn --ckpt random --arch vit_small --patch 16 --data /data/imagenet

Features: the backbone's final-normed [CLS] of Resize(r, bicubic) +
CenterCrop(s) images (s = 224, r = 256 for ImageNet; ``--image-size`` sets
s and r = s * 256 / 224), L2-normalised. Neighbours: FAISS exact
inner-product search (a GPU index when CUDA and faiss GPU support are
present). Scores: ``common.knn`` (the weighted vote, exp(cos / T), T = 0.07).
Prints top-1/top-5 for k in 10, 20, 100, 200; k = 20 is the paper's number.
Model, extraction and cache flags: `evaluate.model_source`, the same in every
evaluator (features cached in results/<run>/features unless --no-cache).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from common.atomic import atomic_write_text
from common.errors import UserError, run_cli
from common.knn import knn_scores
from common.transforms import eval_transform
from data.imagefolder import ImageFolder, split_root

from .features import FeatureSpec, as_extractor
from .model_source import add_evaluator_arguments, feature_extractor, load_model

DEFAULT_KS = (10, 20, 100, 200)


def faiss_neighbours(train_features: torch.Tensor, query_features: torch.Tensor, k: int,
                     use_gpu: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k with FAISS: (similarities (Q, k), indices (Q, k))."""
    import faiss  # here, not at import time: a machine whose FAISS build does not load still runs the rest
    train = np.ascontiguousarray(train_features.float().cpu().numpy())
    queries = np.ascontiguousarray(query_features.float().cpu().numpy())
    index = faiss.IndexFlatIP(train.shape[1])
    if use_gpu is None:
        use_gpu = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(train)
    similarities, indices = index.search(queries, min(k, train.shape[0]))
    return torch.from_numpy(similarities), torch.from_numpy(indices).long()


def knn_datasets(data_root, image_size: int = 224) -> tuple[ImageFolder, ImageFolder]:
    """``data_root``/train and /val as the evaluator reads them (Resize + CenterCrop to ``image_size``);
    their class folders must match."""
    train_dir, val_dir = split_root(data_root)
    transform = eval_transform(image_size)
    train_set, val_set = ImageFolder(train_dir, transform), ImageFolder(val_dir, transform)
    if train_set.classes != val_set.classes:
        raise UserError(f"train and val of '{data_root}' have different class folders: they must match")
    return train_set, val_set


def run_knn(source, data_root: str, image_size: int = 224, batch_size: int = 128, ks=DEFAULT_KS,
            temperature: float = 0.07, num_workers: int = 2, device=None) -> dict[int, tuple[float, float]]:
    """Extract features of ``data_root``/train and /val and score weighted k-NN.

    ``source``: a backbone (features in fp32, not cached; ``batch_size``,
    ``num_workers`` and ``device`` say how) or a `FeatureExtractor` (its own
    device, precision, batch size and feature cache).
    """
    train_set, val_set = knn_datasets(data_root, image_size)
    extractor = as_extractor(source, device, batch_size, num_workers)
    train_f, train_y = extractor(train_set, FeatureSpec("cls"), "train")
    val_f, val_y = extractor(val_set, FeatureSpec("cls"), "val")
    return knn_scores(train_f, train_y, val_f, val_y, ks, temperature, search=faiss_neighbours)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.knn",
                                     description="weighted k-NN evaluation of a backbone")
    parser.add_argument("--data", required=True, help="folder with train/<class>/... and val/<class>/...")
    parser.add_argument("--image-size", type=int, default=None,
                        help="centre-crop side (default 224, or the checkpoint's global crop size)")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--temperature", type=float, default=0.07)
    add_evaluator_arguments(parser, batch_size=128)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    source = load_model(args)
    image_size = args.image_size or source.crop_size or 224
    results = run_knn(feature_extractor(source, args), args.data, image_size, ks=tuple(args.ks),
                      temperature=args.temperature)
    for k, (top1, top5) in results.items():
        print(f"{k}-NN: top-1 {top1:.2f}  top-5 {top5:.2f}")
    if args.json:
        atomic_write_text(args.json, json.dumps({str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
