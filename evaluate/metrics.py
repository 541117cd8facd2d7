"""Scores of the paper's evaluations, usable on any method's output (docs/protocols.md, "Evaluators").

    python -m evaluate.metrics davis --davis-root /data/DAVIS --pred results/davis [--split val]

* Retrieval (revisited Oxford/Paris; docs/protocols.md, "Image retrieval"): revisitop mAP and mP@k from a
  ranking (n_db, n_queries), junk removed from the ranking before positions
  are counted, AP by trapezoids over the precision-recall curve.
* Copy detection (Copydays; docs/protocols.md, "Copy detection"): the same trapezoid AP over the top-K list
  only, divided by the total number of positives; mAP per query block.
* DAVIS-2017 semi-supervised (docs/protocols.md, "DAVIS video segmentation"): J (region IoU) and F (boundary
  F-measure), per object over every frame but the first and the last,
  J&F = (J-Mean + F-Mean) / 2, as the davis2017-evaluation package scores it.
* Attention masks (docs/protocols.md, "VOC attention-mask Jaccard"): per-head masks keeping the patches that carry a
  fraction t of the [CLS] attention mass; best-head Jaccard against the
  objects of a label map (255 = void ignored).

Every score a function returns in percent says so; per-frame / per-query
building blocks return fractions in [0, 1].
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.errors import UserError, run_cli
from data.index_masks import VOID_LABEL, object_labels, read_index_mask
from data.split_files import read_split_file

RETRIEVAL_PROTOCOLS = ("easy", "medium", "hard")


# ----------------------------------------------------------------- retrieval

def trapezoid_average_precision(positive_ranks, n_positives: int) -> float:
    """AP by trapezoids over the PR curve (revisitop ``compute_ap``, Holidays AP).

    ``positive_ranks``: increasing 0-based ranks r_0 < r_1 < ... of the
    positives that were retrieved. For the j-th of them (0-based) the PR curve
    steps from precision p0 = j / r_j (1 when r_j = 0) to p1 = (j + 1) / (r_j + 1)
    over a recall step of 1 / n_positives:

        AP = sum_j (p0_j + p1_j) / 2 / n_positives.

    Positives never retrieved add nothing (they still count in n_positives).
    """
    ranks = np.asarray(positive_ranks, dtype=np.float64)
    if n_positives <= 0:
        raise ValueError("average precision needs at least one positive")
    order = np.arange(len(ranks), dtype=np.float64)
    precision_before = np.where(ranks == 0, 1.0, order / np.maximum(ranks, 1.0))
    precision_after = (order + 1.0) / (ranks + 1.0)
    return float(np.sum(precision_before + precision_after) / 2.0 / n_positives)


def ranking_from_similarity(similarity) -> np.ndarray:
    """Ranks (n_db, n_queries) from similarities (n_db, n_queries): each column's database
    indices by decreasing similarity; ties keep the lower database index first (stable sort)."""
    return np.argsort(-np.asarray(similarity), axis=0, kind="stable")


def protocol_sets(query_gnd: dict, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) database indices of one query under a revisitop protocol.

    easy: positives easy, ignored junk + hard; medium: positives easy + hard,
    ignored junk; hard: positives hard, ignored junk + easy. ``query_gnd`` is a
    gnd-pickle dict or an object with easy/hard/junk attributes
    (`data.revisitop.QueryGroundTruth`).
    """
    if protocol not in RETRIEVAL_PROTOCOLS:
        raise ValueError(f"unknown retrieval protocol {protocol!r}: use one of {RETRIEVAL_PROTOCOLS}")
    lookup = query_gnd.get if isinstance(query_gnd, dict) else lambda key, default: getattr(query_gnd, key, default)
    easy, hard, junk = (np.asarray(lookup(key, []), dtype=np.int64).ravel() for key in ("easy", "hard", "junk"))
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    return hard, np.concatenate([junk, easy])


