"""Attention masks on VOC: a hand-computed Jaccard with a known attention, resizing, end to end."""
import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import shared_data_dir
from evaluator_trees import save_tiny_checkpoint, tiny_vit, write_voc_tree

import evaluate.attention_masks as attention
from common.errors import run_cli
from data.index_masks import write_index_mask
from evaluate.attention_masks import attention_maps, prepare_pair, run_attention_masks
from pretrain import build_backbone

# 32 x 32 images, patch 8: a 4 x 4 grid, patch index = 4 * row + column.
HEAD_0 = {0: 0.3, 1: 0.25, 4: 0.2, 5: 0.15}  # the rest (0.1) spread over the other 12 patches
HEAD_1 = {15: 0.85}  # the rest (0.15) spread over the other 15


def head_row(peaks: dict) -> torch.Tensor:
    rest = (1.0 - sum(peaks.values())) / (16 - len(peaks))
    return torch.tensor([peaks.get(i, rest) for i in range(16)])


class KnownAttention(torch.nn.Module):
    """A 'ViT' whose last-block [CLS] attention is HEAD_0 / HEAD_1 for every image."""
    patch_size = 8

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def get_last_selfattention(self, x):
        attn = torch.full((len(x), 2, 17, 17), 1 / 17)
        for head, peaks in enumerate((HEAD_0, HEAD_1)):
            attn[:, head, 0] = torch.cat([torch.tensor([0.1]), 0.9 * head_row(peaks)])  # row sums to 1 with CLS
        return attn


def patches(*indices) -> np.ndarray:
    """A 32 x 32 bool map of the given patches."""
    grid = np.zeros(16, bool)
    grid[list(indices)] = True
    return grid.reshape(4, 4).repeat(8, 0).repeat(8, 1)


def label_map(objects: dict, void=()) -> np.ndarray:
    labels = np.zeros((32, 32), np.uint8)
    for label, cells in objects.items():
        labels[patches(*cells)] = label
    labels[patches(*void)] = 255 if void else 0
    return labels


def hand_built_voc(root):
    # Head 0 keeps patches {0, 1, 4} (ascending cumulative mass 0.1, 0.25 | 0.45, 0.7, 1.0 > 0.4), head 1 {15}.
    # Image a, classes: object 1 = {0, 4, 5} with patch 1 void, object 2 = {10, 11, 14, 15}:
    #   object 1: head 0 covers {0, 4} of it once void is left out: IoU 128 / 192 = 2/3 (head 1: 0)
    #   object 2: head 1: 64 / 256 = 1/4 (head 0: 0)                  -> J(a) = (2/3 + 1/4) / 2 = 11/24
    # Image a, instances: object 2 split into {10, 14} and {11, 15}: 0 and 64 / 128 -> (2/3 + 0 + 1/2) / 3 = 7/18
    # Image b: one object = {15}: head 1 matches it exactly -> 1. Image c: background only -> skipped.
    class_a = label_map({1: [0, 4, 5], 2: [10, 11, 14, 15]}, void=[1])
    object_a = label_map({1: [0, 4, 5], 2: [10, 14], 3: [11, 15]}, void=[1])
    single = label_map({7: [15]})
    empty = label_map({})
    return write_voc_tree(root, {"a": (class_a, object_a), "b": (single, single), "c": (empty, empty)})


def test_hand_computed_jaccard_with_a_known_attention(tmp_path):
    root = hand_built_voc(tmp_path / "voc")
    scores = run_attention_masks(KnownAttention(), root, image_size=32, num_workers=0, progress=False)
    assert scores == {"voc12_jaccard": pytest.approx(100 * (11 / 24 + 1) / 2)}
    by_instance = run_attention_masks(KnownAttention(), root, mask_kind="object", image_size=32, num_workers=0,
                                      progress=False)
    assert by_instance["voc12_jaccard"] == pytest.approx(100 * (7 / 18 + 1) / 2)
    # 80 % of the mass: head 0 keeps {0, 1, 4, 5} (cumulative 0.25 > 0.2) -> object 1 IoU 3/3 once void is out
    wider = run_attention_masks(KnownAttention(), root, mass=0.8, image_size=32, num_workers=0, progress=False)
    assert wider["voc12_jaccard"] == pytest.approx(100 * ((1 + 1 / 4) / 2 + 1) / 2)  # head 1 still keeps {15}


