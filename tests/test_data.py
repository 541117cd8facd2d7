"""Tests for data/: one-line user errors, the ImageFolder reader, the embedded suite generator."""

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import cifar10_sample
from PIL import Image

from common.errors import UserError, one_line_message, run_cli
from data import imagefolder, suite, suite_classification
from data.imagefolder import (
    IMAGE_EXTENSIONS,
    BadImageError,
    ImageFolder,
    check_bad_fraction,
    load_rgb,
    read_bad_log,
    split_root,
)


def _save_image(path: Path, colour=(10, 20, 30), size=(4, 4), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)
    return path


def _assert_one_line_naming(error: pytest.ExceptionInfo, path) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# ---------------------------------------------------------------- errors.run_cli

def test_run_cli_prints_one_line_and_returns_2_on_user_error(capsys):
    def main(argv):
        raise UserError("data directory 'x/y' does not exist: run 'make data'")

    assert run_cli(main, []) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: data directory 'x/y' does not exist: run 'make data'\n"


def test_run_cli_passes_through_return_values_and_interrupts(capsys):
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: 3, []) == 3
    assert run_cli(lambda argv: argv, 0) == 0  # argv reaches main unchanged

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_run_cli_lets_bugs_keep_their_traceback():
    def buggy(argv):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_cli(buggy)


def test_user_error_rewrapped_by_a_dataloader_worker_is_one_line_again():
    # torch's ExceptionWrapper.reraise re-creates the error with the worker's traceback as message.
    wrapped = UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                        "call last):\n  File \"x.py\", line 1, in f\ndata.errors.UserError: cannot decode "
                        "image 'a.jpg' (truncated): delete or replace it\n")
    assert one_line_message(wrapped) == "cannot decode image 'a.jpg' (truncated): delete or replace it"


# ---------------------------------------------------------------- ImageFolder

def test_imagefolder_sorted_classes_labels_and_sample_order(tmp_path):
    root = tmp_path / "tree"
    _save_image(root / "b" / "x.png")
    _save_image(root / "a" / "2.png")
    _save_image(root / "a" / "1.jpg")
    _save_image(root / "a" / "sub" / "0.PNG")  # recursive, case-insensitive extension
    _save_image(root / "c" / "deep" / "er" / "z.bmp")
    _save_image(root / ".hidden" / "h.png")  # hidden class folder: skipped
    _save_image(root / "a" / ".h.png")  # hidden file: skipped
    _save_image(root / "b" / ".cache" / "y.png")  # hidden sub-folder: skipped
    (root / "a" / "notes.txt").write_text("not an image")
    _save_image(root / "top.png")  # loose file beside the class folders: ignored

    dataset = ImageFolder(root)

    assert dataset.root == str(root)
    assert dataset.classes == ["a", "b", "c"]
    assert dataset.samples == [(str(root / "a" / "1.jpg"), 0), (str(root / "a" / "2.png"), 0),
                               (str(root / "a" / "sub" / "0.PNG"), 0), (str(root / "b" / "x.png"), 1),
                               (str(root / "c" / "deep" / "er" / "z.bmp"), 2)]
    assert dataset.targets == [0, 0, 0, 1, 2]
    assert len(dataset) == 5


def test_imagefolder_returns_rgb_images_and_applies_transform(tmp_path):
    _save_image(tmp_path / "cls0" / "grey.png", colour=(77,), size=(5, 3), mode="L")
    _save_image(tmp_path / "cls1" / "red.png", colour=(200, 0, 0), size=(2, 2))

    image, label = ImageFolder(tmp_path)[0]
    assert (image.mode, image.size, label) == ("RGB", (5, 3), 0)
    assert image.getpixel((0, 0)) == (77, 77, 77)

    sized = ImageFolder(tmp_path, transform=lambda img: (img.size, img.getpixel((1, 1))))
    assert sized[1] == (((2, 2), (200, 0, 0)), 1)


def test_imagefolder_flat_folder_is_one_class_only_when_allowed(tmp_path):
    root = tmp_path / "unlabelled"
    for name in ("b.jpg", "a.png"):
        _save_image(root / name)

    dataset = ImageFolder(root, allow_flat=True)
    assert dataset.classes == ["unlabelled"]
    assert dataset.samples == [(str(root / "a.png"), 0), (str(root / "b.jpg"), 0)]

    with pytest.raises(UserError) as error:
        ImageFolder(root)
    message = _assert_one_line_naming(error, root)
    assert "found 2 images but no class sub-folders" in message
    assert f"expected {root}/<class>/<image>" in message


