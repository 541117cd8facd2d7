"""Copy detection on Copydays "strong" (docs/protocols.md, "Copy detection").

    python -m evaluate.copy_detection --ckpt dino_vitbase8.pth --data /data/copydays \
        --distractors /data/yfcc_10k --whitening /data/yfcc_20k
    python -m evaluate.copy_detection --ckpt runs/demo/checkpoint.pth --data data/suite/copydays \
        --distractors data/suite/copydays/distractors --whitening data/suite/copydays/whitening --imsize 64

Images (read by `data.copydays.Copydays`): square resize to S x S (bicubic,
aspect not kept; S = ``--imsize``, 320 as in the paper's ViT-B/8 row) ->
tensor -> ImageNet normalisation. Descriptor: x = [CLS] ++ GeM_4(patch
tokens) of the last block (2D, `evaluate.descriptors.copy_detection_descriptor`).

Database: the originals, then the distractors when given (paper: 10k
YFCC100M images). Queries: every block (original, strong, jpegqual/*,
crops/*). With a whitening set W (paper: 20k other YFCC100M images),
x -> diag(lambda^-1/2) V^T (x - mean(W)) with (lambda, V) the eigenpairs of
W^T W / n (`evaluate.descriptors.fit_pca_whitening`, the official uncentred
variant). Then L2-normalisation, cosine similarity, the top 20 database
images per query, AP over those 20 (`evaluate.metrics.copy_detection_block_maps`),
mAP per block. The reported number is the ``strong`` block's mAP (percent).
"""
from __future__ import annotations

import argparse
import json

import torch
import torchvision.transforms as T

from common.atomic import atomic_write_text
from common.errors import run_cli
from common.transforms import IMAGENET_MEAN, IMAGENET_STD
from data.copydays import STRONG_BLOCK, Copydays

from .descriptors import fit_pca_whitening
from .features import FeatureExtractor, FeatureSpec, ImageList
from .metrics import copy_detection_block_maps
from .model_source import add_evaluator_arguments, feature_extractor, load_model
from .retrieval import rank_database

TOP_K = 20
COPY_DETECTION_SPEC = FeatureSpec("copy_detection", gem_p=4.0)


def copy_detection_transform(imsize: int = 320) -> T.Compose:
    return T.Compose([T.Resize((imsize, imsize), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def top_matches(database_features: torch.Tensor, query_features: torch.Tensor, top_k: int = TOP_K):
    """(n_db, D), (n_q, D) descriptors -> (n_q, min(top_k, n_db)) database indices by decreasing cosine."""
    return rank_database(database_features, query_features)[:top_k].T


def copy_detection_descriptors(extractor: FeatureExtractor, copydays: Copydays, imsize: int, query_paths,
                               query_split: str = "copydays-queries") -> tuple[torch.Tensor, torch.Tensor]:
    """(database (n_db, D), queries (n_q, D)) descriptors of ``query_paths`` and the Copydays database,
    PCA-whitened (fitted on the whitening set) when ``copydays`` has one. Cached under ``copydays-<split>``."""
    transform = copy_detection_transform(imsize)

    def features_of(paths, split):
        return extractor(ImageList(paths, transform), COPY_DETECTION_SPEC, split)[0]

    database = features_of(copydays.database_paths, "copydays-database")
    queries = features_of(query_paths, query_split)
    if copydays.whitening_paths:
        whitening_map = fit_pca_whitening(features_of(copydays.whitening_paths, "copydays-whitening"))
        database, queries = whitening_map.apply(database), whitening_map.apply(queries)
    return database, queries


def run_copy_detection(extractor: FeatureExtractor, data_root, imsize: int = 320, distractors=None, whitening=None,
                       top_k: int = TOP_K) -> dict:
    """Per-block mAP (percent) of ``extractor.model`` on the Copydays tree ``data_root``.

    Returns {'copydays_strong_mAP': strong block mAP, 'block_maps': {block: mAP},
    'database_size': originals + distractors, 'whitened': bool}.
    """
    copydays = Copydays(data_root, distractors_path=distractors, whitening_path=whitening)
    database, queries = copy_detection_descriptors(extractor, copydays, imsize, copydays.query_paths)
    retrieved = top_matches(database, queries, top_k)
    positives = [positive for block in copydays.query_blocks for positive in block.positives]
    blocks = [(block.name, len(block.paths)) for block in copydays.query_blocks]
    block_maps = copy_detection_block_maps(retrieved, positives, blocks, top_k)
    return {"copydays_strong_mAP": block_maps[STRONG_BLOCK], "block_maps": block_maps,
            "database_size": len(copydays.database_paths), "whitened": bool(copydays.whitening_paths)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.copy_detection",
                                     description="Copydays copy-detection mAP (docs/protocols.md, 'Copy detection')")
    parser.add_argument("--data", required=True, help="Copydays folder: original/, strong/, jpegqual/<q>/, crops/<c>/")
    parser.add_argument("--distractors", default=None, help="flat folder of distractor images added to the database")
    parser.add_argument("--whitening", default=None, help="flat folder of images to learn the whitening on")
    parser.add_argument("--imsize", type=int, default=320, help="square resize side (paper: 320 for ViT-B/8)")
    parser.add_argument("--top-k", type=int, default=TOP_K)
    add_evaluator_arguments(parser, batch_size=16)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    extractor = feature_extractor(load_model(args), args)
    result = run_copy_detection(extractor, args.data, args.imsize, args.distractors, args.whitening, args.top_k)
    for block, value in result["block_maps"].items():
        print(f"eval on {block} mAP={value:.2f}")
    print(f"copydays strong mAP {result['copydays_strong_mAP']:.2f} (database {result['database_size']} images, "
          f"{'whitened' if result['whitened'] else 'no whitening'})")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
