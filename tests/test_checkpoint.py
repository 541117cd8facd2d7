"""Loading every kind of checkpoint a user holds, exactly, and safely; training checkpoints kept
(newest k), resumed from the newest that loads, and never lost to a full disk."""
import errno
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from reference_vit import cls_feature

from common.errors import UserError
from pretrain import build_backbone, load_backbone
from pretrain.checkpoint import atomic_save, safe_load
from pretrain.checkpoint_files import load_training_checkpoint, save_training_checkpoint

REPO = Path(__file__).resolve().parents[1]


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
    """The released DINO ResNet-50 files are torchvision ResNet-50 state dicts (a DDP 'module.' prefix in
    full checkpoints, the fc layer dropped); older files lack BatchNorm's step counters."""
    net = torchvision.models.resnet50(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a wrong load shows in the output
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "rn50.pth"
    state = {"module." + k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state}, path)
    model = load_backbone(path)
    net.fc = torch.nn.Identity()
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
    from common.atomic import atomic_write_text
    path = tmp_path / "out" / "results.json"
    atomic_write_text(path, '{"a": 1}')
    atomic_write_text(path, '{"a": 2}')
    assert path.read_text() == '{"a": 2}'
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_numpy_scalars_and_namespace_keep_their_values(tmp_path, zip_format):
    # official checkpoints hold numpy scalars (schedule values in the optimizer, args); they go through stand-ins
    import argparse

    import numpy as np
    values = {"lr": np.float64(5e-4), "wd": np.float32(0.04), "half": np.float16(1.5), "step": np.int64(-7),
              "small": np.uint8(200), "flag": np.bool_(True), "phase": np.complex128(1 - 2j),
              "big_endian": np.dtype(">f8").type(3.25), "dtype": np.dtype("<i4")}
    checkpoint = {"optimizer": {"param_groups": [{"lr": values["lr"], "weight_decay": values["wd"]}]},
                  "args": argparse.Namespace(arch="vit_small", lr=values["lr"], epochs=np.int64(100)),
                  "values": values, "epoch": 3}
    path = tmp_path / "official.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    loaded = safe_load(path)
    for name, value in values.items():
        assert type(loaded["values"][name]) is type(value) and loaded["values"][name] == value, name
    assert loaded["optimizer"]["param_groups"][0]["lr"] == np.float64(5e-4)
    assert isinstance(loaded["args"], argparse.Namespace)
    assert vars(loaded["args"]) == {"arch": "vit_small", "lr": np.float64(5e-4), "epochs": 100}
    assert type(loaded["args"].epochs) is np.int64


# ---------------------------------------------------------------- training checkpoints: rotation, fall-back, full disk

