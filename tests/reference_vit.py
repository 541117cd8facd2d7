"""An independent ViT forward written from the official DINO description.

Plain tensor operations on a state dict in the official naming; shares no
code with ``pretrain``. Used to check that our backbone (timm-based) gives
the official features at every input size.
"""
import math

import torch
import torch.nn.functional as F


def official_pos_embed(pos_embed, rows, cols):
    """The official interpolation: bicubic with scale factor (n + 0.1) / g."""
    n = pos_embed.shape[1] - 1
    if n == rows * cols and rows == cols:
        return pos_embed
    g = int(math.sqrt(n))
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / g, (cols + 0.1) / g), mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)


def attention(x, sd, prefix, heads):
    b, n, d = x.shape
    qkv = x @ sd[prefix + ".qkv.weight"].T + sd[prefix + ".qkv.bias"]
    qkv = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return out @ sd[prefix + ".proj.weight"].T + sd[prefix + ".proj.bias"], attn


def tokens(sd, images, patch):
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    rows, cols = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    return x + official_pos_embed(sd["pos_embed"], rows, cols)


def block(x, sd, i, heads):
    p = f"blocks.{i}"
    out, attn = attention(layer_norm(x, sd, p + ".norm1"), sd, p + ".attn", heads)
    x = x + out
    h = layer_norm(x, sd, p + ".norm2") @ sd[p + ".mlp.fc1.weight"].T + sd[p + ".mlp.fc1.bias"]
    h = F.gelu(h) @ sd[p + ".mlp.fc2.weight"].T + sd[p + ".mlp.fc2.bias"]
    return x + h, attn


def depth_of(sd):
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


def forward_all(sd, images, patch, heads):
    """(list of every block's output (B, 1+N, D), last block's attention)."""
    x = tokens(sd, images, patch)
    outs, attn = [], None
    for i in range(depth_of(sd)):
        x, attn = block(x, sd, i, heads)
        outs.append(x)
    return outs, attn


def cls_feature(sd, images, patch, heads):
    outs, _ = forward_all(sd, images, patch, heads)
    return layer_norm(outs[-1], sd, "norm")[:, 0]