def test_imagefolder_missing_directory(tmp_path):
    missing = tmp_path / "x" / "y"
    with pytest.raises(UserError) as error:
        ImageFolder(missing)
    assert "does not exist" in _assert_one_line_naming(error, missing)


def test_imagefolder_file_instead_of_directory(tmp_path):
    a_file = _save_image(tmp_path / "image.png")
    with pytest.raises(UserError) as error:
        ImageFolder(a_file)
    assert "is a file, not a directory" in _assert_one_line_naming(error, a_file)


@pytest.mark.parametrize("allow_flat", [False, True])
def test_imagefolder_empty_directory(tmp_path, allow_flat):
    with pytest.raises(UserError) as error:
        ImageFolder(tmp_path, allow_flat=allow_flat)
    assert f"expected {tmp_path}/<class>/<image>" in _assert_one_line_naming(error, tmp_path)


def test_imagefolder_class_folders_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    (tmp_path / "cat" / "photo.gif").write_bytes(b"GIF89a")
    (tmp_path / "dog").mkdir()
    with pytest.raises(UserError) as error:
        ImageFolder(tmp_path)
    message = _assert_one_line_naming(error, tmp_path)
    assert "no image files" in message
    assert all(extension in message for extension in IMAGE_EXTENSIONS)


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
    path = tmp_path / "cls" / "cut.jpg"
    path.parent.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])

    dataset = ImageFolder(tmp_path)  # listing does not decode; reading does
    with pytest.raises(UserError) as error:
        dataset[0]
    message = _assert_one_line_naming(error, path)
    assert "truncated" in message and "delete or replace it" in message


