"""Decoding on the training device (`pretrain.device_decode`): the workers read bytes, the device decodes.

On the CPU the device decode is libjpeg-turbo through torchvision, which gives
PIL's pixels bit for bit, so the whole pipeline must equal the one where the
workers decode, batch for batch, including a bad file found only at decode time.
"""
from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.functional as TF

from common.errors import UserError
from data.imagefolder import BadImageError, ImageFolder, load_rgb, read_bad_log, read_encoded
from pretrain.augment import DecodedCropDataset, MultiCropAugmentation, collate_decoded
from pretrain.batch_augment import BatchMultiCrop, crop_pipeline, resolve_pipeline
from pretrain.device_decode import DecodeThenCrop, EncodedCropDataset, collate_encoded, decode_jpegs
from pretrain.distributed import DistInfo
from pretrain.sampler import ShardedSampler
from pretrain.trainer import Trainer
from tests.tiny_runs import tiny_cfg


def picture(width: int, height: int, seed: int) -> PIL.Image.Image:
    """Smooth gradients plus noise: JPEG-compressible but not flat."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    colour = rng.random(3)[None, None, :]
    pixels = 255 * (0.6 * (x * colour + y * (1 - colour)) + 0.4 * rng.random((height, width, 3)))
    return PIL.Image.fromarray(pixels.astype(np.uint8))


def jpeg_bytes(image: PIL.Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """One class of 12 files: RGB JPEGs (4:2:0, 4:4:4, progressive), grayscale JPEGs,
    a CMYK JPEG, PNGs, and one JPEG whose body is cut off (its header is intact)."""
    root = tmp_path_factory.mktemp("mixed") / "images" / "all"
    root.mkdir(parents=True)
    sizes = [(61, 45), (40, 64), (50, 50), (72, 38), (33, 57), (64, 48), (45, 61), (58, 40), (48, 48),
             (70, 52), (36, 36), (66, 44)]
    for i, (w, h) in enumerate(sizes):
        image = picture(w, h, i)
        kind = i % 6
        if kind == 0:
            (root / f"{i:02d}.jpg").write_bytes(jpeg_bytes(image))
        elif kind == 1:
            (root / f"{i:02d}.jpg").write_bytes(jpeg_bytes(image, subsampling=0, progressive=True))
        elif kind == 2:
            (root / f"{i:02d}.jpg").write_bytes(jpeg_bytes(image.convert("L")))
        elif kind == 3:
            (root / f"{i:02d}.jpg").write_bytes(jpeg_bytes(image.convert("CMYK")))
        elif kind == 4:
            image.save(root / f"{i:02d}.png")
        else:
            (root / f"{i:02d}.jpg").write_bytes(jpeg_bytes(image, subsampling=2))
    whole = jpeg_bytes(picture(52, 44, 99))
    (root / "05.jpg").write_bytes(whole[: len(whole) // 2])  # replaces a 4:2:0 JPEG: truncated body
    return root.parent


# ---------------------------------------------------------------- reading
def test_read_encoded_ships_bytes_only_for_rgb_and_gray_jpegs(mixed_folder):
    for path in sorted((mixed_folder / "all").iterdir()):
        if path.name == "05.jpg":
            continue
        encoded = read_encoded(path)
        expected = TF.pil_to_tensor(load_rgb(path))
        assert (encoded.height, encoded.width) == tuple(expected.shape[1:])
        with PIL.Image.open(path) as image:
            assert encoded.is_jpeg == (image.format == "JPEG" and image.mode in ("RGB", "L"))
        if encoded.is_jpeg:
            assert encoded.data.dim() == 1 and bytes(encoded.data.numpy()) == path.read_bytes()
            pixels = decode_jpegs([encoded.data], torch.device("cpu"))[0]
        else:
            pixels = encoded.data
        assert torch.equal(pixels, expected), path.name  # libjpeg-turbo here == PIL's, bit for bit


def test_read_encoded_refuses_what_load_rgb_refuses(mixed_folder, tmp_path):
    big = mixed_folder / "all" / "00.jpg"
    with pytest.raises(BadImageError, match="too large an image"):
        read_encoded(big, max_pixels=100)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match="not a JPEG"):
        read_encoded(junk)
    truncated = read_encoded(mixed_folder / "all" / "05.jpg")  # header fine: found where it is decoded
    assert truncated.is_jpeg and decode_jpegs([truncated.data], torch.device("cpu")) == [None]


def test_decode_jpegs_marks_only_the_failing_file(mixed_folder):
    paths = [mixed_folder / "all" / name for name in ("00.jpg", "05.jpg", "06.jpg")]
    data = [read_encoded(path).data for path in paths]
    decoded = decode_jpegs(data, torch.device("cpu"))
    assert decoded[1] is None
    assert torch.equal(decoded[0], TF.pil_to_tensor(load_rgb(paths[0])))
    assert torch.equal(decoded[2], TF.pil_to_tensor(load_rgb(paths[2])))
    assert decode_jpegs([], torch.device("cpu")) == []


# ---------------------------------------------------------------- the pipeline
def loader_batches(dataset, collate, workers: int, epoch: int = 2, batch: int = 4):
    sampler = ShardedSampler(len(dataset), seed=5)
    sampler.set_epoch(epoch)
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                            collate_fn=collate))


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decode_equals_worker_decode(mixed_folder, tmp_path, workers):
    """Whole batches of crops are equal, the truncated JPEG (found bad only in this process)
    included: it is replaced as the workers replace a bad file, and logged."""
    augmentation = MultiCropAugmentation(32, 16, n_local=3)
    crop = BatchMultiCrop.like(augmentation)
    reference = DecodedCropDataset(ImageFolder(mixed_folder, skip_bad=True, bad_log=tmp_path / "a.tsv"),
                                   augmentation, seed=5)
    expected = [crop(batch.padded(), batch.params) for batch in loader_batches(reference, collate_decoded, 0)]

    base = ImageFolder(mixed_folder, skip_bad=True, bad_log=tmp_path / "b.tsv")
    encoded = EncodedCropDataset(base, augmentation, seed=5)
    decode = DecodeThenCrop(encoded, crop)
    batches = loader_batches(encoded, collate_encoded, workers)
    assert sum(int(batch.is_jpeg.sum()) for batch in batches) == 8  # 6 RGB, 2 gray JPEGs (truncated included)
    assert sum(len(batch.pixels) for batch in batches) == 4  # CMYK JPEGs and PNGs: decoded by the workers
    for batch in batches:
        assert batch.jpeg_ends[-1] == len(batch.jpeg_bytes)
    for batch, want in zip(batches, expected, strict=True):
        got = decode(batch, torch.device("cpu"))
        assert len(got) == len(want) == 5
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    truncated = str(mixed_folder / "all" / "05.jpg")
    assert list(read_bad_log(tmp_path / "b.tsv")) == [truncated] and truncated in base.bad
    assert list(read_bad_log(tmp_path / "a.tsv")) == [truncated]


def test_device_decode_without_skip_bad_raises_one_line(mixed_folder):
    augmentation = MultiCropAugmentation(32, 16, n_local=1)
    encoded = EncodedCropDataset(ImageFolder(mixed_folder), augmentation)
    batch = collate_encoded([encoded[(0, 5)]])
    with pytest.raises(BadImageError, match="05.jpg"):
        DecodeThenCrop(encoded, BatchMultiCrop.like(augmentation))(batch, torch.device("cpu"))


def test_images_as_collate_decoded_gives_them(mixed_folder):
    augmentation = MultiCropAugmentation(32, 16, n_local=1)
    keys = [(0, i) for i in (0, 1, 2, 3, 4)]
    encoded = EncodedCropDataset(ImageFolder(mixed_folder), augmentation)
    images, params = DecodeThenCrop(encoded, None).images(collate_encoded([encoded[k] for k in keys]),
                                                         torch.device("cpu"))
    want = collate_decoded([DecodedCropDataset(ImageFolder(mixed_folder), augmentation)[k] for k in keys])
    assert all(torch.equal(a, b) for a, b in zip(images, want.images(), strict=True))
    assert all(torch.equal(params[name], want.params[name]) for name in params)


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("augment_on, decode_on, device, expected", [
    ("auto", "auto", "cpu", ("loader", "loader")),
    ("auto", "auto", "cuda", ("device", "device")),
    ("device", "auto", "cpu", ("device", "loader")),
    ("device", "auto", "cuda", ("device", "device")),
    ("auto", "loader", "cuda", ("device", "loader")),
    ("auto", "device", "cpu", ("device", "device")),
    ("loader", "auto", "cuda", ("loader", "loader")),
    ("device", "device", "cpu", ("device", "device")),
])
def test_resolve_pipeline(augment_on, decode_on, device, expected):
    assert resolve_pipeline(augment_on, decode_on, torch.device(device)) == expected


def test_resolve_pipeline_errors():
    with pytest.raises(UserError, match="unknown --augment-on 'gpu'"):
        resolve_pipeline("gpu", "auto", torch.device("cpu"))
    with pytest.raises(UserError, match="unknown --decode-on 'nvjpeg'"):
        resolve_pipeline("auto", "nvjpeg", torch.device("cpu"))
    with pytest.raises(UserError, match="--decode-on device needs --augment-on device"):
        resolve_pipeline("loader", "device", torch.device("cuda"))


def test_crop_pipeline_kinds(mixed_folder):
    augmentation = MultiCropAugmentation(32, 16, n_local=1)
    base = ImageFolder(mixed_folder)
    assert type(crop_pipeline("loader", base, augmentation, 0)[0]).__name__ == "MultiCropDataset"
    assert type(crop_pipeline("device", base, augmentation, 0)[0]).__name__ == "DecodedCropDataset"
    dataset, collate, crops_on = crop_pipeline("device", base, augmentation, 0, "device")
    assert isinstance(dataset, EncodedCropDataset) and collate is collate_encoded
    assert isinstance(crops_on, DecodeThenCrop)


def test_trainer_with_device_decode_equals_worker_decode(mixed_folder, tmp_path):
    """Two steps of training (workers read bytes vs workers decode) give the same weights."""
    states = {}
    for decode_on in ("loader", "device"):
        cfg = tiny_cfg(mixed_folder, tmp_path / decode_on, augment_on="device", decode_on=decode_on,
                       batch_size_per_gpu=4, epochs=1, max_steps=2, saveckp_freq=0,
                       max_bad_fraction=0.5)
        trainer = Trainer(cfg, DistInfo())
        assert (trainer.augment_on, trainer.decode_on) == ("device", decode_on)
        trainer.fit()
        states[decode_on] = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    for name, value in states["loader"].items():
        assert torch.equal(value, states["device"][name]), name


@pytest.mark.cuda
def test_nvjpeg_close_to_libjpeg_and_crops_close_on_the_gpu(mixed_folder):
    """nvJPEG's IDCT and chroma upsampling may differ from libjpeg's by a few levels; the crops made
    on the GPU from nvJPEG's pixels stay within the batched path's bounds of the CPU's."""
    paths = [path for path in sorted((mixed_folder / "all").iterdir()) if path.name != "05.jpg"]
    encoded = [read_encoded(path) for path in paths]
    jpegs = [image.data for image in encoded if image.is_jpeg]
    on_gpu = decode_jpegs(jpegs, torch.device("cuda"))
    on_cpu = decode_jpegs(jpegs, torch.device("cpu"))
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        diff = (gpu.cpu().int() - cpu.int()).abs()
        assert gpu.shape == cpu.shape and diff.float().mean() < 1.0 and diff.max() <= 16
    augmentation = MultiCropAugmentation(32, 16, n_local=3)
    dataset = EncodedCropDataset(ImageFolder(mixed_folder, skip_bad=True), augmentation, seed=1)
    batch = collate_encoded([dataset[(0, i)] for i in range(12) if i != 5])
    decode = DecodeThenCrop(dataset, BatchMultiCrop.like(augmentation))
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for gpu, cpu in zip(decode(batch, torch.device("cuda")), decode(batch, torch.device("cpu")), strict=True):
        diff = ((gpu.cpu() - cpu) * std * 255).abs()
        assert diff.mean() < 2.0 and diff.max() < 20.0
