"""DINO projection head and the multi-crop wrapper (docs/protocols.md, "DINO head").

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


class _WeightNormLinearFunction(torch.autograd.Function):
    """logits = (x @ v^T) * (g / ||v||_row)^T, with a hand-written backward.

    The same function as ``F.linear(x, v * g / ||v||)``, computed with the
    scale on the (B, K) output instead of on the (K, b) weight: with K = 65536
    prototypes and a few dozen rows B, the weight is by far the largest tensor
    of the head (16.8 M values for b = 256), and the weight-side form makes
    about ten passes over it per step (the scaled copy, in student and
    teacher, and the autograd chain of the norm). Here the forward reads v
    twice (its norms, the matmul) and never writes a (K, b) tensor; the
    backward writes dv once:

        s = g / ||v||                  (K,)
        dx = (dy * s) @ v
        ds_k = sum_b dy[b, k] (x v^T)[b, k]
        dg = ds / ||v||
        dv = (dy * s)^T x - (ds g / ||v||^3) v      (one addmm)

    Rounding differs from the weight-side form by ~1e-7 relative. Under
    autocast the matmuls run in the autocast dtype as ``F.linear`` would; the
    norm, the scale and dv stay in v's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)  # (K, 1)
        scale = g / norm
        raw = F.linear(x, v)  # (B, K), in the autocast dtype when autocast is on
        ctx.save_for_backward(x, v, g, norm, raw)
        return raw * scale.t().to(raw.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, v, g, norm, raw = ctx.saved_tensors
        scale = g / norm
        grad_raw = grad * scale.t().to(grad.dtype)  # (B, K)
        grad_x = grad_raw @ v.to(grad_raw.dtype) if ctx.needs_input_grad[0] else None
        grad_scale = (grad.float() * raw.float()).sum(dim=0).unsqueeze(1).to(v.dtype)  # (K, 1)
        grad_g = grad_scale / norm if ctx.needs_input_grad[2] else None
        grad_v = None
        if ctx.needs_input_grad[1]:
            grad_v = torch.addmm(v * (grad_scale * g / norm.pow(3)).neg_(), grad_raw.t().to(v.dtype), x.to(v.dtype))
        return grad_x, grad_v, grad_g


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation per output unit.

    weight = weight_g * weight_v / ||weight_v||_row; ``weight_g`` (K, 1),
    ``weight_v`` (K, b). The parameter names are those of the classic
    ``torch.nn.utils.weight_norm`` so official checkpoints load as they are.
    ``weight_v`` keeps PyTorch's default Linear init; ``weight_g`` starts at 1.
    The forward never forms the normalised weight (`_WeightNormLinearFunction`);
    ``weight()`` gives it for inspection.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WeightNormLinearFunction.apply(x, self.weight_v, self.weight_g)


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
