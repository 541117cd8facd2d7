"""DINO projection head and the multi-crop wrapper (PROTOCOLS A2).

Head: x (B, D) -> MLP D->h->h->b (GELU between, none after the last) ->
z = x / max(||x||_2, 1e-12) (b-dim bottleneck on the unit sphere) ->
weight-normalised, bias-free Linear(b, K):  logits_k = g_k <v_k, z> / ||v_k||.
With ``norm_last_layer`` the gains g_k are frozen at 1, so every prototype
has unit norm and the logits are cosines in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation per output unit.

    weight = weight_g * weight_v / ||weight_v||_row; ``weight_g`` (K, 1),
    ``weight_v`` (K, b). The parameter names are those of the classic
    ``torch.nn.utils.weight_norm`` so official checkpoints load as they are.
    ``weight_v`` keeps PyTorch's default Linear init; ``weight_g`` starts at 1.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """3-layer MLP + L2-normalised bottleneck + weight-normed prototypes."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, use_bn: bool = False,
                 norm_last_layer: bool = True):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            widths = [in_dim] + [hidden_dim] * (nlayers - 1)
            for width_in, width_out in zip(widths[:-1], widths[1:]):
                layers.append(nn.Linear(width_in, width_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(width_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_linear)
        # Created after the init pass: the prototypes keep PyTorch's default init.
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim) logits."""
        bottleneck = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)
        return self.last_layer(bottleneck)


class MultiCropWrapper(nn.Module):
    """Run the backbone once per crop resolution and the head once on all.

    ``forward(crops)`` takes a list of (B, 3, H_i, W_i) tensors (consecutive
    crops of equal size are concatenated along the batch) and returns the
    head's logits (len(crops) * B, K) in crop-major order: all images' crop 0,
    then all images' crop 1, and so on.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))
