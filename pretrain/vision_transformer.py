"""DINO's Vision Transformer, built on timm's ``VisionTransformer``.

The parameter names are timm's, which are also the official DINO names
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
``norm``...), so an official backbone state dict loads without renaming.

What DINO changes relative to timm's defaults:

* Position embeddings are interpolated for any input whose sides are
  multiples of the patch size, exactly as the official code does it
  (docs/protocols.md, "Position-embedding interpolation"): the (g, g) grid of patch embeddings is resized with
  bicubic interpolation driven by ``scale_factor = ((h0 + 0.1) / g,
  (w0 + 0.1) / g)``, ``h0 = H // p`` rows and ``w0 = W // p`` columns. With a
  scale factor PyTorch maps output pixel ``i`` to source ``(i + .5) / s - .5``,
  which differs slightly from asking for an output ``size``.
* Initialisation: trunc-normal(0.02) for ``cls_token`` too (timm uses 1e-6).
* Extra entry points for the evaluators: ``get_intermediate_layers`` (last n
  block outputs, each through the final LayerNorm) and
  ``get_last_selfattention`` (softmaxed attention of the last block).

``forward(x)`` with ``x`` of shape (B, 3, H, W) returns the normed [CLS]
token, shape (B, D). The normal forward uses timm's fused attention (SDPA);
the attention matrix is only materialised by ``get_last_selfattention``.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer


def interpolate_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Resize a (1, 1 + g*g, D) position table to a (rows, cols) token grid.

    Returns (1, 1 + rows*cols, D). The [CLS] entry is kept as is. Follows the
    official DINO arithmetic (bicubic, scale factor with the +0.1 offset that
    guards against floor errors) so features match the official backbones at
    every input size.
    """
    num_patches = pos_embed.shape[1] - 1
    grid = int(math.sqrt(num_patches))
    if grid * grid != num_patches:
        raise ValueError(f"position table has {num_patches} patch entries, not a square grid")
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos.float(),
        scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid),
        mode="bicubic",
        align_corners=False,
    ).to(pos_embed.dtype)
    if patch_pos.shape[-2:] != (rows, cols):  # the +0.1 makes this unreachable for sane sizes
        raise RuntimeError(f"interpolated grid {tuple(patch_pos.shape[-2:])} != {(rows, cols)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((cls_pos, patch_pos), dim=1)


class DinoVisionTransformer(VisionTransformer):
    """timm ViT with DINO's position-embedding interpolation and evaluator hooks."""

    def __init__(self, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 img_size: int = 224):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,  # patch_embed returns (B, h, w, D) for any size
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
        )
        trunc_normal_(self.cls_token, std=0.02)
        self.patch_size = patch_size

    # timm calls this between patch embedding and the blocks.
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, rows, cols, dim = x.shape
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), x.reshape(batch, rows * cols, dim)), dim=1)
        return tokens + self.position_embedding(rows, cols)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """(1, 1 + rows*cols, D) table for a rows x cols patch grid.

        Same rule as the official code: the stored table is used as is when the
        token count matches and the input is square, otherwise interpolated.
        """
        if rows * cols == self.pos_embed.shape[1] - 1 and rows == cols:
            return self.pos_embed
        return interpolate_pos_embed(self.pos_embed, rows, cols)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, 1 + N, D) tokens with position embeddings.

        Trailing rows/columns beyond a multiple of the patch size are dropped,
        as the official strided convolution does.
        """
        height, width = x.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            x = x[..., : height - height % p, : width - width % p]
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        return self.norm_pre(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D): the final-normed [CLS] token."""
        return self.norm(self.blocks(self.prepare_tokens(x)))[:, 0]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Outputs of the last ``n`` blocks, each through the final LayerNorm.

        Returns a list (oldest first) of n tensors of shape (B, 1 + N, D).
        """
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be in [1, {len(self.blocks)}], got {n}")
        x = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmaxed attention of the last block: (B, heads, 1 + N, 1 + N).

        Runs blocks 0..L-2, then the last block's attention up to the softmax
        (its output is not computed), with scale head_dim^-0.5.
        """
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        attn = last.attn
        batch, tokens, _ = x.shape
        qkv = attn.qkv(last.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
