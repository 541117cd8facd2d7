"""A small registry of named backbones: DINO's ViTs and ResNet-50.

``build_backbone(arch, patch)`` returns a module whose ``forward`` maps
(B, 3, H, W) images to (B, D) embeddings: the normed [CLS] token for ViTs,
the globally average-pooled 2048-d feature for ResNet-50 (``fc`` removed).

ResNet-50 is torchvision's ``resnet50``, as the official code trains it:
its initialisation (Kaiming-normal convolutions, every BatchNorm weight 1)
differs from timm's, which zeroes the last BatchNorm of each block, and its
parameter names are those of the released DINO ResNet-50 checkpoints.
``embed_dim`` is set on every backbone so heads can be sized from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torchvision

from common.errors import UserError

from .vision_transformer import DinoVisionTransformer


@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    depth: int
    num_heads: int


# DINO's ViT sizes (docs/protocols.md, "ViT backbones"): every head is 64 wide.
VIT_SPECS = {
    "vit_tiny": ViTSpec(192, 12, 3),
    "vit_small": ViTSpec(384, 12, 6),
    "vit_base": ViTSpec(768, 12, 12),
}
VIT_PATCHES = (16, 8)
CONVNETS = ("resnet50",)
CUSTOM_VIT = "vit"  # any size: embed_dim, depth and num_heads given explicitly
ARCHS = tuple(VIT_SPECS) + CONVNETS


def build_backbone(arch: str, patch: int | None = 16, *, drop_path_rate: float = 0.0,
                   img_size: int = 224, embed_dim: int | None = None, depth: int | None = None,
                   num_heads: int | None = None) -> nn.Module:
    """Build a randomly initialised backbone.

    ``arch`` is one of ``ARCHS`` (named DINO models, patch 16 or 8) or
    ``"vit"`` with ``embed_dim``, ``depth`` and ``num_heads`` given (small CPU
    presets; any patch size). ``img_size`` is the side the position
    table is defined for (224 for every DINO model).
    """
    if arch in CONVNETS:  # no drop-path in torchvision's ResNet (nor in the official code's): the rate is unused
        model = torchvision.models.resnet50(weights=None)
        model.embed_dim = model.fc.in_features
        model.fc = nn.Identity()
        return model
    if arch == CUSTOM_VIT:
        if None in (embed_dim, depth, num_heads) or not patch or patch <= 0:
            raise UserError("arch 'vit' needs embed_dim, depth, num_heads and a positive patch")
        spec = ViTSpec(embed_dim, depth, num_heads)
    elif arch in VIT_SPECS:
        if patch not in VIT_PATCHES:
            raise UserError(f"arch '{arch}' does not support patch {patch}: use PATCH=16 or PATCH=8")
        spec = VIT_SPECS[arch]
    else:
        raise UserError(f"unknown arch '{arch}': choose one of {', '.join(ARCHS)}")
    if img_size % patch:
        raise UserError(f"image size {img_size} is not a multiple of patch {patch}")
    return DinoVisionTransformer(patch_size=patch, embed_dim=spec.embed_dim, depth=spec.depth,
                                 num_heads=spec.num_heads, drop_path_rate=drop_path_rate,
                                 img_size=img_size)


def is_vit(model: nn.Module) -> bool:
    return isinstance(model, DinoVisionTransformer)


def describe(model: nn.Module) -> dict:
    """The arguments that rebuild ``model``'s architecture with ``build_backbone``."""
    if not is_vit(model):
        return {"arch": "resnet50", "patch": None}
    spec = ViTSpec(model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads)
    img_size = model.patch_embed.grid_size[0] * model.patch_size
    named = [name for name, known in VIT_SPECS.items() if known == spec]
    if named and model.patch_size in VIT_PATCHES and img_size == 224:
        return {"arch": named[0], "patch": model.patch_size}
    return {"arch": CUSTOM_VIT, "patch": model.patch_size, "embed_dim": spec.embed_dim,
            "depth": spec.depth, "num_heads": spec.num_heads, "img_size": img_size}