def test_attention_maps_of_one_image():
    maps = attention_maps(KnownAttention(), PIL.Image.new("RGB", (50, 40)), image_size=32)
    assert maps.attentions.shape == (2, 4, 4) and maps.image.shape == (3, 32, 32)
    assert maps.attentions[0].flatten()[0] == pytest.approx(0.9 * 0.3)
    assert np.array_equal(maps.pixel_masks[0], patches(0, 1, 4)) and np.array_equal(maps.pixel_masks[1], patches(15))
    assert maps.pixel_attentions.shape == (2, 32, 32) and maps.pixel_attentions[1, 31, 31] == pytest.approx(0.9 * 0.85)


def test_resizing_keeps_labels_and_crops_to_the_patch():
    image = PIL.Image.new("RGB", (50, 30), (255, 0, 0))
    labels = np.zeros((30, 50), np.uint8)
    labels[:, 25:], labels[0, 0] = 3, 255
    pixels, resized = prepare_pair(image, labels, patch_size=8, image_size=32)
    assert pixels.shape == (3, 32, 32) and resized.shape == (32, 32)
    assert pixels[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)  # ImageNet mean / std
    pixels, resized = prepare_pair(image, labels, patch_size=8, image_size=32, resize="short-side")
    assert pixels.shape == (3, 32, 48) and resized.shape == (32, 48)  # 53 x 32, cropped to 48 x 32
    assert set(np.unique(resized)) == {0, 3, 255}  # nearest: no new label values


def test_end_to_end_cli_with_a_tiny_vit(tmp_path):
    root = hand_built_voc(tmp_path / "voc")
    ckpt = str(save_tiny_checkpoint(tmp_path / "tiny.pth"))
    argv = ["--ckpt", ckpt, "--voc", str(root), "--image-size", "32", "--num-workers", "0",
            "--json", str(tmp_path / "scores.json")]
    assert run_cli(attention.main, argv) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert list(scores) == ["voc12_jaccard"] and 0 <= scores["voc12_jaccard"] <= 100
    assert run_cli(attention.main, argv + ["--resize", "short-side", "--batch-size", "2"]) == 0


def test_bad_inputs_end_in_one_line(tmp_path, capsys):
    root = hand_built_voc(tmp_path / "voc")
    ckpt = str(save_tiny_checkpoint(tmp_path / "tiny.pth"))
    argv = ["--ckpt", ckpt, "--voc", str(root), "--image-size", "32", "--num-workers", "0",
            "--json", str(tmp_path / "scores.json")]
    write_index_mask(root / "VOC2012" / "SegmentationClass" / "b.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    for extra, named in ((["--split", "test"], "test.txt"), ([], "b.png' is 8x8"),
                         (["--ckpt", str(tmp_path / "broken.pth")], "broken.pth")):
        assert run_cli(attention.main, argv + extra) == 2
        lines = [line for line in capsys.readouterr().err.splitlines()
                 if line.strip() and not line.startswith("voc attention")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]
    assert not (tmp_path / "scores.json").exists()


def test_real_voc_sample():
    shared = shared_data_dir()
    root = shared / "voc_mini" if shared else None
    if root is None or not (root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").is_file():
        pytest.skip("real VOC sample (../shared/data/voc_mini) not present")
    torch.manual_seed(0)
    model = build_backbone("vit", 16, embed_dim=32, depth=2, num_heads=2, img_size=32)
    for kind in ("class", "object"):
        scores = run_attention_masks(model, root, mask_kind=kind, image_size=64, num_workers=0, progress=False)
        assert 0 < scores["voc12_jaccard"] < 100


def test_generated_suite_end_to_end(tmp_path):
    suite_voc = pytest.importorskip("data.suite_voc")
    suite_voc.write_voc(tmp_path, n_val=4, n_train=0, progress=False)
    model = tiny_vit()
    scores = run_attention_masks(model, tmp_path / "voc", image_size=96, num_workers=0, progress=False)
    assert 0 < scores["voc12_jaccard"] < 100