def positive_ranks_without_junk(ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in ``ranking`` once the ignored items are removed from it."""
    is_positive = np.isin(ranking, positives)
    is_ignored = np.isin(ranking, ignored)
    ignored_before = np.cumsum(is_ignored) - is_ignored
    positions = np.flatnonzero(is_positive)
    return positions - ignored_before[positions]


@dataclass
class RetrievalScores:
    """mAP and mean precision at k (percent, over queries with positives);
    per-query AP (fraction, NaN if no positive)."""
    map: float
    precision_at: dict[int, float]
    ap_per_query: np.ndarray


def retrieval_scores(ranks, gnd, protocol: str = "medium", kappas=(1, 5, 10)) -> RetrievalScores:
    """revisitop ``compute_map`` for one protocol.

    ranks: int (n_db, n_queries), column q = database indices sorted by
    decreasing similarity to query q. gnd: one dict per query with 'easy',
    'hard', 'junk' index lists. Precision at k of a query uses
    k' = min(k, last retrieved positive's 1-based rank): #positives ranked <= k' / k'.
    Queries without positives are left out of both means.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks must be (n_db, n_queries={len(gnd)}), got shape {ranks.shape}")
    ap_per_query = np.full(len(gnd), np.nan)
    precisions = np.full((len(gnd), len(kappas)), np.nan)
    for query, query_gnd in enumerate(gnd):
        positives, ignored = protocol_sets(query_gnd, protocol)
        if positives.size == 0:
            continue
        positions = positive_ranks_without_junk(ranks[:, query], positives, ignored)
        ap_per_query[query] = trapezoid_average_precision(positions, positives.size)
        one_based = positions + 1
        for column, k in enumerate(kappas):
            k_clipped = min(int(one_based.max()), k) if one_based.size else k
            precisions[query, column] = np.sum(one_based <= k_clipped) / k_clipped
    scored = ~np.isnan(ap_per_query)
    if not scored.any():
        raise ValueError(f"no query has a positive under the {protocol!r} protocol")
    return RetrievalScores(map=100.0 * float(ap_per_query[scored].mean()),
                           precision_at={k: 100.0 * float(precisions[scored, c].mean()) for c, k in enumerate(kappas)},
                           ap_per_query=ap_per_query)


def retrieval_map(ranks, gnd, protocol: str = "medium") -> float:
    """revisitop mAP in percent (see `retrieval_scores`)."""
    return retrieval_scores(ranks, gnd, protocol, kappas=()).map


# ------------------------------------------------------------ copy detection

def copy_detection_ap(retrieved, positives, top_k: int = 20) -> float:
    """AP (fraction) of one query from its retrieved database indices (best first).

    Only the first ``top_k`` results count; positives ranked beyond them are
    missed but still divide the AP (trapezoid rule of `trapezoid_average_precision`).
    """
    positives = np.asarray(list(positives), dtype=np.int64)
    if positives.size == 0:
        raise ValueError("a copy-detection query needs at least one positive")
    top = np.asarray(retrieved)[:top_k]
    return trapezoid_average_precision(np.flatnonzero(np.isin(top, positives)), positives.size)


def copy_detection_map(retrieved, positives_per_query, top_k: int = 20) -> float:
    """mAP in percent over queries; retrieved: (n_queries, >= top_k) database indices, best first."""
    if len(retrieved) != len(positives_per_query) or len(retrieved) == 0:
        raise ValueError(f"{len(retrieved)} result lists for {len(positives_per_query)} queries")
    return 100.0 * float(np.mean([copy_detection_ap(row, positives, top_k)
                                  for row, positives in zip(retrieved, positives_per_query)]))


def copy_detection_block_maps(retrieved, positives_per_query, blocks, top_k: int = 20) -> dict[str, float]:
    """mAP (percent) of each block of consecutive queries; blocks: [(name, n_queries), ...] in query order."""
    if sum(size for _, size in blocks) != len(retrieved):
        raise ValueError(f"block sizes sum to {sum(s for _, s in blocks)}, but there are {len(retrieved)} queries")
    maps, start = {}, 0
    for name, size in blocks:
        maps[name] = copy_detection_map(retrieved[start:start + size], positives_per_query[start:start + size], top_k)
        start += size
    return maps


