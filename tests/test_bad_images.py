"""Fuzz test of bad data: a seeded ImageFolder of good images in every mode beside bad files of every kind,
read by `data.imagefolder.ImageFolder` (one process and two loader workers) and by both training decode
paths of `pretrain.batch_augment.crop_pipeline`.

`write_fuzz_folder` is the generator; other tests (a short pretrain over bad data) reuse it.
"""

import contextlib
import io
import json
import os
import signal
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from common.errors import UserError, one_line_message
from data.imagefolder import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, ImageFolder, load_rgb, read_bad_log
from pretrain.augment import MultiCropAugmentation, sample_rng
from pretrain.batch_augment import crop_pipeline

FUZZ_MAX_PIXELS = 48 * 48  # the pixel limit to read a fuzz folder with: its good images are at most 40 x 40
CLASS_FOLDERS = ("c0", "c1", "c2")
SUB_FOLDERS = ("", "sub", "sub/deeper")


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, pixels: np.ndarray | None) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB): ``pixels`` big-endian samples, (H, W[, C]);
    None writes the header only, an image whose size is declared but whose data is missing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    data = b"" if pixels is None else chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row.tobytes() for row in pixels)))
    return b"\x89PNG\r\n\x1a\n" + header + data + chunk(b"IEND", b"")