def test_garbage_file_with_image_extension_raises_naming_the_file(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not a JPEG" * 20)
    with pytest.raises(UserError) as error:
        load_rgb(path)
    assert "delete or replace it" in _assert_one_line_naming(error, path)


def test_split_root(tmp_path):
    for split in ("train", "val"):
        _save_image(tmp_path / split / "cls" / "0.png")
    assert split_root(tmp_path) == (str(tmp_path / "train"), str(tmp_path / "val"))

    no_val = tmp_path / "only_train"
    _save_image(no_val / "train" / "cls" / "0.png")
    with pytest.raises(UserError) as error:
        split_root(no_val)
    message = _assert_one_line_naming(error, no_val / "val")
    assert f"expected {no_val}/train/<class>/... and {no_val}/val/<class>/..." in message
    assert str(no_val / "train") + "'" not in message  # only the missing split is blamed

    with pytest.raises(UserError):
        split_root(tmp_path / "absent")


def test_reads_real_cifar10_sample():
    train_root, val_root = split_root(cifar10_sample())
    train, val = ImageFolder(train_root), ImageFolder(val_root)
    expected_classes = ["airplane", "automobile", "bird", "cat", "deer",
                        "dog", "frog", "horse", "ship", "truck"]
    assert train.classes == val.classes == expected_classes
    assert np.bincount(train.targets).tolist() == [20] * 10
    assert np.bincount(val.targets).tolist() == [10] * 10
    assert train.targets == sorted(train.targets)
    image, label = val[len(val) - 1]
    assert (image.mode, image.size, label) == ("RGB", (32, 32), expected_classes.index("truck"))


# ---------------------------------------------------------------- image modes

def _palette_image(pixels) -> Image.Image:
    image = Image.fromarray(np.array(pixels, dtype=np.uint8), "P")
    image.putpalette([0, 0, 0, 10, 200, 30])
    return image


def _two_halves(mode, left, right) -> Image.Image:
    """16 x 8: two 8 x 8 JPEG blocks of one colour each, so a lossy format keeps them nearly exact."""
    image = Image.new(mode, (16, 8), left)
    image.paste(right, (8, 0, 16, 8))
    return image


WHITE, GREY_128 = (255, 255, 255), (128, 128, 128)
# name -> (image, file name, save options, expected first-row pixels, tolerance)
MODE_CASES = {
    "1-bit": (Image.fromarray(np.array([[False, True]])), "a.png", {}, [(0, 0, 0), WHITE], 0),
    "grayscale": (Image.fromarray(np.array([[0, 77, 255]], np.uint8)), "a.png", {}, [(0,) * 3, (77,) * 3, WHITE], 0),
    "grayscale + transparent value": (Image.fromarray(np.array([[50, 60]], np.uint8)), "a.png",
                                      {"transparency": 50}, [WHITE, (60,) * 3], 0),
    "palette": (_palette_image([[0, 1]]), "a.png", {}, [(0, 0, 0), (10, 200, 30)], 0),
    "palette + transparent index": (_palette_image([[0, 1]]), "a.png", {"transparency": 1},
                                    [(0, 0, 0), WHITE], 0),
    "grayscale + alpha": (Image.fromarray(np.array([[[100, 255], [100, 0], [100, 128]]], np.uint8), "LA"),
                          "a.png", {}, [(100,) * 3, WHITE, (177,) * 3], 1),
    "RGBA": (Image.fromarray(np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [10, 20, 30, 128]]], np.uint8)),
             "a.png", {}, [(10, 20, 30), WHITE, (132, 137, 142)], 1),
    # PIL writes CMYK JPEGs the Adobe way (inverted, APP14 marker) and must undo it when reading
    "CMYK JPEG": (_two_halves("CMYK", (255, 0, 0, 0), (0, 0, 0, 128)), "a.jpg", {"quality": 100},
                  [(0, 255, 255)] * 8 + [(127, 127, 127)] * 8, 3),
    "CMYK TIFF": (_two_halves("CMYK", (255, 0, 0, 0), (0, 0, 0, 128)), "a.tif", {},
                  [(0, 255, 255)] * 8 + [(127, 127, 127)] * 8, 0),
    "16-bit PNG": (Image.fromarray(np.array([[0, 257, 32768, 65535]], np.uint16)), "a.png", {},
                   [(0,) * 3, (1,) * 3, GREY_128, WHITE], 0),
    "16-bit big-endian TIFF": (Image.fromarray(np.array([[0, 257, 32768, 65535]], ">u2")), "a.tif", {},
                               [(0,) * 3, (1,) * 3, GREY_128, WHITE], 0),
    "32-bit integer TIFF": (Image.fromarray(np.array([[0, 32768, 65535, 70000, -5]], np.int32)), "a.tif", {},
                            [(0,) * 3, GREY_128, WHITE, WHITE, (0,) * 3], 0),
    "float TIFF": (Image.fromarray(np.array([[0, 0.5, 1, 2, -1, np.nan]], np.float32)), "a.tif", {},
                   [(0,) * 3, GREY_128, WHITE, WHITE, (0,) * 3, (0,) * 3], 0),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_every_image_mode_becomes_the_right_rgb(tmp_path, case):
    image, name, options, expected, tolerance = MODE_CASES[case]
    path = tmp_path / name
    image.save(path, **options)
    loaded = load_rgb(path)
    assert (loaded.mode, loaded.size) == ("RGB", image.size)
    first_row = np.asarray(loaded)[0].astype(int)
    assert np.abs(first_row - np.array(expected)).max() <= tolerance, first_row.tolist()


