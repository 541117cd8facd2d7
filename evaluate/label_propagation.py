"""Label propagation with frozen patch features: the math of the DAVIS protocol
(docs/protocols.md, "DAVIS video segmentation").

For a target frame with patch features f_t (N, D) and K context frames with
features f_c (K, N, D) and label vectors y_c (K, N, C), on an h x w patch grid
(N = h * w):

    A[i, (c, j)] = exp(<f_t(i), f_c(j)> / T) * M[i, j]     features L2-normalised, T = 0.1
    M[i, j]      = 1 if |row_i - row_j| <= r and |col_i - col_j| <= r, else 0   (r = 12)
    keep         = A[i, (c, j)] >= the k-th largest of row i over all (c, j)   (k = 5, ties kept)
    W[i, (c, j)] = keep * A / sum_(c', j') keep * A
    y_t(i)       = sum_(c, j) W[i, (c, j)] y_c(j)                               (N, C) soft labels

The top-k is joint over all context frames. The batched form computes the
(N, K*N) cosine similarities with one matmul of the target against every
context feature, sets the pairs outside the neighbourhood to -inf (the mask
is built once per (h, w, r, device)), and takes the k + 1 largest per row.
exp(s / T) is increasing, so these are the k + 1 largest affinities: the
weights need exp of those k only, and the labels a gather of k rows, instead
of dense (N, K*N) passes. A row whose (k+1)-th value ties its k-th keeps
every tied pair: such rows are redone densely with the threshold rule (ties
are judged on the fp32 similarities; the official code judges them after
exp, where two similarities one ulp apart may round to one affinity).
Target rows are cut into chunks only when the matrix would exceed
``max_affinity_elements`` (each row is independent, so chunking is exact).

The context (`ContextQueue`): the first frame (features + hard one-hot labels)
plus the last ``n_last_frames`` propagated frames (features + soft labels at
feature resolution), oldest dropped first.

Output (`soft_labels_to_index_map`): bilinear upsampling by the patch size
(align_corners False), per-channel min-max normalisation of channels whose
max is > 0, argmax over channels, PIL nearest resize to the original frame.
"""
from __future__ import annotations

import contextlib
from collections import deque
from functools import lru_cache

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

DEFAULT_MAX_AFFINITY_ELEMENTS = 2 ** 26  # 256 MiB of fp32 per affinity chunk


@lru_cache(maxsize=8)
def neighbourhood_mask(rows: int, cols: int, radius: int, device: str = "cpu") -> torch.Tensor:
    """(N, N) bool, N = rows * cols: M[i, j] is True when patches i and j are at most ``radius``
    rows and ``radius`` columns apart (a (2r+1) x (2r+1) window). Cached per resolution."""
    row = torch.arange(rows, device=device).repeat_interleave(cols)
    col = torch.arange(cols, device=device).repeat(rows)
    near_rows = (row[:, None] - row[None, :]).abs() <= radius
    near_cols = (col[:, None] - col[None, :]).abs() <= radius
    return near_rows & near_cols


