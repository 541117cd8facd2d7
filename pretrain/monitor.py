"""Weighted k-NN classification on frozen features (PROTOCOLS B1).

Shared by the training monitor (exact search with a matrix product, here)
and the evaluator ``evaluate.knn`` (FAISS search), which reuses
``weighted_vote`` and ``accuracies`` so both score neighbours identically.

For a query with L2-normalised feature f and its k nearest training
features x_j (cosine similarity s_j, label y_j):

    score(c) = sum_j [y_j = c] * exp(s_j / T),     T = 0.07

and classes are ranked by score (top-1, top-5 with min(5, k)).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


def compute_features(model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu",
                     feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``feature_fn(model, images)`` (default ``model(images)``) on ``device``, no grad, as float32.

    Under ``torch.autocast(dtype=autocast_dtype)`` when a dtype is given (bf16
    on CUDA), in the model's own precision otherwise. Returns (B, D) on ``device``.
    """
    device = torch.device(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        images = images.to(device, non_blocking=True)
        return (model(images) if feature_fn is None else feature_fn(model, images)).float()


def extract_features(model: nn.Module, dataset, batch_size: int = 128, device: str | torch.device = "cpu",
                     num_workers: int = 0, progress: str | None = None,
                     feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                     autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (eval mode) over ``dataset`` of (image, label), batch by batch (`compute_features`).

    Returns (features (N, D) float32 on CPU, labels (N,) int64), in dataset order.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
    was_training = model.training
    model.eval()
    features, labels = [], []
    for images, targets in tqdm(loader, desc=progress, disable=progress is None, leave=False):
        features.append(compute_features(model, images, device, feature_fn, autocast_dtype).cpu())
        labels.append(torch.as_tensor(targets))
    model.train(was_training)
    return torch.cat(features), torch.cat(labels).long()


def exact_neighbours(train_features: torch.Tensor, query_features: torch.Tensor, k: int,
                     chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours by brute force: (similarities (Q, k), indices (Q, k)).

    Features must already be L2-normalised.
    """
    sims, idx = [], []
    for start in range(0, len(query_features), chunk):
        block = query_features[start:start + chunk] @ train_features.T
        top = block.topk(min(k, train_features.shape[0]), dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def weighted_vote(similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
                  temperature: float = 0.07) -> torch.Tensor:
    """(Q, k) similarities and labels -> (Q, C) class scores sum_j exp(s_j / T)."""
    weights = (similarities.double() / temperature).exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=torch.float64, device=similarities.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def accuracies(scores: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, float]:
    """Top-1 and top-min(5, k) accuracy in percent."""
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    hits = ranked[:, :min(5, k, scores.shape[1])] == labels[:, None]
    return 100.0 * hits[:, 0].float().mean().item(), 100.0 * hits.any(dim=1).float().mean().item()


def knn_scores(train_features, train_labels, test_features, test_labels, ks=(10, 20, 100, 200),
               temperature: float = 0.07, search=exact_neighbours) -> dict[int, tuple[float, float]]:
    """{k: (top1, top5)} for every k; ``search`` returns (similarities, indices)."""
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(ks), len(train_features))
    similarities, indices = search(train_features, test_features, k_max)
    results = {}
    for k in ks:
        k_eff = min(k, k_max)
        scores = weighted_vote(similarities[:, :k_eff], train_labels[indices[:, :k_eff]], num_classes, temperature)
        results[k] = accuracies(scores, test_labels, k_eff)
    return results


def make_knn_monitor(train_dataset, val_dataset, device, k: int = 20, batch_size: int = 128) -> Callable[[nn.Module], dict]:
    """A callable scoring a backbone's weighted 20-NN top-1 on (train, val)."""
    def monitor(backbone: nn.Module) -> dict:
        train_f, train_y = extract_features(backbone, train_dataset, batch_size, device)
        val_f, val_y = extract_features(backbone, val_dataset, batch_size, device)
        top1, top5 = knn_scores(train_f, train_y, val_f, val_y, ks=(k,))[k]
        return {f"knn_top1_k{k}": top1, f"knn_top5_k{k}": top5}
    return monitor
