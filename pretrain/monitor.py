"""The training loop's k-NN monitor (docs/protocols.md, "k-NN"): features of the train and val images
from the current teacher (or student), scored by `common.knn` (exact neighbours, the weighted vote
sum_j exp(s_j / T) per class, T = 0.07), which the evaluator ``evaluate.knn`` uses too, so both score
neighbours identically."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from common.knn import knn_scores
from common.progress import progress_bar


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
    for images, targets in progress_bar(loader, desc=progress, disable=progress is None, leave=False):
        features.append(compute_features(model, images, device, feature_fn, autocast_dtype).cpu())
        labels.append(torch.as_tensor(targets))
    model.train(was_training)
    return torch.cat(features), torch.cat(labels).long()


def make_knn_monitor(train_dataset, val_dataset, device, k: int = 20,
                     batch_size: int = 128) -> Callable[[nn.Module], dict]:
    """A callable scoring a backbone's weighted 20-NN top-1 on (train, val)."""
    def monitor(backbone: nn.Module) -> dict:
        train_f, train_y = extract_features(backbone, train_dataset, batch_size, device)
        val_f, val_y = extract_features(backbone, val_dataset, batch_size, device)
        top1, top5 = knn_scores(train_f, train_y, val_f, val_y, ks=(k,))[k]
        return {f"knn_top1_k{k}": top1, f"knn_top5_k{k}": top5}
    return monitor
