"""DINO head: shapes, normalisation, the frozen weight-norm gain, crop order."""
import torch

from pretrain import DINOHead, MultiCropWrapper, build_backbone


def test_head_shapes_and_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [64, 64, 16]
    assert head.last_layer.weight_v.shape == (100, 16) and head.last_layer.weight_g.shape == (100, 1)
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer: gain frozen at 1
    assert torch.all(head.last_layer.weight_g == 1)
    x = torch.randn(5, 32)
    logits = head(x)
    assert logits.shape == (5, 100)
    assert logits.abs().max() <= 1 + 1e-5  # cosines between unit bottleneck and unit prototypes
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(logits, z @ w.T, atol=1e-6)


def test_trainable_gain_and_state_dict_names():
    head = DINOHead(8, out_dim=10, hidden_dim=12, bottleneck_dim=4, norm_last_layer=False)
    assert head.last_layer.weight_g.requires_grad
    assert set(head.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                      "mlp.4.weight", "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"}
    with torch.no_grad():
        head.last_layer.weight_g.fill_(3.0)
    logits = head(torch.randn(2, 8))
    assert logits.abs().max() <= 3 + 1e-5 and logits.abs().max() > 1


def test_multicrop_wrapper_is_crop_major_and_matches_per_crop_forward():
    torch.manual_seed(0)
    backbone = build_backbone("vit", 4, embed_dim=16, depth=1, num_heads=2, img_size=16).eval()
    wrapper = MultiCropWrapper(backbone, DINOHead(16, out_dim=8, hidden_dim=8, bottleneck_dim=4)).eval()
    crops = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    with torch.no_grad():
        out = wrapper(crops)
        separate = torch.cat([wrapper.head(backbone(c)) for c in crops])
    assert out.shape == (9, 8)
    assert torch.allclose(out, separate, atol=1e-5)