def test_ordinary_images_decode_exactly_as_pil_converts_them(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for name, image in [("rgb.jpg", Image.fromarray(noise)), ("grey.png", Image.fromarray(noise[..., 0])),
                        ("palette.png", Image.fromarray(noise).quantize(16)), ("rgb.webp", Image.fromarray(noise))]:
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as reference:
            assert np.array_equal(np.asarray(load_rgb(tmp_path / name)), np.asarray(reference.convert("RGB")))


# ---------------------------------------------------------------- bad files

def test_listing_leaves_out_unreadable_files_and_lists_a_link_loop_once(tmp_path):
    root = tmp_path / "tree"
    _save_image(root / "a" / "good.png")
    _save_image(root / "a" / "sub" / "deep.png")
    _save_image(root / "b" / "ok.png")
    (root / "a" / "zero.jpg").write_bytes(b"")
    os.symlink("missing.png", root / "a" / "dangling.png")
    os.symlink("self.jpg", root / "a" / "self.jpg")
    os.mkfifo(root / "b" / "pipe.jpg")  # opening it would block forever
    os.symlink("..", root / "a" / "sub" / "loop")
    os.symlink(root / "a" / "sub", root / "a" / "again")  # a link sorting before the real folder

    dataset = ImageFolder(root, skip_bad=True)
    assert dataset.samples == [(str(root / "a" / "good.png"), 0), (str(root / "a" / "sub" / "deep.png"), 0),
                               (str(root / "b" / "ok.png"), 1)]
    assert dataset.skipped == [(str(root / "a" / "dangling.png"), "broken symbolic link to 'missing.png'"),
                               (str(root / "a" / "self.jpg"), "Too many levels of symbolic links"),
                               (str(root / "a" / "zero.jpg"), "empty file, 0 bytes"),
                               (str(root / "b" / "pipe.jpg"), "not a regular file")]
    assert dataset.repeated_folders == [(str(root / "a" / "sub" / "loop"), f"folder already listed as '{root / 'a'}'"),
                                        (str(root / "a" / "again"), f"folder already listed as '{root / 'a' / 'sub'}'")]
    assert dataset.bad_files() == dict(dataset.skipped)

    with pytest.raises(UserError) as error:  # evaluation: a left-out file is an error, a loop is not
        ImageFolder(root)
    message = _assert_one_line_naming(error, root / "a" / "dangling.png")
    assert "(3 more such files under" in message and "delete or replace it" in message
    for path in ("dangling.png", "self.jpg", "zero.jpg", "pipe.jpg"):
        os.remove(root / ("b" if path == "pipe.jpg" else "a") / path)
    assert len(ImageFolder(root)) == 3


def test_a_folder_that_cannot_be_listed_is_skipped(tmp_path, monkeypatch):
    _save_image(tmp_path / "a" / "1.png")
    _save_image(tmp_path / "a" / "locked" / "2.png")
    locked, scandir = str(tmp_path / "a" / "locked"), os.scandir

    def refuse_locked(path):  # tests run as root, where chmod 000 locks nothing
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)
    dataset = ImageFolder(tmp_path, skip_bad=True)
    assert [path for path, _ in dataset.samples] == [str(tmp_path / "a" / "1.png")]
    assert dataset.skipped == [(locked, "cannot list folder: [Errno 13] Permission denied")]
    with pytest.raises(UserError, match="Permission denied"):
        ImageFolder(tmp_path)


def _mixed_folder(root: Path) -> dict:
    """c0: red, text, truncated, blue; c1: text (the last index, whose substitute wraps to index 0)."""
    _save_image(root / "c0" / "0.png", colour=(200, 0, 0))
    (root / "c0" / "1.jpg").write_text("not an image")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    noise.save(root / "c0" / "2.jpg")
    (root / "c0" / "2.jpg").write_bytes((root / "c0" / "2.jpg").read_bytes()[:400])
    _save_image(root / "c0" / "3.png", colour=(0, 0, 200))
    (root / "c1" / "4.png").parent.mkdir()
    (root / "c1" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return {name: str(root / folder / name) for folder, name in [("c0", "1.jpg"), ("c0", "2.jpg"), ("c1", "4.png")]}


def test_skip_bad_substitutes_the_next_sample_that_decodes_and_logs_each_bad_file_once(tmp_path):
    bad = _mixed_folder(tmp_path / "data")
    log = tmp_path / "bad.tsv"
    dataset = ImageFolder(tmp_path / "data", transform=lambda image: image.getpixel((0, 0)), skip_bad=True, bad_log=log)
    expected = [((200, 0, 0), 0), ((0, 0, 200), 0), ((0, 0, 200), 0), ((0, 0, 200), 0), ((200, 0, 0), 0)]
    assert [dataset[i] for i in range(5)] == expected
    assert [dataset[i] for i in reversed(range(5))] == expected[::-1]  # the same in any order

    logged = read_bad_log(log)
    assert sorted(logged) == sorted(bad.values()) and dataset.bad == logged
    assert logged[bad["1.jpg"]] == "not a JPEG/PNG/PPM/BMP/TIFF/WEBP/GIF file"
    assert logged[bad["2.jpg"]] == "Truncated File Read" and logged[bad["4.png"]] == logged[bad["1.jpg"]]
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and all(line.count("\t") == 1 for line in lines)  # once, despite two passes

    again = ImageFolder(tmp_path / "data", skip_bad=True, bad_log=log)  # another process, same log
    assert again[2][0].getpixel((0, 0)) == (0, 0, 200)
    assert len(log.read_text().splitlines()) == 4 and read_bad_log(log) == logged  # 2.jpg twice
    assert again.bad_files() == logged and again.bad == {bad["2.jpg"]: logged[bad["2.jpg"]]}


def test_skip_bad_gives_up_on_a_long_run_of_bad_files(tmp_path, monkeypatch):
    bad = _mixed_folder(tmp_path)
    monkeypatch.setattr(imagefolder, "MAX_SUBSTITUTE_ATTEMPTS", 2)
    dataset = ImageFolder(tmp_path, skip_bad=True)
    with pytest.raises(UserError) as error:
        dataset[1]
    message = _assert_one_line_naming(error, bad["1.jpg"])
    assert "nor the 1 files after it" in message and "the data is damaged" in message
    assert dataset[2][0].getpixel((0, 0)) == (0, 0, 200)  # 2.jpg is known bad now: 3.png is one step away


def test_without_skip_bad_a_bad_file_stops_with_one_line(tmp_path):
    bad = _mixed_folder(tmp_path)
    dataset = ImageFolder(tmp_path)
    assert dataset[0][0].getpixel((0, 0)) == (200, 0, 0)
    with pytest.raises(BadImageError) as error:
        dataset[1]
    assert "cannot decode image" in _assert_one_line_naming(error, bad["1.jpg"])
    assert error.value.path == bad["1.jpg"] and error.value.reason in str(error.value)


def _append_many(log, worker):
    for line in range(200):
        imagefolder._append_bad_log(log, f"/data/{worker}/{'x' * 5000}/{line}.jpg", f"reason\tof {worker} {line}")


def test_bad_log_lines_of_several_processes_never_mix(tmp_path):
    log = str(tmp_path / "bad.tsv")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(log, worker)) for worker in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    lines = Path(log).read_text().splitlines()
    expected = {f"/data/{w}/{'x' * 5000}/{i}.jpg\treason of {w} {i}" for w in range(4) for i in range(200)}
    assert len(lines) == 800 and set(lines) == expected  # whole lines; tabs in a reason become spaces
    assert len(read_bad_log(log)) == 800 and read_bad_log(tmp_path / "absent.tsv") == {}