def tiny_state(iteration: int) -> dict:
    """A small training-style state whose every value depends on ``iteration``."""
    return {"teacher": {"w": torch.full((3, 4), float(iteration))}, "epoch": iteration // 10, "step": iteration}


def assert_state_is(state: dict, iteration: int) -> None:
    assert state["step"] == iteration and torch.equal(state["teacher"]["w"], tiny_state(iteration)["teacher"]["w"])


def listing(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_rotation_keeps_the_newest_k_and_checkpoint_pth_is_the_newest(tmp_path, keep):
    atomic_save(tiny_state(0), tmp_path / "checkpoint0000.pth")  # an epoch snapshot of the trainer
    for iteration in (10, 20, 30, 40):
        path = save_training_checkpoint(tiny_state(iteration), tmp_path, iteration, keep=keep)
        assert path == tmp_path / f"checkpoint-it{iteration:08d}.pth"
    kept = [f"checkpoint-it{iteration:08d}.pth" for iteration in (40, 30, 20)[:keep]]
    assert listing(tmp_path) == sorted(["checkpoint.pth", "checkpoint0000.pth", *kept])
    assert os.path.samefile(tmp_path / "checkpoint.pth", tmp_path / kept[0])  # a hard link, not a second copy
    assert_state_is(safe_load(tmp_path / "checkpoint.pth"), 40)
    assert_state_is(safe_load(tmp_path / "checkpoint0000.pth"), 0)
    state, path, warnings = load_training_checkpoint(tmp_path)
    assert_state_is(state, 40)
    assert path == tmp_path / kept[0] and warnings == []
    with pytest.raises(ValueError):
        save_training_checkpoint(tiny_state(50), tmp_path, 50, keep=0)


def test_without_hard_links_checkpoint_pth_is_an_atomic_copy(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    for iteration in (1, 2):
        save_training_checkpoint(tiny_state(iteration), tmp_path, iteration)
    assert listing(tmp_path) == ["checkpoint-it00000001.pth", "checkpoint-it00000002.pth", "checkpoint.pth"]
    assert not os.path.samefile(tmp_path / "checkpoint.pth", tmp_path / "checkpoint-it00000002.pth")
    assert (tmp_path / "checkpoint.pth").read_bytes() == (tmp_path / "checkpoint-it00000002.pth").read_bytes()
    # the newest rotating file is corrupt: its copy under the official name is tried before the older one
    (tmp_path / "checkpoint-it00000002.pth").write_bytes(b"garbage")
    state, path, warnings = load_training_checkpoint(tmp_path)
    assert_state_is(state, 2)
    assert path == tmp_path / "checkpoint.pth" and len(warnings) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    for iteration in (100, 200):
        save_training_checkpoint(tiny_state(iteration), tmp_path, iteration)
    newest = tmp_path / "checkpoint-it00000200.pth"  # also checkpoint.pth: the same file
    if damage == "truncate":
        with open(newest, "r+b") as handle:
            handle.truncate(newest.stat().st_size // 2)
    else:
        newest.write_bytes(b"\x00garbage" * 100)
    state, path, warnings = load_training_checkpoint(tmp_path)
    assert_state_is(state, 100)
    assert path == tmp_path / "checkpoint-it00000100.pth"
    assert len(warnings) == 1 and str(newest) in warnings[0] and "truncated or not a PyTorch file" in warnings[0]
    # training goes on from iteration 100: the next save removes the abandoned (corrupt) newer file
    save_training_checkpoint(tiny_state(150), tmp_path, 150)
    assert listing(tmp_path) == ["checkpoint-it00000100.pth", "checkpoint-it00000150.pth", "checkpoint.pth"]
    assert load_training_checkpoint(tmp_path)[1:] == (tmp_path / "checkpoint-it00000150.pth", [])


def test_resume_prefers_the_newest_rotating_file_over_a_stale_checkpoint_pth(tmp_path):
    save_training_checkpoint(tiny_state(1), tmp_path, 1)
    atomic_save(tiny_state(2), tmp_path / "checkpoint-it00000002.pth")  # killed before checkpoint.pth moved on
    state, path, _ = load_training_checkpoint(tmp_path)
    assert_state_is(state, 2)
    assert path == tmp_path / "checkpoint-it00000002.pth"
    assert_state_is(safe_load(tmp_path / "checkpoint.pth"), 1)


def test_no_checkpoint_and_none_loadable(tmp_path):
    assert load_training_checkpoint(tmp_path) == (None, None, [])
    assert load_training_checkpoint(tmp_path / "absent") == (None, None, [])
    (tmp_path / "checkpoint.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "checkpoint-it00000005.pth").write_bytes(b"")
    torch.save(torch.zeros(2), tmp_path / "checkpoint-it00000003.pth")
    with pytest.raises(UserError) as error:
        load_training_checkpoint(tmp_path)
    message = str(error.value)
    assert "\n" not in message and f"no checkpoint in '{tmp_path}' loads" in message
    for name in ("checkpoint.pth", "checkpoint-it00000005.pth", "checkpoint-it00000003.pth holds a Tensor"):
        assert name in message


class DiskFullAfter:
    """A file handle that writes ``budget`` bytes, then fails like a full disk (ENOSPC) mid-write."""

    def __init__(self, handle, budget: int):
        self.handle, self.budget = handle, budget

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.budget:
            self.handle.write(data[:self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


@pytest.mark.parametrize("failure", ["enospc-header", "enospc-midway", "edquot-fsync", "eio-link"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    save_training_checkpoint(tiny_state(1), tmp_path, 1)
    before = {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)}
    real_save = torch.save
    if failure.startswith("enospc"):
        # in the zip header torch.save lets the OSError through; midway it raises a RuntimeError caused by it
        budget = 10 if failure == "enospc-header" else 100
        if failure == "enospc-midway":  # the case this covers: torch.save hides the OSError behind a RuntimeError
            with pytest.raises(RuntimeError):
                real_save(tiny_state(2), DiskFullAfter(io.BytesIO(), budget))
        monkeypatch.setattr(torch, "save", lambda obj, handle: real_save(obj, DiskFullAfter(handle, budget)))
    elif failure == "edquot-fsync":
        def quota_exceeded(descriptor):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        monkeypatch.setattr(os, "fsync", quota_exceeded)
    else:
        def io_error(source, target):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(os, "link", io_error)
    with pytest.raises(UserError) as error:
        save_training_checkpoint(tiny_state(2), tmp_path, 2)
    monkeypatch.undo()
    message = str(error.value)
    reason = {"enospc": "No space left on device", "edquot": "Disk quota exceeded", "eio": "Input/output error"}
    assert "\n" not in message and reason[failure.split("-")[0]] in message
    assert "checkpoint-it00000002.pth" in message and "failed" in message
    assert f"the previous checkpoint '{tmp_path / 'checkpoint.pth'}' is intact" in message
    assert "free space or check the disk" in message and "run the same command again" in message
    assert {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)} == before  # no temp file either
    state, path, warnings = load_training_checkpoint(tmp_path)
    assert_state_is(state, 1)
    assert warnings == []


def test_failed_first_write_says_no_earlier_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, handle: real_save(obj, DiskFullAfter(handle, 100)))
    with pytest.raises(UserError, match="no earlier checkpoint exists"):
        save_training_checkpoint(tiny_state(1), tmp_path, 1)
    assert listing(tmp_path) == []


FULL_DISK_SCRIPT = """
import json, os, sys, torch
from common.errors import UserError
from pretrain.checkpoint_files import load_training_checkpoint, save_training_checkpoint
folder = sys.argv[1]
save_training_checkpoint({"w": torch.arange(16.0), "step": 1}, folder, 1)
try:
    save_training_checkpoint({"w": torch.ones(1 << 19), "step": 2}, folder, 2)  # 2 MiB on a 1 MiB disk
    message = None
except UserError as error:
    message = str(error)
state, path, warnings = load_training_checkpoint(folder)
print(json.dumps({"message": message, "files": sorted(os.listdir(folder)), "step": state["step"],
                  "w": state["w"].tolist(), "path": os.path.basename(path), "warnings": warnings}))
"""


def test_real_full_tmpfs_keeps_the_previous_checkpoint(tmp_path):
    # a 1 MiB tmpfs mounted in a private mount namespace (gone when the child exits); skipped where not permitted
    disk = tmp_path / "disk"
    disk.mkdir()
    namespace = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    command = [*namespace, "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1" || exit 97; shift; exec "$@"', "sh",
               str(disk), sys.executable, "-c", FULL_DISK_SCRIPT, str(disk)]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("no unshare command")
    if done.returncode == 97 or (done.returncode != 0 and "unshare" in done.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "No space left on device" in result["message"] and "checkpoint.pth' is intact" in result["message"]
    assert result["files"] == ["checkpoint-it00000001.pth", "checkpoint.pth"]
    assert (result["step"], result["w"], result["warnings"]) == (1, list(map(float, range(16))), [])
