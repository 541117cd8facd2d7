"""Backbones against an independent forward in the official naming."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from reference_vit import cls_feature, forward_all, layer_norm

from common.errors import UserError
from pretrain import build_backbone
from pretrain.backbones import describe
from pretrain.vision_transformer import interpolate_pos_embed


def small_vit(patch=16, seed=0):
    torch.manual_seed(seed)
    model = build_backbone("vit", patch, embed_dim=64, depth=3, num_heads=2, img_size=224).eval()
    with torch.no_grad():  # non-trivial norms and biases so a mistake in any of them shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("size", [(224, 224), (96, 96), (160, 256), (64, 48)])
def test_forward_matches_official_computation(size):
    model = small_vit()
    images = torch.randn(2, 3, *size)
    expected = cls_feature(model.state_dict(), images, 16, heads=2)
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_non_square_with_pretrain_token_count_still_interpolates():
    # 112 x 448 has 7 x 28 = 196 patches, like 224 x 224, but another shape.
    model = small_vit()
    images = torch.randn(1, 3, 112, 448)
    with torch.no_grad():
        assert torch.allclose(model(images), cls_feature(model.state_dict(), images, 16, heads=2), atol=1e-5)


def test_trailing_pixels_are_dropped_like_a_strided_conv():
    model = small_vit()
    images = torch.randn(1, 3, 100, 70)
    with torch.no_grad():
        assert torch.allclose(model(images), model(images[:, :, :96, :64]), atol=1e-6)


def test_intermediate_layers_and_attention_match():
    model = small_vit(patch=8)
    images = torch.randn(2, 3, 64, 80)
    sd = model.state_dict()
    outs, attn = forward_all(sd, images, 8, heads=2)
    with torch.no_grad():
        got = model.get_intermediate_layers(images, n=2)
        assert len(got) == 2
        for mine, theirs in zip(got, outs[-2:]):
            assert torch.allclose(mine, layer_norm(theirs, sd, "norm"), atol=1e-5)
        last_attn = model.get_last_selfattention(images)
    assert last_attn.shape == (2, 2, 1 + 8 * 10, 1 + 8 * 10)
    assert torch.allclose(last_attn, attn, atol=1e-6)
    assert torch.allclose(last_attn.sum(-1), torch.ones(2, 2, 81), atol=1e-5)


def test_scale_factor_interpolation_differs_from_size_form():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 14 * 14, 8)
    ours = interpolate_pos_embed(table, 30, 52)
    grid = table[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(30, 52), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert ours.shape == (1, 1 + 30 * 52, 8)
    assert torch.equal(ours[:, :1], table[:, :1])
    assert not torch.allclose(ours[:, 1:], by_size, atol=1e-4)  # the form matters (docs/protocols.md,
                                                                # "Position-embedding interpolation")


@pytest.mark.parametrize("arch,dim,heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
def test_named_sizes(arch, dim, heads):
    model = build_backbone(arch, 16, drop_path_rate=0.1)
    assert model.embed_dim == dim and len(model.blocks) == 12
    assert model.blocks[0].attn.num_heads == heads
    # drop-path linearly spaced from 0 to the rate
    assert model.blocks[0].drop_path1.__class__.__name__ == "Identity"
    assert math.isclose(model.blocks[-1].drop_path1.drop_prob, 0.1, rel_tol=1e-6)
    assert model.pos_embed.shape == (1, 197, dim)
    assert describe(model) == {"arch": arch, "patch": 16}


def test_resnet50_gives_pooled_2048():
    model = build_backbone("resnet50").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_resnet50_is_initialised_as_torchvision_builds_it():
    """The official code trains torchvision's resnet50: the same draws from the same seed, every BatchNorm
    weight 1 (timm zeroes the last BatchNorm of each block), Kaiming-normal (fan out) convolutions."""
    torch.manual_seed(0)
    ours = build_backbone("resnet50")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None)
    theirs = reference.state_dict()
    assert set(ours.state_dict()) == {k for k in theirs if not k.startswith("fc.")}
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    assert torch.equal(ours.layer1[0].bn3.weight, torch.ones(256))
    conv = ours.layer3[2].conv2.weight  # 256 x 256 x 3 x 3: std sqrt(2 / fan_out) = sqrt(2 / (256 * 9))
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)
    assert ours.embed_dim == 2048 and isinstance(ours.fc, torch.nn.Identity)


def test_unknown_arch_and_patch_are_clear_errors():
    with pytest.raises(UserError, match="unknown arch 'vit_huge'"):
        build_backbone("vit_huge", 16)
    with pytest.raises(UserError, match="does not support patch 14"):
        build_backbone("vit_small", 14)