def test_check_bad_fraction():
    check_bad_fraction(1, 100, 0.01, ["a.jpg"])
    check_bad_fraction(0, 0, 0.0, [])
    with pytest.raises(UserError) as error:
        check_bad_fraction(5, 100, 0.01, [f"{i}.jpg" for i in range(5)])
    assert str(error.value) == ("5 of 100 images (5.00%) are unreadable, more than --max-bad-fraction 0.01: "
                                "'0.jpg', '1.jpg', '2.jpg' and 2 more; delete or replace them, "
                                "or raise --max-bad-fraction")


# ---------------------------------------------------------------- embedded suite

def _files_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated_suite(tmp_path_factory):
    """A 50-per-class train / 20-per-class val suite at 32 px, written once for several tests."""
    root = tmp_path_factory.mktemp("suite")
    parameters = suite_classification.write_classification(root, n_train_per_class=50, n_val_per_class=20,
                                                           progress=False)
    return root, parameters


def test_suite_layout_counts_and_manifest(generated_suite):
    root, parameters = generated_suite
    assert sorted(os.listdir(root)) == ["classification"]  # no temp folder left behind
    folder = root / "classification"
    assert json.loads((folder / "SUITE.json").read_text()) == parameters
    class_names = suite_classification.CLASS_NAMES
    assert parameters["class_names"] == list(class_names) and len(class_names) == 10
    assert (parameters["seed"], parameters["image_size"], parameters["num_images"]) == (0, 32, 700)

    train_root, val_root = split_root(folder)
    train, val = ImageFolder(train_root), ImageFolder(val_root)
    assert train.classes == val.classes == sorted(suite_classification.CLASS_NAMES)
    assert np.bincount(train.targets).tolist() == [50] * 10
    assert np.bincount(val.targets).tolist() == [20] * 10
    assert os.path.basename(train.samples[0][0]) == "0000.png"
    image, _ = val[0]
    assert (image.mode, image.size) == ("RGB", (32, 32))


