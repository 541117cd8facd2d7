"""Loading every kind of checkpoint a user holds, exactly, and safely."""
import pickle

import pytest
import timm
import torch

from data.errors import UserError
from pretrain import build_backbone, load_backbone
from pretrain.checkpoint import atomic_save, safe_load

from reference_vit import cls_feature


def official_vit_state(patch=16, dim=64, depth=2, seed=0):
    """A random state dict in the official DINO ViT naming, built by hand (no model code)."""
    g = torch.Generator().manual_seed(seed)
    n = (224 // patch) ** 2
    sd = {"cls_token": torch.randn(1, 1, dim, generator=g) * 0.02,
          "pos_embed": torch.randn(1, 1 + n, dim, generator=g) * 0.02,
          "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch, generator=g) * 0.02,
          "patch_embed.proj.bias": torch.randn(dim, generator=g) * 0.02,
          "norm.weight": 1 + 0.1 * torch.randn(dim, generator=g), "norm.bias": 0.1 * torch.randn(dim, generator=g)}
    for i in range(depth):
        p = f"blocks.{i}."
        for name, shape in [("norm1.weight", (dim,)), ("norm1.bias", (dim,)), ("attn.qkv.weight", (3 * dim, dim)),
                            ("attn.qkv.bias", (3 * dim,)), ("attn.proj.weight", (dim, dim)), ("attn.proj.bias", (dim,)),
                            ("norm2.weight", (dim,)), ("norm2.bias", (dim,)), ("mlp.fc1.weight", (4 * dim, dim)),
                            ("mlp.fc1.bias", (4 * dim,)), ("mlp.fc2.weight", (dim, 4 * dim)), ("mlp.fc2.bias", (dim,))]:
            sd[p + name] = torch.randn(*shape, generator=g) * (0.1 if "weight" in name and "norm" not in name else 0.05)
            if "norm" in name and name.endswith("weight"):
                sd[p + name] += 1
    return sd


def head_state(prefix):
    return {prefix + "head.mlp.0.weight": torch.zeros(8, 8), prefix + "head.last_layer.weight_g": torch.ones(4, 1),
            prefix + "head.last_layer.weight_v": torch.zeros(4, 8)}


def test_official_training_checkpoint_loads_exactly(tmp_path):
    teacher = official_vit_state(seed=1)
    student = official_vit_state(seed=2)
    ckpt = {"teacher": {**{"backbone." + k: v for k, v in teacher.items()}, **head_state("")},
            "student": {**{"module.backbone." + k: v for k, v in student.items()}, **head_state("module.")},
            "epoch": 3, "dino_loss": {"center": torch.zeros(1, 4)}}
    import argparse
    import numpy as np
    ckpt["args"] = argparse.Namespace(arch="vit_small", lr=np.float64(5e-4))  # as the official code saves it
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    images = torch.randn(2, 3, 224, 224)
    for key, weights in (("teacher", teacher), ("student", student)):
        model = load_backbone(path, key=key)
        # dim 64 / depth 2 is no named arch: inferred as a custom ViT, heads = dim / 64
        with torch.no_grad():
            assert torch.allclose(model(images), cls_feature(weights, images, 16, heads=1), atol=1e-5)
        with torch.no_grad():
            other = torch.randn(1, 3, 96, 128)
            assert torch.allclose(model(other), cls_feature(weights, other, 16, heads=1), atol=1e-5)


def test_released_backbone_infers_named_arch_and_patch(tmp_path):
    model = build_backbone("vit_tiny", 8)
    path = tmp_path / "dino_deittiny8_pretrain.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone(path)
    assert loaded.patch_size == 8 and loaded.embed_dim == 192
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(UserError, match="holds vit_tiny/8 weights, not vit_small/8"):
        load_backbone(path, arch="vit_small", patch=8)
    with pytest.raises(UserError, match="not vit_tiny/16"):
        load_backbone(path, arch="vit_tiny", patch=16)


def test_timm_state_dict_loads_and_matches_timm_forward(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224", pretrained=False).eval()  # has a 1000-class head
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    model = load_backbone(path)
    assert model.embed_dim == 384 and model.patch_size == 16
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), reference.forward_features(x)[:, 0], atol=1e-5)


def test_resnet50_official_backbone(tmp_path):
    net = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    path = tmp_path / "rn50.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
    model = load_backbone(path)
    net.reset_classifier(0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(x), atol=1e-5)


def test_mismatched_weights_name_the_keys(tmp_path):
    sd = official_vit_state()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"missing: blocks\.1\.mlp\.fc2\.bias.*unexpected: blocks\.0\.extra"):
        load_backbone(path)
    torch.save({"teacher": {}, "student": {}}, path)
    with pytest.raises(UserError, match="no backbone weights"):
        load_backbone(path)
    with pytest.raises(UserError, match="no 'momentum' entry"):
        load_backbone(path, key="momentum")


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_untrusted_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        torch.save({"teacher": Exploit(marker)}, handle)
    with pytest.raises(UserError, match="not weights"):
        safe_load(path)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(official_vit_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_backbone(path)
    for garbage in (b"bad\n", b"\x80\x02}q\x00."[:3]):
        path.write_bytes(garbage)
        with pytest.raises(UserError, match="not a PyTorch file"):
            load_backbone(path)
    with pytest.raises(UserError, match="does not exist"):
        load_backbone(tmp_path / "nope.pth")


def test_atomic_save_leaves_previous_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"epoch": 1}, path)

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert safe_load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_random_needs_arch():
    with pytest.raises(UserError, match="needs an arch"):
        load_backbone("random")
    assert load_backbone(None, arch="vit_small", patch=8).patch_size == 8


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_without_weights_is_rejected(tmp_path):
    # a plain (non-zip) pickle goes through the weights-only unpickler too; it holds no weights
    path = tmp_path / "legacy.pth"
    with open(path, "wb") as handle:
        pickle.dump({"a": 1}, handle)
    with pytest.raises(UserError):
        load_backbone(path)


def test_atomic_write_text_replaces_whole_file(tmp_path):
    from pretrain.checkpoint import atomic_write_text
    path = tmp_path / "out" / "results.json"
    atomic_write_text(path, '{"a": 1}')
    atomic_write_text(path, '{"a": 2}')
    assert path.read_text() == '{"a": 2}'
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
