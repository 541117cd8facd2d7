"""Tests for the suite's parts (data/suite_<part>.py), their shared helpers and the command line (data/suite.py).

Each part is written once at a tiny size; the tests check that its layout is
the real dataset's, that its ground truth is what the renderer drew, and that
it is deterministic. The classification part must stay byte-identical to the
images generated before these parts existed (another job trains on them).
"""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import run_cli
from data import (
    suite,
    suite_classification,
    suite_common,
    suite_copydays,
    suite_davis,
    suite_retrieval,
    suite_scenes,
    suite_voc,
)
from data.suite_classification import CLASS_NAMES
from data.suite_common import LABEL_PALETTE
from data.suite_scenes import SUPERSAMPLING, SceneObject

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "retrieval": dict(n_landmarks=2, n_views_per_landmark=5, n_queries_per_landmark=2, n_distractors=3),
    "copydays": dict(n_originals=3, n_distractors=2, n_whitening=2),
    "davis": dict(n_val_sequences=2, n_train_sequences=1, n_frames=4),
    "voc": dict(n_val=4, n_train=2),
}
WRITERS = {"retrieval": suite_retrieval.write_retrieval, "copydays": suite_copydays.write_copydays,
           "davis": suite_davis.write_davis, "voc": suite_voc.write_voc}