def _encoded(image: PIL.Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _noise(rng, height: int, width: int, channels: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
    return rng.integers(0, high, (height, width, channels)).astype(dtype)


def _with_alpha(rng, height, width, mode) -> PIL.Image.Image:
    return PIL.Image.fromarray(_noise(rng, height, width, len(mode)), mode)


# kind -> (file extension, rng, height, width -> file bytes): every mode `data.imagefolder.to_rgb` handles
GOOD_KINDS = {
    "RGB JPEG": (".jpg", lambda rng, h, w: _encoded(PIL.Image.fromarray(_noise(rng, h, w, 3)), "JPEG")),
    "RGB PNG named .jpg": (".jpg", lambda rng, h, w: _encoded(PIL.Image.fromarray(_noise(rng, h, w, 3)), "PNG")),
    "RGB BMP": (".bmp", lambda rng, h, w: _encoded(PIL.Image.fromarray(_noise(rng, h, w, 3)), "BMP")),
    "RGB PPM": (".ppm", lambda rng, h, w: _encoded(PIL.Image.fromarray(_noise(rng, h, w, 3)), "PPM")),
    "RGB WEBP": (".webp", lambda rng, h, w: _encoded(PIL.Image.fromarray(_noise(rng, h, w, 3)), "WEBP")),
    "grayscale JPEG": (".jpeg", lambda rng, h, w: _encoded(PIL.Image.fromarray(_noise(rng, h, w, 1)[..., 0]), "JPEG")),
    "grayscale PGM": (".pgm", lambda rng, h, w: _encoded(PIL.Image.fromarray(_noise(rng, h, w, 1)[..., 0]), "PPM")),
    "1-bit PNG": (".png", lambda rng, h, w: _encoded(PIL.Image.fromarray(_noise(rng, h, w, 1, bool, 2)[..., 0]),
                                                      "PNG")),
    "palette PNG": (".png", lambda rng, h, w: _encoded(PIL.Image.fromarray(_noise(rng, h, w, 3)).quantize(8), "PNG")),
    "palette PNG + transparency": (".png", lambda rng, h, w: _encoded(
        PIL.Image.fromarray(_noise(rng, h, w, 3)).quantize(8), "PNG", transparency=0)),
    "grayscale + alpha PNG": (".png", lambda rng, h, w: _encoded(_with_alpha(rng, h, w, "LA"), "PNG")),
    "RGBA PNG": (".png", lambda rng, h, w: _encoded(_with_alpha(rng, h, w, "RGBA"), "PNG")),
    "RGBA WEBP": (".webp", lambda rng, h, w: _encoded(_with_alpha(rng, h, w, "RGBA"), "WEBP", lossless=True)),
    "CMYK JPEG": (".jpg", lambda rng, h, w: _encoded(_with_alpha(rng, h, w, "CMYK"), "JPEG")),
    "CMYK TIFF": (".tiff", lambda rng, h, w: _encoded(_with_alpha(rng, h, w, "CMYK"), "TIFF")),
    "16-bit grayscale PNG": (".png", lambda rng, h, w: _encoded(
        PIL.Image.fromarray(_noise(rng, h, w, 1, np.uint16, 65536)[..., 0]), "PNG")),
    "16-bit grayscale TIFF": (".tif", lambda rng, h, w: _encoded(
        PIL.Image.fromarray(_noise(rng, h, w, 1, np.uint16, 65536)[..., 0]), "TIFF")),
    "16-bit PGM": (".pgm", lambda rng, h, w: f"P5\n{w} {h}\n65535\n".encode()
                   + _noise(rng, h, w, 1, ">u2", 65536).tobytes()),
    "16-bit RGB PNG": (".png", lambda rng, h, w: png_bytes(w, h, 16, 2, _noise(rng, h, w, 3, ">u2", 65536))),
    "float TIFF": (".tif", lambda rng, h, w: _encoded(
        PIL.Image.fromarray(rng.random((h, w), dtype=np.float32)), "TIFF")),
}


def _jpeg(rng) -> bytes:
    return GOOD_KINDS["RGB JPEG"][1](rng, 24, 24)


NOT_AN_IMAGE = "not a JPEG/PNG/PPM/BMP/TIFF/WEBP/GIF file"
# kind -> (file extension, rng -> file bytes, its reason in the bad-image log): listed, but do not decode
BAD_KINDS = {
    "truncated JPEG": (".jpg", lambda rng: _jpeg(rng)[:300], "Truncated File Read"),
    "truncated PNG": (".png", lambda rng: _encoded(PIL.Image.fromarray(_noise(rng, 24, 24, 3)), "PNG")[:600],
                      "image file is truncated"),
    "text named .png": (".png", lambda rng: b"this is a text file, not a picture\n" * 4, NOT_AN_IMAGE),
    # a zero first byte: no image format's signature starts with it
    "random bytes named .jpeg": (".jpeg", lambda rng: b"\0" + _noise(rng, 1, int(rng.integers(1, 3000)), 1).tobytes(),
                                 NOT_AN_IMAGE),
    # the JPEG's start and JFIF segment, then bytes that are never a 0xFF marker
    "JPEG header then garbage": (".jpg", lambda rng: _jpeg(rng)[:20] + _noise(rng, 1, 500, 1, high=255).tobytes(),
                                 NOT_AN_IMAGE),
    "image over the pixel limit": (".png", lambda rng: _encoded(PIL.Image.fromarray(_noise(rng, 64, 64, 3)), "PNG"),
                                   f"4096 pixels, over the limit of {FUZZ_MAX_PIXELS}"),
    "40000 x 40000 PNG without pixel data": (".png", lambda rng: png_bytes(40000, 40000, 8, 2, None),
                                             f"1600000000 pixels, over the limit of {FUZZ_MAX_PIXELS}"),
}
# kind -> (how to make it at a path, its reason in dataset.skipped): image-named entries listing leaves out
LISTING_KINDS = {
    "zero-byte file": (lambda path: path.write_bytes(b""), "empty file, 0 bytes"),
    "dangling symbolic link": (lambda path: os.symlink("no-such-image.png", path),
                               "broken symbolic link to 'no-such-image.png'"),
    "symbolic link to itself": (lambda path: os.symlink(path.name, path), "Too many levels of symbolic links"),
    "FIFO with an image name": (os.mkfifo, "not a regular file"),  # opening it would block forever
}


def write_fuzz_folder(root, seed: int = 0, copies: int = 2) -> dict:
    """Write a seeded ImageFolder at ``root``: ``copies`` images of every `GOOD_KINDS` mode (random sizes
    8..40 px), one file of every `BAD_KINDS` and `LISTING_KINDS` kind, in random class folders
    (``c0``..``c2``, some nested), and a symbolic link looping back to its parent folder.

    Read it with ``max_pixels=FUZZ_MAX_PIXELS``. Returns ``{"root", "max_pixels", "good": {path: (kind,
    (width, height))}, "bad": {path: kind} (listed, do not decode), "skipped": {path: kind} (left out
    when listing), "repeated": {path: kind} (folders listed once)}``, paths as strings.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    written = {"root": str(root), "max_pixels": FUZZ_MAX_PIXELS, "good": {}, "bad": {}, "skipped": {}, "repeated": {}}
    jobs = [("good", kind) for kind in GOOD_KINDS for _ in range(copies)]
    jobs += [("bad", kind) for kind in BAD_KINDS] + [("skipped", kind) for kind in LISTING_KINDS]
    for number, job in enumerate(rng.permutation(len(jobs))):
        group, kind = jobs[job]
        folder = root / CLASS_FOLDERS[rng.integers(len(CLASS_FOLDERS))] / SUB_FOLDERS[rng.integers(len(SUB_FOLDERS))]
        folder.mkdir(parents=True, exist_ok=True)
        extension = (GOOD_KINDS.get(kind) or BAD_KINDS.get(kind) or (".jpg",))[0]
        path = folder / f"{number:03d}_{kind.replace(' ', '_').replace('.', '')}{extension}"
        if group == "good":
            width, height = (int(side) for side in rng.integers(8, 41, 2))
            path.write_bytes(GOOD_KINDS[kind][1](rng, height, width))
            written["good"][str(path)] = (kind, (width, height))
        elif group == "bad":
            path.write_bytes(BAD_KINDS[kind][1](rng))
            written["bad"][str(path)] = kind
        else:
            LISTING_KINDS[kind][0](path)
            written["skipped"][str(path)] = kind
    loop = root / CLASS_FOLDERS[0] / "sub" / "loop"
    loop.parent.mkdir(parents=True, exist_ok=True)
    os.symlink("..", loop)
    written["repeated"][str(loop)] = "symbolic link loop"
    return written


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail with TimeoutError instead of hanging (SIGALRM interrupts even a blocking open of a FIFO)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: reading bad data hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def substitute_index(dataset: ImageFolder, good: dict, index: int) -> int:
    """The index whose sample ``dataset[index]`` must return: the next good one, wrapping around."""
    while dataset.samples[index][0] not in good:
        index = (index + 1) % len(dataset)
    return index


def _as_arrays(batch: list) -> list:
    return [(np.asarray(image), label) for image, label in batch]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    return write_fuzz_folder(tmp_path_factory.mktemp("fuzz") / "data", seed=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_good_image_loads_and_every_bad_file_is_named_with_a_reason(tmp_path, seed):
    written = write_fuzz_folder(tmp_path / "data", seed)
    log = tmp_path / "bad.tsv"
    with deadline(60):
        dataset = ImageFolder(written["root"], skip_bad=True, bad_log=log, max_pixels=written["max_pixels"])
        items = [dataset[index] for index in range(len(dataset))]
    assert sorted(path for path, _ in dataset.samples) == sorted([*written["good"], *written["bad"]])
    assert dict(dataset.skipped) == {path: LISTING_KINDS[kind][1] for path, kind in written["skipped"].items()}
    assert [path for path, _ in dataset.repeated_folders] == list(written["repeated"])

    for index, (image, label) in enumerate(items):
        source = substitute_index(dataset, written["good"], index)
        path, source_label = dataset.samples[source]
        assert (image.mode, image.size, label) == ("RGB", written["good"][path][1], source_label)
        assert dataset.classes[label] == Path(path).relative_to(written["root"]).parts[0]
        if source != index:
            assert np.array_equal(np.asarray(image), np.asarray(items[source][0]))

    logged = read_bad_log(log)
    assert logged == {path: BAD_KINDS[kind][2] for path, kind in written["bad"].items()}
    assert len(log.read_text().splitlines()) == len(written["bad"])  # each bad file once
    assert dataset.bad_files() == {**logged, **dict(dataset.skipped)}
    with pytest.raises(UserError, match=f"^cannot read '{dataset.skipped[0][0]}' .*3 more such files"):
        ImageFolder(written["root"], max_pixels=written["max_pixels"])  # evaluation stops instead


def test_two_loader_workers_return_the_same_samples_and_log_the_same_files(fuzz, tmp_path):
    single = ImageFolder(fuzz["root"], skip_bad=True, max_pixels=fuzz["max_pixels"])
    expected = _as_arrays([single[index] for index in range(len(single))])
    log = tmp_path / "bad.tsv"
    dataset = ImageFolder(fuzz["root"], skip_bad=True, bad_log=log, max_pixels=fuzz["max_pixels"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2, collate_fn=_as_arrays, timeout=60)
    with deadline(120):
        got = [item for batch in loader for item in batch]
    assert len(got) == len(expected)
    assert all(np.array_equal(a, b) and la == lb for (a, la), (b, lb) in zip(got, expected))
    lines = log.read_text().splitlines()
    assert sorted(read_bad_log(log)) == sorted(fuzz["bad"]) == sorted(single.bad)
    assert all(1 <= sum(line.startswith(path + "\t") for line in lines) <= 2 for path in fuzz["bad"])


def test_both_training_decode_paths_read_the_fuzz_folder(fuzz):
    augmentation = MultiCropAugmentation(16, 8, n_local=2)
    base = ImageFolder(fuzz["root"], skip_bad=True, max_pixels=fuzz["max_pixels"])
    keys = [(1, index) for index in range(len(base))]
    crops = {}
    for where, workers in (("loader", 0), ("device", 2)):
        dataset, collate, crops_on = crop_pipeline(where, base, augmentation, seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=keys, num_workers=workers,
                                             collate_fn=collate, timeout=60 if workers else 0)
        with deadline(120):
            batches = [crops_on(batch, torch.device("cpu")) for batch in loader]
        crops[where] = [torch.cat(views) for views in zip(*batches)]
        assert [tuple(view.shape) for view in crops[where]] == [(len(base), 3, 16, 16)] * 2 + [(len(base), 3, 8, 8)] * 2
        assert all(torch.isfinite(view).all() for view in crops[where])
    for loader_view, device_view in zip(crops["loader"], crops["device"]):
        # the same images, drawn alike: about a level apart on these noise images (another image: ~1)
        assert (loader_view - device_view).abs().mean() < 0.05

    bad_index = next(i for i, (path, _) in enumerate(base.samples) if path in fuzz["bad"])
    source_path = base.samples[substitute_index(base, fuzz["good"], bad_index)][0]
    # a bad index's crops: the substitute's pixels, the bad index's own random draws
    expected = augmentation(load_rgb(source_path), sample_rng(3, 1, bad_index))
    assert all(torch.equal(view[bad_index], crop) for view, crop in zip(crops["loader"], expected))


def test_evaluation_stops_at_the_first_bad_file_even_inside_a_loader_worker(tmp_path):
    (tmp_path / "c" / "0.jpg").parent.mkdir()
    (tmp_path / "c" / "0.jpg").write_bytes(BAD_KINDS["truncated JPEG"][1](np.random.default_rng(0)))
    loader = torch.utils.data.DataLoader(ImageFolder(tmp_path), num_workers=1, collate_fn=_as_arrays)
    with pytest.raises(BadImageError) as error, deadline(60):
        next(iter(loader))
    message = one_line_message(error.value)
    assert message == f"cannot decode image '{tmp_path / 'c' / '0.jpg'}' (Truncated File Read): delete or replace it"


def test_the_pixel_limit_replaces_pils_bomb_check(tmp_path, monkeypatch):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_bytes(10_000, 9_000, 8, 2, None))  # 90 megapixels declared, nothing to decode
    small = tmp_path / "small.png"
    PIL.Image.new("RGB", (10, 10)).save(small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        with pytest.raises(BadImageError) as error:
            load_rgb(huge)
        assert error.value.reason == f"90000000 pixels, over the limit of {DEFAULT_MAX_IMAGE_PIXELS}"
        assert str(error.value).endswith(": resize it, delete it or raise --max-image-pixels")
        with pytest.raises(BadImageError, match="100 pixels, over the limit of 99"):
            load_rgb(small, max_pixels=99)
        monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10)  # PIL would refuse 10 x 10 outright
        assert load_rgb(small, max_pixels=100).size == (10, 10)
        assert load_rgb(small, max_pixels=None).size == (10, 10)
    assert PIL.Image.MAX_IMAGE_PIXELS == 10  # restored


def test_sixteen_bit_rgb_keeps_the_high_byte(tmp_path):
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes(2, 1, 16, 2, np.array([[[65535, 32768, 0], [257, 514, 65280]]], ">u2")))
    assert np.asarray(load_rgb(path)).tolist() == [[[255, 128, 0], [1, 2, 255]]]


def pretrain_over(folder: Path, out: Path, max_bad_fraction: float):
    from tiny_runs import tiny_cfg

    from pretrain.distributed import DistInfo
    from pretrain.trainer import Trainer
    cfg = tiny_cfg(folder, out, epochs=1, batch_size_per_gpu=4, num_workers=1, max_image_pixels=FUZZ_MAX_PIXELS,
                   max_bad_fraction=max_bad_fraction, saveckp_freq=0)
    return Trainer(cfg, DistInfo()).fit()


def test_short_pretrain_over_the_fuzz_folder_skips_and_names_the_bad_files(fuzz, tmp_path):
    out = tmp_path / "run"
    with deadline(240):
        summary = pretrain_over(fuzz["root"], out, max_bad_fraction=0.25)
    assert summary["iterations"] == (len(fuzz["good"]) + len(fuzz["bad"])) // 4  # bad files listed, substituted
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    named = {record["path"]: record["reason"] for record in records if record["kind"] == "bad_image"}
    # every file listing left out is named; every undecodable file the run met is named, with a reason
    assert set(map(str, fuzz["skipped"])) <= set(named)
    assert set(named) <= set(map(str, fuzz["skipped"])) | set(map(str, fuzz["bad"]))
    assert all(reason for reason in named.values())
    met = set(read_bad_log(out / "bad_images.tsv"))
    assert met and met <= set(map(str, fuzz["bad"])) and met <= set(named)
    steps = [record for record in records if record["kind"] == "step"]
    assert steps[-1]["bad_images"] == len(named)
    assert all(np.isfinite(step["loss"]) for step in steps)


def test_pretrain_stops_when_too_many_images_are_bad(fuzz, tmp_path, capsys):
    from common.errors import run_cli
    from pretrain import train
    out = tmp_path / "run"
    args = ["--preset", "demo", "--data", str(fuzz["root"]), "--output-dir", str(out), "--epochs", "1",
            "--batch-size-per-gpu", "4", "--num-workers", "0", "--log-every-steps", "1",
            "--max-image-pixels", str(FUZZ_MAX_PIXELS), "--max-bad-fraction", "0.1"]
    assert run_cli(train.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "more than --max-bad-fraction 0.1" in err and "raise --max-bad-fraction" in err