def threshold_vote(similarities: torch.Tensor, kth_largest: torch.Tensor, labels: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """Dense rule: weights exp(s / T) of the pairs with s >= the row's k-th largest, normalised; (n, C) votes.

    similarities: (n, M) with -inf where not allowed; kth_largest: (n, 1); labels: (M, C).
    """
    weights = torch.exp(similarities / temperature) * (similarities >= kth_largest)
    return (weights / weights.sum(dim=1, keepdim=True)) @ labels


def propagate_labels(target_features: torch.Tensor, context_features: torch.Tensor,
                     context_labels: torch.Tensor, grid: tuple[int, int], radius: int | None = 12,
                     topk: int = 5, temperature: float = 0.1,
                     max_affinity_elements: int = DEFAULT_MAX_AFFINITY_ELEMENTS) -> torch.Tensor:
    """Soft labels (N, C) of the target frame (see the module docstring for the math).

    target_features: (N, D); context_features: (K, N, D), not necessarily
    normalised; context_labels: (K, N, C); grid: (h, w) with h * w = N;
    radius: the neighbourhood half-width in patches, None or < 0 for none.
    """
    contexts, n_patches, dim = context_features.shape
    if grid[0] * grid[1] != n_patches or target_features.shape != (n_patches, dim):
        raise ValueError(f"features {tuple(target_features.shape)} / {tuple(context_features.shape)} "
                         f"do not fit a {grid[0]}x{grid[1]} grid")
    sources = F.normalize(context_features, dim=-1).reshape(contexts * n_patches, dim)
    targets = F.normalize(target_features, dim=-1)
    labels = context_labels.reshape(contexts * n_patches, -1)
    outside = None
    if radius is not None and radius >= 0:
        outside = ~neighbourhood_mask(grid[0], grid[1], radius, str(target_features.device))
    k = min(topk, contexts * n_patches)
    rows_per_chunk = max(1, max_affinity_elements // (contexts * n_patches))
    soft_labels = []
    for start in range(0, n_patches, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_patches)
        similarities = targets[start:stop] @ sources.T  # (n, K*N)
        if outside is not None:
            similarities.view(stop - start, contexts, n_patches).masked_fill_(outside[start:stop, None, :],
                                                                              float("-inf"))
        largest, where = similarities.topk(min(k + 1, contexts * n_patches), dim=1)  # descending
        weights = torch.exp(largest[:, :k] / temperature)
        votes = torch.einsum("nk,nkc->nc", weights / weights.sum(dim=1, keepdim=True), labels[where[:, :k]])
        if largest.shape[1] > k:
            tied = torch.nonzero((largest[:, k] == largest[:, k - 1]) & (largest[:, k] > float("-inf"))).flatten()
            if len(tied):
                votes[tied] = threshold_vote(similarities[tied], largest[tied, k - 1:k], labels, temperature)
        soft_labels.append(votes)
    return torch.cat(soft_labels)


class ContextQueue:
    """The frames a target is propagated from: the first frame, always, and the last ``n_last`` frames.

    ``features()`` -> (1 + n, N, D) and ``labels()`` -> (1 + n, N, C), first
    frame first, then oldest to newest; n = min(n_last, frames pushed).
    ``frame_ids()`` names them (the ids given to the constructor and `push`).
    """

    def __init__(self, first_features: torch.Tensor, first_labels: torch.Tensor, n_last: int = 7,
                 first_id=0):
        self.first = (first_id, first_features, first_labels)
        self.recent = deque(maxlen=n_last)

    def push(self, frame_id, features: torch.Tensor, soft_labels: torch.Tensor) -> None:
        """Add a propagated frame; the oldest recent frame leaves when n_last are held (never the first)."""
        if self.recent.maxlen:
            self.recent.append((frame_id, features, soft_labels))

    def _entries(self):
        return [self.first, *self.recent]

    def frame_ids(self) -> list:
        return [entry[0] for entry in self._entries()]

    def features(self) -> torch.Tensor:
        return torch.stack([entry[1] for entry in self._entries()])

    def labels(self) -> torch.Tensor:
        return torch.stack([entry[2] for entry in self._entries()])


def one_hot_patch_labels(label_map: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(N, C) one-hot labels of a (H, W) index map at the (h, w) patch grid.

    PIL nearest resize to (w, h), C = max label + 1 (background 0 included);
    void (255) counts as background, as the DAVIS scorer treats it.
    """
    labels = np.where(label_map == 255, 0, label_map).astype(np.uint8)
    small = np.array(PIL.Image.fromarray(labels).resize((grid[1], grid[0]), PIL.Image.NEAREST))
    small = torch.from_numpy(small.astype(np.int64)).flatten()
    return F.one_hot(small, num_classes=int(labels.max()) + 1).float()


def min_max_normalise_channels(maps: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (C, H, W): each channel whose max is > 0 mapped to [0, 1] by (x - min) / (max - min).

    A constant positive channel (max = min) becomes all ones (it is its own
    maximum everywhere; the official code would divide 0 by 0 there).
    """
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    spread = high - low
    scaled = torch.where(spread > 0, (maps - low) / spread.clamp_min(torch.finfo(maps.dtype).tiny),
                         torch.ones_like(maps))
    return torch.where(high > 0, scaled, maps)


def soft_labels_to_index_map(soft_labels: torch.Tensor, grid: tuple[int, int], patch_size: int,
                             original_size: tuple[int, int]) -> np.ndarray:
    """(N, C) soft labels -> (H, W) uint8 label indices at the original frame size (width, height)."""
    rows, cols = grid
    maps = soft_labels.T.reshape(1, -1, rows, cols)
    upsampled = F.interpolate(maps, scale_factor=patch_size, mode="bilinear", align_corners=False,
                              recompute_scale_factor=False)[0]
    indices = min_max_normalise_channels(upsampled).argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.array(PIL.Image.fromarray(indices).resize(tuple(original_size), PIL.Image.NEAREST))


@contextlib.contextmanager
def full_fp32_matmuls():
    """Disable TF32 for CUDA matmuls and convolutions inside the block, restoring the previous setting.

    exp(x / 0.1) turns TF32's 1e-3 relative error in <f_t, f_c> into visible
    changes of the top-k (docs/protocols.md, "DAVIS video segmentation"). Uses the ``fp32_precision`` API
    where this PyTorch has it (mixing it with ``allow_tf32`` is an error there).
    """
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv"):
        settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
        attribute, exact = "fp32_precision", "ieee"
    else:
        settings = (torch.backends.cuda.matmul, torch.backends.cudnn)
        attribute, exact = "allow_tf32", False
    previous = [getattr(setting, attribute) for setting in settings]
    try:
        for setting in settings:
            setattr(setting, attribute, exact)
        yield
    finally:
        for setting, value in zip(settings, previous):
            setattr(setting, attribute, value)
