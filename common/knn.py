"""Weighted k-NN classification on frozen features (the paper's protocol; docs/protocols.md, "k-NN"):
exact cosine neighbours, the vote sum_j exp(s_j / T) per class, top-1 / top-5 accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