# -------------------------------------------------------------------- DAVIS

def region_similarity(gt_mask: np.ndarray, pred_mask: np.ndarray) -> float:
    """J = |gt & pred| / |gt | pred| of two boolean (H, W) masks; 1 when both are empty."""
    union = np.count_nonzero(gt_mask | pred_mask)
    return 1.0 if union == 0 else np.count_nonzero(gt_mask & pred_mask) / union


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """1-px boundary (H, W) bool of a mask: pixels differing from their east, south or south-east neighbour.

    Neighbours outside the image count as background, except that the last row
    is compared with its east neighbour only, the last column with its south
    neighbour only, and the bottom-right pixel is never a boundary (Martin's
    seg2bmap as used by the DAVIS scorer).
    """
    mask = mask.astype(bool)
    east, south, south_east = (np.zeros_like(mask) for _ in range(3))
    east[:, :-1] = mask[:, 1:]
    south[:-1, :] = mask[1:, :]
    south_east[:-1, :-1] = mask[1:, 1:]
    boundary = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    boundary[-1, :] = mask[-1, :] ^ east[-1, :]
    boundary[:, -1] = mask[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk(radius: int) -> np.ndarray:
    """Structuring element (2r+1, 2r+1) uint8: offsets (dy, dx) with dy^2 + dx^2 <= r^2."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2).astype(np.uint8)


def boundary_tolerance(shape, bound_th: float = 0.008) -> int:
    """Match radius in px: ceil(bound_th * image diagonal) (8 px at 854x480); bound_th >= 1 is taken as px."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(*shape[:2])))


def boundary_f_measure(gt_mask: np.ndarray, pred_mask: np.ndarray, bound_th: float = 0.008) -> float:
    """F = 2PR / (P + R) of the 1-px boundaries of two (H, W) masks.

    P = fraction of predicted boundary pixels within the tolerance disk of a GT
    boundary pixel (GT boundary dilated by the disk); R symmetric. Empty
    boundaries: both empty -> F = 1; only one empty -> F = 0.
    """
    radius = boundary_tolerance(gt_mask.shape, bound_th)
    pred_boundary, gt_boundary = mask_boundary(pred_mask), mask_boundary(gt_mask)
    n_pred, n_gt = np.count_nonzero(pred_boundary), np.count_nonzero(gt_boundary)
    if n_pred == 0 or n_gt == 0:
        return 1.0 if n_pred == n_gt else 0.0
    element = disk(radius)
    gt_near = cv2.dilate(gt_boundary.astype(np.uint8), element).astype(bool)
    pred_near = cv2.dilate(pred_boundary.astype(np.uint8), element).astype(bool)
    precision = np.count_nonzero(pred_boundary & gt_near) / n_pred
    recall = np.count_nonzero(gt_boundary & pred_near) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def recall_and_decay(per_frame: np.ndarray) -> tuple[float, float]:
    """DAVIS recall (fraction of frames > 0.5) and decay (mean of the first
    quarter of frames minus mean of the last; quarters split at
    round(linspace(1, n, 5)) - 1, each including its right edge)."""
    edges = (np.round(np.linspace(1, len(per_frame), 5) + 1e-10) - 1).astype(int)
    quarters = [per_frame[edges[i]:edges[i + 1] + 1] for i in range(4)]
    return float(np.mean(per_frame > 0.5)), float(np.mean(quarters[0]) - np.mean(quarters[3]))


def score_sequence(gt_maps: np.ndarray, pred_maps: np.ndarray, n_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame J and F, each (n_objects, T), of index maps (T, H, W); object o <-> label o + 1."""
    j_values, f_values = np.zeros((2, n_objects, len(gt_maps)))
    for t, (gt, pred) in enumerate(zip(gt_maps, pred_maps)):
        for obj in range(n_objects):
            gt_mask, pred_mask = gt == obj + 1, pred == obj + 1
            j_values[obj, t] = region_similarity(gt_mask, pred_mask)
            f_values[obj, t] = boundary_f_measure(gt_mask, pred_mask)
    return j_values, f_values


def read_sequence(davis_root: Path, pred_dir: Path, sequence: str):
    """(GT maps, prediction maps, n_objects, frame names) of the frames scored: all but the first and last."""
    gt_dir = davis_root / "Annotations" / "480p" / sequence
    frames = sorted(p.stem for p in gt_dir.glob("*.png"))
    if len(frames) < 3:
        raise UserError(f"'{gt_dir}' has {len(frames)} annotation PNGs: a sequence needs at least 3 frames")
    first = read_index_mask(gt_dir / f"{frames[0]}.png")
    n_objects = int(np.where(first == VOID_LABEL, 0, first).max())
    scored = frames[1:-1]
    # void (255) never equals an object id, so it counts as background (semi-supervised task)
    gt_maps = np.stack([read_index_mask(gt_dir / f"{name}.png") for name in scored])
    pred_maps = []
    for name in scored:
        path = pred_dir / sequence / f"{name}.png"
        if not path.is_file():
            raise UserError(f"missing prediction '{path}': write one indexed PNG per frame of '{sequence}'")
        pred = read_index_mask(path)
        if pred.shape != gt_maps.shape[1:]:
            raise UserError(f"prediction '{path}' is {pred.shape[1]}x{pred.shape[0]} but the annotation is "
                            f"{gt_maps.shape[2]}x{gt_maps.shape[1]}: save predictions at the annotation's size")
        if pred.max() > n_objects:
            raise UserError(f"prediction '{path}' has object id {pred.max()} but '{sequence}' has {n_objects} "
                            f"object(s): use ids 0..{n_objects}")
        pred_maps.append(pred)
    return gt_maps, np.stack(pred_maps), n_objects, scored


def davis_j_and_f(davis_root, pred_dir, split: str = "val", sequences=None) -> dict:
    """DAVIS-2017 semi-supervised scores (percent) of ``pred_dir/<seq>/<frame>.png``.

    Sequences: lines of ``davis_root/ImageSets/2017/<split>.txt`` (only those in
    ``sequences`` when given, in the split's order); frames: the
    sorted ``Annotations/480p/<seq>/*.png`` without the first and the last.
    n_objects = max label of the first annotation; GT void (255) is background.
    Per object: J-Mean / F-Mean = mean over frames; global J / F = mean over all
    objects of all sequences; J&F = (J + F) / 2. Unlike the official tool, a
    prediction that never uses some object id is scored (empty masks), not rejected.

    Returns {'J', 'F', 'J&F', 'J-Recall', 'J-Decay', 'F-Recall', 'F-Decay',
    'per_object': {'<seq>_<id>': {'J', 'F'}}}.
    """
    davis_root, pred_dir = Path(davis_root), Path(pred_dir)
    split_file = davis_root / "ImageSets" / "2017" / f"{split}.txt"
    listed = read_split_file(split_file, "DAVIS", "pass --davis-root <folder with ImageSets/2017 and Annotations/480p>")
    unknown = sorted(set(sequences or ()) - set(listed))
    if unknown:
        raise UserError(f"sequence(s) {', '.join(unknown)} not in '{split_file}': choose among {', '.join(listed)}")
    sequences = [name for name in listed if sequences is None or name in sequences]
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder '{pred_dir}' does not exist: "
                        "pass --pred <folder with one sub-folder per sequence>")
    per_object, statistics = {}, {"J": [], "F": []}
    for sequence in sequences:
        gt_maps, pred_maps, n_objects, _ = read_sequence(davis_root, pred_dir, sequence)
        j_values, f_values = score_sequence(gt_maps, pred_maps, n_objects)
        for obj in range(n_objects):
            per_object[f"{sequence}_{obj + 1}"] = {"J": 100 * float(j_values[obj].mean()),
                                                   "F": 100 * float(f_values[obj].mean())}
            statistics["J"].append((j_values[obj].mean(), *recall_and_decay(j_values[obj])))
            statistics["F"].append((f_values[obj].mean(), *recall_and_decay(f_values[obj])))
    if not per_object:
        raise UserError(f"'{split_file}' lists no sequence with an object to score")
    scores = {}
    for metric, rows in statistics.items():
        mean, recall, decay = 100 * np.mean(rows, axis=0)
        scores.update({metric: float(mean), f"{metric}-Recall": float(recall), f"{metric}-Decay": float(decay)})
    scores["J&F"] = (scores["J"] + scores["F"]) / 2
    scores["per_object"] = per_object
    return scores


# --------------------------------------------------------- attention masks

def attention_mass_masks(attentions, mass: float = 0.6) -> np.ndarray:
    """Boolean (heads, N): per head, the patches that together carry ``mass`` of its attention.

    attentions: (heads, N) [CLS]-to-patch weights (softmax rows without the
    CLS column). Per head: sort ascending (stable), renormalise to sum 1, take
    the cumulative sum c, keep the sorted positions with c > 1 - mass, scatter
    the decisions back to the original patch order.
    """
    attentions = np.asarray(attentions, dtype=np.float64)
    order = np.argsort(attentions, axis=1, kind="stable")
    ascending = np.take_along_axis(attentions, order, axis=1)
    cumulative = np.cumsum(ascending / ascending.sum(axis=1, keepdims=True), axis=1)
    masks = np.zeros(attentions.shape, dtype=bool)
    np.put_along_axis(masks, order, cumulative > 1.0 - mass, axis=1)
    return masks


def patch_masks_to_pixels(masks: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(heads, N) patch masks -> (heads, h * p, w * p) pixel masks (nearest upsampling of the (h, w) grid)."""
    height, width = grid
    masks = np.asarray(masks).reshape(len(masks), height, width)
    return masks.repeat(patch_size, axis=1).repeat(patch_size, axis=2)


def best_head_jaccard(head_masks: np.ndarray, label_map: np.ndarray) -> float | None:
    """Mean over the image's objects of the best head's IoU (fraction); None without objects.

    head_masks: (heads, H, W) bool; label_map: (H, W) ints. Objects: labels
    other than 0 and 255; IoU computed over non-void pixels (label != 255).
    """
    head_masks = np.asarray(head_masks, dtype=bool)
    if head_masks.shape[1:] != label_map.shape:
        raise ValueError(f"head masks {head_masks.shape[1:]} and labels {label_map.shape} differ in size")
    valid = label_map != VOID_LABEL
    objects = object_labels(label_map)
    if not objects:
        return None
    heads = head_masks & valid
    best = []
    for label in objects:
        gt = label_map == label
        intersections = np.count_nonzero(heads & gt, axis=(1, 2))
        unions = np.count_nonzero(heads | gt, axis=(1, 2))
        best.append(float(np.max(intersections / unions)))
    return float(np.mean(best))


def mean_jaccard(per_image) -> float:
    """Dataset Jaccard in percent: mean of `best_head_jaccard` over images that have objects (None skipped)."""
    scored = [value for value in per_image if value is not None]
    if not scored:
        raise ValueError("no image with an object to score")
    return 100.0 * float(np.mean(scored))


# ---------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluate.metrics", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    davis = commands.add_parser("davis", help="DAVIS-2017 semi-supervised J and F of a prediction folder")
    davis.add_argument("--davis-root", required=True, help="folder with ImageSets/2017 and Annotations/480p")
    davis.add_argument("--pred", required=True, help="folder with <sequence>/<frame>.png indexed PNGs")
    davis.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default: val)")
    davis.add_argument("--per-object", action="store_true", help="also print each object's J and F")
    args = parser.parse_args(argv)
    scores = davis_j_and_f(args.davis_root, args.pred, args.split)
    if args.per_object:
        for name, values in scores["per_object"].items():
            print(f"{name:30s} J {values['J']:6.2f}  F {values['F']:6.2f}")
    print(f"J {scores['J']:.2f}  F {scores['F']:.2f}  J&F {scores['J&F']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