def _write(part, root, seed=0):
    return WRITERS[part](root, seed=seed, progress=False, **TINY[part])


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _jpeg_bytes(image: Image.Image, quality=suite_common.JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Every part written once, tiny, with seed 0: {part: (folder, parameters)}."""
    root = tmp_path_factory.mktemp("suite_parts")
    return {part: (root / part, _write(part, root)) for part in WRITERS}


# ---------------------------------------------------------------- scenes

def test_label_palette_is_the_voc_colour_map():
    palette = np.array(LABEL_PALETTE).reshape(256, 3)
    assert palette[:9].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                                    [128, 0, 128], [0, 128, 128], [128, 128, 128], [64, 0, 0]]
    assert palette[10].tolist() == [64, 128, 0] and palette[255].tolist() == [224, 224, 192]


def test_scene_areas_clipping_and_occlusion_match_the_geometry():
    canvas = np.zeros((40 * SUPERSAMPLING, 60 * SUPERSAMPLING, 3), np.uint8)
    circle = CLASS_NAMES.index("circle")
    half_out = SceneObject(circle, (0.0, 20.0), 10.0, 0.0, (200, 0, 0))  # centred on the left border
    back = SceneObject(circle, (30.0, 20.0), 8.0, 0.0, (0, 200, 0))
    front = SceneObject(circle, (38.0, 20.0), 8.0, 0.0, (0, 0, 200))  # 8 px to the right: a lens is hidden
    render = suite_scenes.render_scene(np.random.default_rng(0), canvas, [half_out, back, front])

    # PIL fills an ellipse's bounding box inclusively: a disc drawn with radius r (output pixels) covers
    # radius r + 0.5 sub-pixel; the ground truth follows what was drawn.
    grow = 0.5 / SUPERSAMPLING
    assert render.full_area == pytest.approx(np.pi * (np.array([10.0, 8.0, 8.0]) + grow) ** 2, rel=0.01)
    assert render.visible_fraction([0]) == pytest.approx(0.5, abs=0.01)
    r, d = 8.0 + grow, 8.0
    lens = 2 * r ** 2 * np.arccos(d / (2 * r)) - d / 2 * np.sqrt(4 * r ** 2 - d ** 2)
    assert render.visible[1].sum() == pytest.approx(np.pi * r ** 2 - lens, rel=0.01)
    assert render.visible_fraction([2]) == 1.0
    labels = render.labels()
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    # a pixel goes to the back circle when it covers half of it, unless the front one does too (ties: front)
    assert np.array_equal(labels == 2, (render.visible[1] >= 0.5) & (render.visible[2] < 0.5))
    assert ((render.visible[1] >= 0.5) & (render.visible[2] >= 0.5)).sum() < 10
    assert render.visible_box([2]) == [30.0, 12.0, 46.0 + 2 * grow, 28.0 + 2 * grow]  # (inclusive right/bottom)


def test_scene_modules_do_not_import_the_training_or_evaluation_code():
    code = ("import sys, data.suite, data.suite_common, data.suite_classification, data.suite_retrieval, "
            "data.suite_copydays, data.suite_davis, data.suite_voc; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pretrain', 'evaluate', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["suite_common", "suite_shapes", "suite_scenes", "suite_classification",
                                    "suite_retrieval", "suite_copydays", "suite_davis", "suite_voc", "suite"])
def test_each_suite_module_imports_alone_and_no_part_imports_the_command_line(module):
    code = f"import sys, data.{module}; print('data.suite' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(module == "suite")


# ---------------------------------------------------------------- retrieval

def _gnd(folder):
    class PlainOnly(pickle.Unpickler):  # a revisitop gnd file holds builtins only
        def find_class(self, module, name):
            raise AssertionError(f"gnd pickle refers to {module}.{name}")

    with open(folder / "rsynth" / "gnd_rsynth.pkl", "rb") as handle:
        return PlainOnly(handle).load()


def test_retrieval_layout_is_revisitop(parts):
    folder, parameters = parts["retrieval"]
    assert sorted(os.listdir(folder)) == ["SUITE.json", "rsynth"]
    assert json.loads((folder / "SUITE.json").read_text()) == parameters
    assert sorted(os.listdir(folder / "rsynth")) == ["gnd_rsynth.pkl", "jpg"]
    gnd = _gnd(folder)
    assert sorted(gnd) == ["gnd", "imlist", "qimlist"]
    imlist, qimlist = gnd["imlist"], gnd["qimlist"]
    assert len(imlist) == 2 * 5 + 3 and len(qimlist) == 2 * 2 == len(gnd["gnd"])
    assert qimlist == ["abbey_900000", "abbey_900001", "arch_900000", "arch_900001"]
    assert sorted(imlist) == sorted([f"{n}_{v:06d}" for n in ("abbey", "arch") for v in range(5)]
                                    + [f"rsynth_{d:06d}" for d in range(3)])
    assert not set(imlist) & set(qimlist)
    assert sorted(os.listdir(folder / "rsynth" / "jpg")) == sorted(f"{name}.jpg" for name in imlist + qimlist)
    for entry in gnd["gnd"]:
        assert sorted(entry) == ["bbx", "easy", "hard", "junk"]
        assert len(entry["bbx"]) == 4 and all(type(v) is float for v in entry["bbx"])
        lists = [entry[kind] for kind in ("easy", "hard", "junk")]
        assert all(type(i) is int and 0 <= i < len(imlist) for listed in lists for i in listed)
        assert sum(map(len, lists)) == len(set().union(*lists)) == 5  # disjoint; every view of its landmark
    image = Image.open(folder / "rsynth" / "jpg" / f"{imlist[0]}.jpg")
    assert image.format == "JPEG" and image.size in ((128, 96), (96, 128))


def test_retrieval_labels_are_the_rerendered_visible_fraction(parts):
    folder, parameters = parts["retrieval"]
    gnd = _gnd(folder)
    seen = set()
    for landmark_index, name in enumerate(parameters["landmark_names"]):
        entry = gnd["gnd"][2 * landmark_index]
        assert gnd["gnd"][2 * landmark_index + 1] == {**entry, "bbx": gnd["gnd"][2 * landmark_index + 1]["bbx"]}
        for view_index in range(5):
            render, indices, zoom = suite_retrieval.render_view(0, landmark_index, view_index)
            fraction = render.visible_fraction(indices)
            label = suite_retrieval.view_label(fraction, zoom)
            position = gnd["imlist"].index(f"{name}_{view_index:06d}")
            assert [kind for kind in ("easy", "hard", "junk") if position in entry[kind]] == [label]
            expected = ("easy" if fraction >= 0.7 and 0.7 <= zoom <= 1.4 else "hard" if fraction >= 0.25 else "junk")
            assert label == expected and fraction >= suite_retrieval.MIN_VIEW_FRACTION
            stored = folder / "rsynth" / "jpg" / f"{name}_{view_index:06d}.jpg"
            assert _jpeg_bytes(render.image) == stored.read_bytes()
            seen.add(label)
    assert seen == {"easy", "hard", "junk"}


def test_retrieval_query_boxes_hold_the_whole_landmark(parts):
    folder, _ = parts["retrieval"]
    gnd = _gnd(folder)
    for position, name in enumerate(gnd["qimlist"]):
        render, indices, _ = suite_retrieval.render_view(0, position // 2, position % 2, query=True)
        x1, y1, x2, y2 = gnd["gnd"][position]["bbx"]
        assert [x1, y1, x2, y2] == render.visible_box(indices)
        width, height = render.image.size
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert (x2 - x1) * (y2 - y1) < 0.8 * width * height  # a box, not the whole image
        landmark_pixels = np.argwhere(np.isin(render.labels(), [k + 1 for k in indices]))
        assert landmark_pixels.size and landmark_pixels.min(axis=0).tolist() >= [int(y1), int(x1)]
        assert (landmark_pixels.max(axis=0) + 1).tolist() <= [np.ceil(y2), np.ceil(x2)]
        assert render.visible_fraction(indices) >= suite_retrieval.QUERY_MIN_FRACTION


# ---------------------------------------------------------------- copydays

def test_copydays_layout_and_names(parts):
    folder, parameters = parts["copydays"]
    assert json.loads((folder / "SUITE.json").read_text()) == parameters
    assert sorted(os.listdir(folder)) == ["SUITE.json", "crops", "distractors", "jpegqual", "original", "strong",
                                          "whitening"]
    originals = sorted(os.listdir(folder / "original"))
    assert originals == ["200000.jpg", "200100.jpg", "200200.jpg"]
    assert sorted(os.listdir(folder / "jpegqual"), key=int) == [str(q) for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
    assert sorted(os.listdir(folder / "crops"), key=int) == [str(c) for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)]
    for block in [folder / "jpegqual" / q for q in os.listdir(folder / "jpegqual")] + \
                 [folder / "crops" / c for c in os.listdir(folder / "crops")]:
        assert sorted(os.listdir(block)) == originals  # 1:1 with the originals in sorted order
    strong = sorted(os.listdir(folder / "strong"))
    assert {name[:4] for name in strong} == {name[:4] for name in originals}
    assert all(name[4:6] != "00" and name[:4] + "00.jpg" in originals for name in strong)
    assert len(strong) == sum(suite_copydays.strong_copy_count(0, i) for i in range(3))
    assert sorted(os.listdir(folder / "distractors")) == ["distractor_000000.jpg", "distractor_000001.jpg"]
    assert sorted(os.listdir(folder / "whitening")) == ["whitening_000000.jpg", "whitening_000001.jpg"]
    everything = [p.read_bytes() for p in folder.rglob("*.jpg") if p.parent.name in ("original", "distractors",
                                                                                    "whitening")]
    assert len(set(everything)) == 3 + 2 + 2  # the three sets are different photos


def test_copydays_copies_come_from_their_original(parts):
    folder, _ = parts["copydays"]
    for index, name in enumerate(sorted(os.listdir(folder / "original"))):
        original = suite_copydays.render_photo(0, suite_copydays.ROLE_ORIGINAL, index)
        assert _jpeg_bytes(original) == (folder / "original" / name).read_bytes()
        pixels = np.asarray(original, np.float64)
        errors = [np.abs(np.asarray(Image.open(folder / "jpegqual" / str(q) / name), np.float64) - pixels).mean()
                  for q in (3, 30, 75)]
        assert errors[0] > errors[1] > errors[2] and errors[2] < 10  # (the render's pixel noise is 6)
        crop = Image.open(folder / "crops" / "50" / name)
        keep = np.sqrt(0.5)
        assert crop.size == (round(original.width * keep), round(original.height * keep))
        left, top = (original.width - crop.width) // 2, (original.height - crop.height) // 2
        centre = pixels[top:top + crop.height, left:left + crop.width]
        assert np.abs(np.asarray(crop, np.float64) - centre).mean() < 10
        for copy_index in range(suite_copydays.strong_copy_count(0, index)):
            copy = suite_copydays.strong_copy(0, index, copy_index, original)
            path = folder / "strong" / f"{name[:4]}{copy_index + 1:02d}.jpg"
            assert _jpeg_bytes(copy) == path.read_bytes()
            assert not np.array_equal(np.asarray(copy), np.asarray(original))


# ---------------------------------------------------------------- davis

def test_davis_layout_palette_and_sets(parts):
    folder, parameters = parts["davis"]
    assert json.loads((folder / "SUITE.json").read_text()) == parameters
    val = (folder / "ImageSets" / "2017" / "val.txt").read_text().splitlines()
    train = (folder / "ImageSets" / "2017" / "train.txt").read_text().splitlines()
    assert len(val) == 2 and len(train) == 1 and not set(val) & set(train)
    assert sorted(os.listdir(folder / "JPEGImages" / "480p")) == sorted(val + train)
    assert sorted(os.listdir(folder / "Annotations" / "480p")) == sorted(val + train)
    frames = [f"{t:05d}" for t in range(4)]
    for name in val + train:
        assert sorted(os.listdir(folder / "JPEGImages" / "480p" / name)) == [f + ".jpg" for f in frames]
        assert sorted(os.listdir(folder / "Annotations" / "480p" / name)) == [f + ".png" for f in frames]
        annotation = Image.open(folder / "Annotations" / "480p" / name / "00000.png")
        assert annotation.mode == "P" and annotation.getpalette() == LABEL_PALETTE and annotation.size == (128, 72)
        assert Image.open(folder / "JPEGImages" / "480p" / name / "00000.jpg").size == (128, 72)


def test_davis_masks_are_the_rendered_objects(parts):
    folder, _ = parts["davis"]
    names = (folder / "ImageSets" / "2017" / "val.txt").read_text().splitlines()
    names += (folder / "ImageSets" / "2017" / "train.txt").read_text().splitlines()
    for index, name in enumerate(names):
        sequence = suite_davis.Sequence(0, index)
        count = len(sequence.objects)
        assert name == sequence.name == "-".join(CLASS_NAMES[o.class_index] for o in sequence.objects)
        first = np.asarray(Image.open(folder / "Annotations" / "480p" / name / "00000.png"))
        assert first.max() == count and set(np.unique(first)) == set(range(count + 1))
        for k, item in enumerate(sequence.objects):  # frame 0: whole objects, no overlap
            expected_area = np.pi * item.radius ** 2 if CLASS_NAMES[item.class_index] == "circle" else None
            if expected_area:
                assert (first == k + 1).sum() == pytest.approx(expected_area, rel=0.05)
        for t in range(4):
            image, labels = sequence.frame(t)
            stored = np.asarray(Image.open(folder / "Annotations" / "480p" / name / f"{t:05d}.png"))
            assert np.array_equal(stored, labels)
            assert _jpeg_bytes(image) == (folder / "JPEGImages" / "480p" / name / f"{t:05d}.jpg").read_bytes()
        last = np.asarray(Image.open(folder / "Annotations" / "480p" / name / "00003.png"))
        assert not np.array_equal(first, last)  # the objects move


# ---------------------------------------------------------------- voc

def test_voc_layout_palette_and_class_ids(parts):
    folder, parameters = parts["voc"]
    assert json.loads((folder / "SUITE.json").read_text()) == parameters
    assert parameters["class_ids"] == {name: i + 1 for i, name in enumerate(CLASS_NAMES)}
    voc = folder / "VOC2012"
    assert sorted(os.listdir(folder)) == ["SUITE.json", "VOC2012"]
    assert sorted(os.listdir(voc)) == ["ImageSets", "JPEGImages", "SegmentationClass", "SegmentationObject",
                                       "class_names.txt"]
    assert (voc / "class_names.txt").read_text().splitlines() == ["_background_", *CLASS_NAMES]
    sets = voc / "ImageSets" / "Segmentation"
    val, train = (sets / "val.txt").read_text().splitlines(), (sets / "train.txt").read_text().splitlines()
    assert val == [f"synth_{i:06d}" for i in range(4)] and train == ["synth_000004", "synth_000005"]
    assert (sets / "trainval.txt").read_text().splitlines() == sorted(val + train)
    assert sorted(os.listdir(voc / "JPEGImages")) == [f"{i}.jpg" for i in sorted(val + train)]
    for kind in ("SegmentationClass", "SegmentationObject"):
        assert sorted(os.listdir(voc / kind)) == [f"{i}.png" for i in sorted(val + train)]
        for image_id in val:
            mask = Image.open(voc / kind / f"{image_id}.png")
            assert mask.mode == "P" and mask.getpalette() == LABEL_PALETTE
            assert mask.size == Image.open(voc / "JPEGImages" / f"{image_id}.jpg").size
            assert set(np.unique(np.asarray(mask))) <= set(range(11)) | {255}


def test_voc_masks_are_the_rendered_coverage_with_a_void_border(parts):
    voc = parts["voc"][0] / "VOC2012"
    for index in range(6):
        image, _, _, render, objects = suite_voc.render_segmentation_image(0, index)
        name = f"synth_{index:06d}"
        instances = np.asarray(Image.open(voc / "SegmentationObject" / f"{name}.png"))
        classes = np.asarray(Image.open(voc / "SegmentationClass" / f"{name}.png"))
        assert _jpeg_bytes(image) == (voc / "JPEGImages" / f"{name}.jpg").read_bytes()
        void = instances == 255
        assert np.array_equal(void, classes == 255) and void.any()
        coverage_labels = render.labels()
        for k, item in enumerate(objects):
            mask = instances == k + 1
            assert mask.sum() > 0
            assert np.array_equal(mask, (render.visible[k] >= 0.5) & ~void)  # 50% coverage, minus the border
            assert np.all(classes[mask] == item.class_index + 1)
        assert np.array_equal(instances[~void], coverage_labels[~void])
        # void = exactly the pixels next to another label (3 x 3), i.e. a band along every border
        padded = np.pad(coverage_labels.astype(int), 1, mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
        assert np.array_equal(void, windows.max(axis=(2, 3)) != windows.min(axis=(2, 3)))
        assert void.sum() < 0.25 * void.size


# ---------------------------------------------------------------- determinism and the classification part

@pytest.mark.parametrize("part", sorted(WRITERS))
def test_parts_are_deterministic_per_seed(part, parts, tmp_path):
    first = _files(parts[part][0])
    _write(part, tmp_path / "again")
    _write(part, tmp_path / "other", seed=1)
    again, other = _files(tmp_path / "again" / part), _files(tmp_path / "other" / part)
    assert again == first
    images = lambda files: sorted(v for k, v in files.items() if k.endswith(".jpg"))  # noqa: E731
    assert len(images(other)) > 0 and len(images(first)) > 0
    if part != "copydays":  # (the number of strong copies is drawn per original)
        assert len(images(other)) == len(images(first))
    assert not set(images(other)) & set(images(first))  # a new seed draws every image anew


def test_classification_part_is_byte_identical_to_version_3(tmp_path):
    suite_classification.write_classification(tmp_path, n_train_per_class=2, n_val_per_class=2, progress=False)
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for class_name in sorted(CLASS_NAMES):
            for index in range(2):
                digest.update((tmp_path / "classification" / split / class_name / f"{index:04d}.png").read_bytes())
    # the first two images of every class and split, as suite version 3 renders them (objects of 55-90% of
    # the side); a change of this digest must come with a new SUITE_VERSION
    assert suite_classification.SUITE_VERSION == 3
    assert digest.hexdigest() == "d435a5f9e17a44b50462f21b98eb0bfef6021331c34bf68b4e02f720656f1989"


# ---------------------------------------------------------------- command line

def test_cli_writes_the_chosen_parts_and_rejects_unknown_ones(tmp_path, capsys, monkeypatch):
    # the command line writes a part at its default sizes: make them tiny
    monkeypatch.setattr(suite_davis.davis_parameters, "__defaults__", (2, 1, 4, 0))
    monkeypatch.setattr(suite_davis.write_davis, "__defaults__", (2, 1, 4, 0, True, False))
    argv = ["--out", str(tmp_path), "--parts", "davis,classification", "--train-per-class", "1",
            "--val-per-class", "1", "--image-size", "16", "--no-progress"]
    assert run_cli(suite.main, argv) == 0
    assert run_cli(suite.main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "wrote classification suite", "wrote davis suite",
        "classification suite already up to date", "davis suite already up to date"]
    assert lines[1].startswith(f"wrote davis suite: {tmp_path / 'davis'} (2 val + 1 train sequences x 4 frames")
    assert sorted(os.listdir(tmp_path)) == ["classification", "davis"]

    assert run_cli(suite.main, ["--out", str(tmp_path), "--parts", "davis,videos"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: invalid --parts 'davis,videos': pass a comma-separated list of ")
    assert message.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["classification", "davis"]