def test_suite_classes_are_not_separable_by_mean_colour(generated_suite):
    folder = generated_suite[0] / "classification"

    def mean_colours(split):
        dataset = ImageFolder(folder / split)
        colours = np.array([np.asarray(image, dtype=np.float64).mean(axis=(0, 1)) for image, _ in dataset])
        return colours, np.array(dataset.targets)

    train_colours, train_labels = mean_colours("train")
    val_colours, val_labels = mean_colours("val")
    centroids = np.stack([train_colours[train_labels == c].mean(axis=0) for c in range(10)])
    distances = ((val_colours[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = (distances.argmin(axis=1) == val_labels).mean()
    assert accuracy < 0.30


def test_suite_is_deterministic_per_seed(tmp_path):
    small = dict(n_train_per_class=2, n_val_per_class=1, image_size=16, progress=False)
    suite_classification.write_classification(tmp_path / "a", seed=0, **small)
    suite_classification.write_classification(tmp_path / "b", seed=0, **small)
    suite_classification.write_classification(tmp_path / "c", seed=1, **small)
    first, again, other = (_files_bytes(tmp_path / name / "classification") for name in "abc")

    assert len(first) == 10 * 3 + 1
    assert first == again
    assert first.keys() == other.keys()
    different = [name for name in first if name != "SUITE.json" and first[name] != other[name]]
    assert len(different) == 30


def test_suite_images_of_one_class_differ_and_object_stays_inside():
    render, image_rng = suite_classification.render_object_image, suite_classification.image_rng
    images, masks = zip(*(render(image_rng(0, "train", 3, i), 3, 32) for i in range(8)))
    pixels = [np.asarray(image) for image in images]
    assert all(not np.array_equal(pixels[0], other) for other in pixels[1:])
    mean_colours = np.array([p.reshape(-1, 3).mean(axis=0) for p in pixels])
    assert mean_colours.std(axis=0).min() > 10  # colours vary, not just noise
    centres = np.array([np.argwhere(mask > 127).mean(axis=0) for mask in masks])
    assert centres.std(axis=0).min() > 0.5  # positions vary
    for mask in masks:
        assert mask.max() == 255
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert border.max() < 64  # the object is drawn inside a 1-px margin


def test_suite_object_contrasts_with_background():
    luminance = np.array([0.299, 0.587, 0.114])
    for index in range(30):
        rng = suite_classification.image_rng(5, "val", index % 10, index)
        image, mask = suite_classification.render_object_image(rng, index % 10, 32)
        brightness = np.asarray(image, dtype=np.float64) @ luminance
        # the object's first tone (its sampled colour) keeps the contrast; the
        # texture's second tone may sit closer to the background
        background = brightness[mask == 0].mean()
        inside = brightness[mask == 255]
        gap = max(abs(np.percentile(inside, 90) - background), abs(np.percentile(inside, 10) - background))
        assert gap > 50


def test_suite_skips_when_manifest_matches_and_regenerates_otherwise(tmp_path):
    small = dict(n_train_per_class=1, n_val_per_class=1, image_size=16, progress=False)
    suite_classification.write_classification(tmp_path, **small)
    marker = tmp_path / "classification" / "marker"
    marker.write_text("left by the test")

    assert suite_classification.write_classification(tmp_path, **small)["n_train_per_class"] == 1
    assert marker.exists()  # identical SUITE.json: nothing rewritten
    suite_classification.write_classification(tmp_path, force=True, **small)
    assert not marker.exists()
    marker.write_text("again")
    suite_classification.write_classification(tmp_path, **dict(small, n_train_per_class=2))
    assert not marker.exists()
    assert len(list((tmp_path / "classification" / "train" / "circle").iterdir())) == 2
    assert sorted(os.listdir(tmp_path)) == ["classification"]


def test_interrupted_generation_keeps_previous_suite_and_no_temp_folder(tmp_path, monkeypatch):
    small = dict(n_train_per_class=1, n_val_per_class=1, image_size=16, progress=False)
    suite_classification.write_classification(tmp_path, **small)
    before = _files_bytes(tmp_path / "classification")
    render = suite_classification.render_object_image
    calls = []

    def interrupt_after_three(*args):
        calls.append(args)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return render(*args)

    monkeypatch.setattr(suite_classification, "render_object_image", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        suite_classification.write_classification(tmp_path, force=True, **small)
    assert sorted(os.listdir(tmp_path)) == ["classification"]
    assert _files_bytes(tmp_path / "classification") == before


def test_suite_cli_summary_and_bad_arguments(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--parts", "classification", "--train-per-class", "1",
            "--val-per-class", "1", "--image-size", "16", "--no-progress"]
    assert run_cli(suite.main, argv) == 0
    assert run_cli(suite.main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"wrote classification suite: {tmp_path / 'classification'} (20 images")
    assert lines[1].startswith("classification suite already up to date")

    assert run_cli(suite.main, ["--out", str(tmp_path), "--image-size", "8"]) == 2
    assert capsys.readouterr().err == "error: invalid --image-size 8: pass an integer >= 16\n"
