"""Image retrieval on revisited Oxford / Paris (docs/protocols.md, "Image retrieval").

    python -m evaluate.retrieval --ckpt dino_vits16.pth --data /data/revisitop --datasets roxford5k
    python -m evaluate.retrieval --ckpt dino_vits16.pth --data /data/revisitop --datasets rparis6k \
        --imsize 512 --multiscale
    python -m evaluate.retrieval --ckpt runs/demo/checkpoint.pth --data data/suite/retrieval

Datasets: every ``<data>/<name>/`` holding ``gnd_<name>.pkl`` (read by
`data.revisitop.RevisitopDataset`), or those named by ``--datasets``.

Per image (batch size 1, any aspect ratio): RGB -> PIL ``thumbnail((S, S))``
(LANCZOS, aspect kept, longer side <= S, never upsampled; S = ``--imsize``,
224 by default, 512 in the README's rParis setting) -> tensor -> ImageNet
normalisation. Sides that are not multiples of the patch lose their
trailing pixels inside the backbone, as the official strided convolution
drops them. Feature: the backbone's [CLS]; with ``--multiscale`` the mean of
the raw [CLS] of the image bilinearly resized by 1, 1/sqrt(2) and 1/2.
Queries are the whole images (DINO's protocol); ``--crop-queries`` crops them
to their ``bbx`` first (revisitop's protocol).

Scoring: q and d L2-normalised, similarity S = D Q^T (n_db, n_q) (a plain
matrix product: a few thousand images need no index), ranks = database
indices by decreasing similarity per query (n_db, n_q), then revisitop mAP
(`evaluate.metrics.retrieval_scores`) under the Easy, Medium and Hard
protocols; DINO reports Medium and Hard. A protocol under which no query has
a positive (possible on small samples) is left out.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from common.atomic import atomic_write_text
from common.errors import UserError, run_cli
from common.transforms import IMAGENET_MEAN, IMAGENET_STD
from data.revisitop import RevisitopDataset

from .features import FeatureExtractor, FeatureSpec, ImageList
from .metrics import RETRIEVAL_PROTOCOLS, protocol_sets, ranking_from_similarity, retrieval_scores
from .model_source import add_evaluator_arguments, feature_extractor, load_model

MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)


class Thumbnail:
    """PIL image -> a copy shrunk with ``thumbnail((size, size), LANCZOS)``: aspect kept, never enlarged."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.copy()
        image.thumbnail((self.size, self.size), Image.LANCZOS)
        return image

    def __repr__(self) -> str:
        return f"Thumbnail(size={self.size}, LANCZOS)"


def retrieval_transform(imsize: int = 224) -> T.Compose:
    return T.Compose([Thumbnail(imsize), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def retrieval_spec(multiscale: bool = False) -> FeatureSpec:
    """[CLS] at scale 1, or averaged over 1, 1/sqrt(2), 1/2."""
    return FeatureSpec("cls", scales=MULTISCALE if multiscale else (1.0,))


def find_datasets(root) -> list[str]:
    """Names of the sub-folders ``root/<name>/`` holding ``gnd_<name>.pkl``, sorted."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"retrieval data folder '{root}' does not exist: pass --data <folder holding "
                        "<dataset>/gnd_<dataset>.pkl and <dataset>/jpg/> (revisitop's data/datasets)")
    names = sorted(entry.name for entry in os.scandir(root)
                   if entry.is_dir() and os.path.isfile(os.path.join(entry.path, f"gnd_{entry.name}.pkl")))
    if not names:
        raise UserError(f"no dataset under '{root}': expected {root}/<name>/gnd_<name>.pkl "
                        "(e.g. roxford5k/gnd_roxford5k.pkl)")
    return names


def rank_database(database_features: torch.Tensor, query_features: torch.Tensor):
    """(n_db, D), (n_q, D) raw features -> ranks (n_db, n_q): per query, database indices by decreasing cosine."""
    similarity = F.normalize(database_features.double(), dim=1) @ F.normalize(query_features.double(), dim=1).T
    return ranking_from_similarity(similarity.numpy())


def map_scores(ranks, queries, dataset: str) -> dict[str, float]:
    """{'<dataset>_mAP_<protocol>': mAP in percent} for each protocol under which some query has a positive."""
    scores = {}
    for protocol in RETRIEVAL_PROTOCOLS:
        if any(protocol_sets(query, protocol)[0].size for query in queries):
            scores[f"{dataset}_mAP_{protocol}"] = retrieval_scores(ranks, queries, protocol, kappas=()).map
    return scores


def dataset_features(extractor: FeatureExtractor, dataset: RevisitopDataset, imsize: int, multiscale: bool):
    """(database features (n_db, D), query features (n_q, D)), batch size 1, from the cache when possible."""
    transform, spec = retrieval_transform(imsize), retrieval_spec(multiscale)
    database = ImageList(dataset.database_paths, transform)
    queries = ImageList(dataset.query_paths, transform, load=dataset.load_query_image,
                        variant="crop to bbx" if dataset.crop_queries else "")
    database_features, _ = extractor(database, spec, f"{dataset.dataset}-database", batch_size=1)
    query_features, _ = extractor(queries, spec, f"{dataset.dataset}-queries", batch_size=1)
    return database_features, query_features


def run_retrieval(extractor: FeatureExtractor, data_root, dataset: str, imsize: int = 224, multiscale: bool = False,
                  crop_queries: bool = False, gnd_path=None) -> dict[str, float]:
    """mAP (percent) of ``extractor.model`` on ``data_root/dataset``: {'<dataset>_mAP_medium': ..., ...}."""
    revisitop = RevisitopDataset(data_root, dataset, gnd_path=gnd_path, crop_queries=crop_queries)
    database_features, query_features = dataset_features(extractor, revisitop, imsize, multiscale)
    ranks = rank_database(database_features, query_features)
    return map_scores(ranks, revisitop.ground_truth.queries, dataset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.retrieval",
                                     description="revisited Oxford/Paris retrieval mAP "
                                                 "(docs/protocols.md, 'Image retrieval')")
    parser.add_argument("--data", required=True, help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    parser.add_argument("--datasets", nargs="+", default=None, help="default: every dataset under --data")
    parser.add_argument("--gnd", default=None, help="ground-truth pickle to use instead of gnd_<dataset>.pkl "
                                                    "(one dataset only)")
    parser.add_argument("--imsize", type=int, default=224, help="longest side after thumbnail (never upsampled)")
    parser.add_argument("--multiscale", action="store_true", help="average [CLS] over scales 1, 1/sqrt(2), 1/2")
    parser.add_argument("--crop-queries", action="store_true",
                        help="crop queries to their bbx (revisitop protocol; DINO does not)")
    add_evaluator_arguments(parser, batch_size=1)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    datasets = args.datasets or find_datasets(args.data)
    if args.gnd and len(datasets) != 1:
        raise UserError(f"--gnd applies to one dataset, but {len(datasets)} are selected: pass --datasets NAME")
    extractor = feature_extractor(load_model(args), args)
    results = {}
    for dataset in datasets:
        scores = run_retrieval(extractor, args.data, dataset, args.imsize, args.multiscale, args.crop_queries,
                               args.gnd)
        print(f"{dataset}: " + "  ".join(f"{name.rsplit('_', 1)[1]} {value:.2f}" for name, value in scores.items()))
        results.update(scores)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
