"""Helpers of the evaluator tests: a tiny ViT, its checkpoint, small dataset trees, the CLI runner."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from common.errors import run_cli
from data.index_masks import write_index_mask
from pretrain import build_backbone
from pretrain.backbones import describe
from pretrain.checkpoint import atomic_save


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """A 2-block, 32-wide ViT with patch 8 (position table for 32 x 32)."""
    torch.manual_seed(seed)
    return build_backbone("vit", 8, embed_dim=32, depth=2, num_heads=2, img_size=32).eval()


def save_tiny_checkpoint(path: Path, model: torch.nn.Module | None = None) -> Path:
    """A training-style checkpoint (teacher backbone + our architecture record) of ``model``."""
    model = model or tiny_vit()
    teacher = {f"backbone.{key}": value for key, value in model.state_dict().items()}
    atomic_save({"teacher": teacher, "args": {"backbone": describe(model), "global_crops_size": 32}}, path)
    return path


def write_tiny_suite(data: Path) -> Path:
    """Every part of the embedded suite at tiny sizes under ``data`` (a few seconds to write)."""
    from data import suite_classification, suite_copydays, suite_davis, suite_retrieval, suite_voc
    suite_classification.write_classification(data, n_train_per_class=3, n_val_per_class=2, image_size=32,
                                              progress=False)
    suite_retrieval.write_retrieval(data, n_landmarks=2, n_views_per_landmark=4, n_queries_per_landmark=1,
                                    n_distractors=2, progress=False)
    suite_copydays.write_copydays(data, n_originals=3, n_distractors=2, n_whitening=6, progress=False)
    suite_davis.write_davis(data, n_val_sequences=1, n_train_sequences=0, n_frames=4, progress=False)
    suite_voc.write_voc(data, n_val=3, n_train=0, progress=False)
    return data


def pattern_image(index: int, size=(40, 32)) -> PIL.Image.Image:
    """A distinct, structured RGB image per index (stripes and a colour that depend on it)."""
    width, height = size
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width]
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
    stripes = (np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period) > 0)[..., None]
    colour_a, colour_b = rng.integers(0, 256, size=(2, 3))
    return PIL.Image.fromarray(np.where(stripes, colour_a, colour_b).astype(np.uint8))


def save_image(image: PIL.Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)
    return path


def write_revisitop_tree(root: Path, dataset: str = "tiny", n_database: int = 6, n_queries: int = 2) -> dict:
    """``root/<dataset>/{jpg/*.jpg, gnd_<dataset>.pkl}``: query q is an exact copy of database image 2q
    (its easy positive); database image 2q + 1 is its hard positive; the gnd dict is returned."""
    folder = root / dataset
    imlist = [f"db{index}" for index in range(n_database)]
    qimlist = [f"q{index}" for index in range(n_queries)]
    for index, name in enumerate(imlist):
        save_image(pattern_image(index, size=(48 + 8 * index, 40)), folder / "jpg" / f"{name}.jpg")
    for query, name in enumerate(qimlist):
        shutil.copy(folder / "jpg" / f"{imlist[2 * query]}.jpg", folder / "jpg" / f"{name}.jpg")
    gnd = {"imlist": imlist, "qimlist": qimlist,
           "gnd": [{"bbx": [2.0, 3.0, 30.0, 25.0], "easy": [2 * q], "hard": [2 * q + 1], "junk": []}
                   for q in range(n_queries)]}
    (folder / f"gnd_{dataset}.pkl").write_bytes(pickle.dumps(gnd, protocol=3))
    return gnd


def write_copydays_tree(root: Path, n_originals: int = 4, strong_copy=None) -> Path:
    """Copydays layout: originals ``BBBB00.jpg``; ``strong/BBBB01.jpg`` = ``strong_copy(original)`` (default: the
    same file); ``jpegqual/50`` and ``crops/10``: exact copies of the originals' files."""
    for index in range(n_originals):
        name = f"{2000 + index}00.jpg"
        original = save_image(pattern_image(index), root / "original" / name)
        for block in ("jpegqual/50", "crops/10"):
            (root / block).mkdir(parents=True, exist_ok=True)
            shutil.copy(original, root / block / name)
        strong = root / "strong" / f"{2000 + index}01.jpg"
        strong.parent.mkdir(parents=True, exist_ok=True)
        if strong_copy is None:
            shutil.copy(original, strong)
        else:
            save_image(strong_copy(PIL.Image.open(original).convert("RGB"), index), strong)
    return root


def write_voc_tree(root: Path, images: dict) -> Path:
    """``root/VOC2012`` with a val split: images is id -> (class label map, object label map), (H, W) uint8;
    the JPEGs are noise of the maps' size."""
    voc = root / "VOC2012"
    rng = np.random.default_rng(0)
    for image_id, (classes, objects) in images.items():
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (*classes.shape, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg")
        write_index_mask(voc / "SegmentationClass" / f"{image_id}.png", classes)
        write_index_mask(voc / "SegmentationObject" / f"{image_id}.png", objects)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in images))
    return root


def run_main(main, argv, capsys) -> tuple[int, str]:
    """Run an evaluator's ``main`` through ``run_cli``: (exit status, stderr)."""
    status = run_cli(main, [str(arg) for arg in argv])
    return status, capsys.readouterr().err


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in Path(folder).rglob("*") if path.is_file()) if Path(folder).exists() else []
