"""DAVIS label propagation speed at 480p: the batched propagation against a per-context loop.

    python -m bench.davis_propagation [--arch vit_small] [--patch 16] [--frames 5] [--threads 2]

A random-init backbone on random 832x480 frames (the size DAVIS's 854x480
frames are resized to; decoding is not timed). Measured, each over
``--frames`` target frames, with a full context (the first frame + 7 recent
frames, features recycled from the measured frames):

* features: `evaluate.video_segmentation.patch_features` per frame;
* propagation, batched: `evaluate.label_propagation.propagate_labels` (one
  matmul of the target against every context frame, cached neighbourhood mask);
* propagation, per-context loop: the same math with one matmul, exp and mask
  per context frame, concatenated before the joint top-k (and the mask
  rebuilt per frame, as a naive version would);
* end to end = 1 / (feature time + batched propagation time) per frame.

Both propagations run in fp32 with TF32 off; their outputs are compared.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from evaluate.label_propagation import full_fp32_matmuls, neighbourhood_mask, propagate_labels
from evaluate.video_segmentation import patch_features
from pretrain import build_backbone


def propagate_per_context(target, context_features, context_labels, grid, radius=12, topk=5, temperature=0.1):
    """The baseline: a loop over context frames, one (N, N) affinity each, then the joint top-k."""
    mask = neighbourhood_mask.__wrapped__(grid[0], grid[1], radius, str(target.device))  # uncached
    target = F.normalize(target, dim=-1)
    affinities = [torch.exp(target @ F.normalize(features, dim=-1).T / temperature) * mask
                  for features in context_features]
    affinity = torch.cat(affinities, dim=1)
    kth_largest = affinity.topk(topk, dim=1).values[:, -1:]
    affinity = torch.where(affinity < kth_largest, torch.zeros_like(affinity), affinity)
    return (affinity / affinity.sum(dim=1, keepdim=True)) @ context_labels.reshape(-1, context_labels.shape[-1])


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--classes", type=int, default=4, help="label channels (background + objects)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_backbone(args.arch, args.patch).eval().to(device)
    frames = [torch.randn(3, 480, 832) for _ in range(args.frames)]
    with full_fp32_matmuls(), torch.inference_mode():
        patch_features(model, frames[0], device)  # warm-up
        features, feature_seconds = [], 0.0
        for frame in frames:
            (frame_features, grid), seconds = timed(lambda: patch_features(model, frame, device), device)
            features.append(frame_features)
            feature_seconds += seconds
        contexts = torch.stack([features[i % len(features)] for i in range(8)])
        labels = torch.softmax(torch.randn(8, contexts.shape[1], args.classes, device=device) * 3, dim=-1)
        propagate_labels(features[0], contexts, labels, grid)  # warm-up, and builds the cached mask
        batched_seconds = loop_seconds = max_difference = 0.0
        for target in features:
            batched, seconds = timed(lambda: propagate_labels(target, contexts, labels, grid), device)
            batched_seconds += seconds
            looped, seconds = timed(lambda: propagate_per_context(target, contexts, labels, grid), device)
            loop_seconds += seconds
            max_difference = max(max_difference, (batched - looped).abs().max().item())
    n = len(frames)
    print(f"{args.arch}/{args.patch} on {device} ({torch.get_num_threads()} threads), 832x480 frames, "
          f"{grid[1]}x{grid[0]} patches, 8 context frames, {n} frames")
    print(f"features                     {n / feature_seconds:8.2f} frames/s")
    print(f"propagation, batched         {n / batched_seconds:8.2f} frames/s")
    print(f"propagation, per-context     {n / loop_seconds:8.2f} frames/s  "
          f"(batched is {loop_seconds / batched_seconds:.2f}x faster; max |difference| {max_difference:.1e})")
    print(f"end to end (features + batched propagation) {n / (feature_seconds + batched_seconds):8.2f} frames/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
