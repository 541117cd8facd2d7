"""Evaluation speed: feature extraction, and k-NN search with FAISS against a dense matmul.

    python -m bench.eval_throughput [--arch vit_small] [--patch 16] [--sizes 10000 100000 1000000]

* feature extraction: images/s of `evaluate.features.FeatureExtractor` ([CLS]
  of a random-init backbone, 224 x 224 inputs already decoded, batch
  ``--batch``; fp32 on the CPU, bf16 autocast on CUDA);
* k-NN search: ``--queries`` L2-normalised random queries against databases
  of each ``--sizes`` (dimension ``--dim``, 384 = ViT-S), top-``--k``:
  FAISS exact inner-product search (`evaluate.knn.faiss_neighbours`, a GPU
  index when there is one) against the dense search of the official k-NN
  evaluator, chunks of queries times the whole database by matmul then
  topk (`pretrain.monitor.exact_neighbours`). Both return the same
  neighbours; the table prints the time of each and their ratio.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common.knn import exact_neighbours
from evaluate.features import FeatureExtractor, FeatureSpec
from evaluate.knn import faiss_neighbours
from pretrain import build_backbone


def timed(function, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls (s) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def extraction_rate(arch: str, patch: int, batch: int, batches: int) -> float:
    """Images/s of [CLS] extraction at 224 (one warm-up batch not counted)."""
    model = build_backbone(arch, patch).eval()
    extractor = FeatureExtractor(model, batch_size=batch, num_workers=0, progress=False)
    images = torch.randn(batch, 3, 224, 224)
    spec = FeatureSpec("cls")
    extractor.batch(images, spec)  # warm-up
    seconds, _ = timed(lambda: [extractor.batch(images, spec) for _ in range(batches)])
    return batch * batches / seconds


def search_times(size: int, dim: int, queries: int, k: int) -> tuple[float, float, bool]:
    """(FAISS seconds, dense matmul seconds, same neighbours) for one database size."""
    generator = torch.Generator().manual_seed(size)
    database = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
    query = F.normalize(torch.randn(queries, dim, generator=generator), dim=1)
    faiss_seconds, (_, faiss_index) = timed(lambda: faiss_neighbours(database, query, k))
    dense_seconds, (_, dense_index) = timed(lambda: exact_neighbours(database, query, k))
    same = bool((faiss_index.sort(1).values == dense_index.sort(1).values).float().mean() > 0.999)
    return faiss_seconds, dense_seconds, same


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    rate = extraction_rate(args.arch, args.patch, args.batch, args.batches)
    print(f"feature extraction, {args.arch}/{args.patch} at 224, batch {args.batch}, {device}: {rate:.1f} images/s")
    print(f"k-NN search: {args.queries} queries, dim {args.dim}, top-{args.k}")
    print(f"{'database':>10} {'FAISS s':>9} {'matmul s':>9} {'matmul/FAISS':>13} {'same':>5}")
    for size in args.sizes:
        faiss_seconds, dense_seconds, same = search_times(size, args.dim, args.queries, args.k)
        print(f"{size:>10} {faiss_seconds:>9.3f} {dense_seconds:>9.3f} {dense_seconds / faiss_seconds:>13.2f} "
              f"{'yes' if same else 'NO':>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
