"""Decode on the training device: the loader workers only read file bytes.

The batched multi-crop (`pretrain.batch_augment`) takes decoded uint8
images. With ``--decode-on device`` the workers do not decode JPEGs either:
each sample is an `EncodedImage` (the file's bytes plus the size from its
header, which is all the crop draws need), and the training process decodes
the batch where it trains, with ``torchvision.io.decode_jpeg`` (nvJPEG, batched,
on CUDA; libjpeg-turbo on the CPU, which gives PIL's pixels bit for bit).
Files that are not a JPEG in RGB or L (PNG, CMYK JPEG, ...) are decoded by PIL
in the workers as before (`data.imagefolder.read_encoded`).

A JPEG whose body fails to decode on the device (only its header was read
in the worker) is decoded by PIL in this process; if PIL fails too, the file
is bad: it is logged (`ImageFolder.note_bad`) and the sample is made again
exactly as the workers make a bad file's (the next index's image, the crops
drawn from the original index's generator), so a batch is the same whichever
process found the file bad. Sample keys ride along in the batch for that.

Shapes: a batch of B files becomes B uint8 images (3, h_i, w_i) on the device,
with their crops' `pack_params`, which `BatchMultiCrop.crop_images` crops.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision.transforms.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg

from data.imagefolder import BadImageError, EncodedImage, ImageFolder, load_rgb

from .augment import CropParams, DecodedCropDataset, MultiCropAugmentation, pack_params, sample_rng


class EncodedSample(NamedTuple):
    image: EncodedImage
    params: list[CropParams]
    key: tuple[int, int]  # (epoch, index)


class EncodedBatch(NamedTuple):
    """B samples, J of them JPEGs: ``jpeg_bytes`` their files one after the other
    (1-D uint8; one tensor, so a batch crosses from a worker in one shared-memory
    block, not one per file), ``jpeg_ends`` (J,) int64 where each file ends in it;
    ``pixels`` the other B - J samples' decoded pixels, uint8 (3, h, w), in batch
    order; ``is_jpeg`` (B,) bool; ``sizes`` (B, 2) int64 (height, width);
    ``keys`` (B, 2) int64 (epoch, index); ``paths`` the files read; ``params``
    `pack_params` of the crops."""
    jpeg_bytes: torch.Tensor
    jpeg_ends: torch.Tensor
    pixels: list[torch.Tensor]
    is_jpeg: torch.Tensor
    sizes: torch.Tensor
    keys: torch.Tensor
    paths: list[str]
    params: dict[str, torch.Tensor]


class EncodedCropDataset(DecodedCropDataset):
    """``dataset[(epoch, index)]`` -> `EncodedSample`: the file read (not decoded
    when it is a JPEG) and its crops' `CropParams`, drawn exactly as
    `DecodedCropDataset` draws them (same generator, same image size)."""

    def __init__(self, base: ImageFolder, augmentation: MultiCropAugmentation, seed: int = 0):
        if not hasattr(base, "encoded"):
            raise TypeError(f"decoding on the device needs an ImageFolder-like dataset with encoded(), "
                            f"not {type(base).__name__}")
        super().__init__(base, augmentation, seed)

    def __getitem__(self, key: tuple[int, int]) -> EncodedSample:
        epoch, index = key
        image, _ = self.base.encoded(index)
        params = self.augmentation.draw(image.width, image.height, sample_rng(self.seed, epoch, index))
        return EncodedSample(image, params, (epoch, index))

    # ``decoded(key)``: what the workers' decoding path gives for ``key`` (uint8 (3, H, W), its crops' params)
    decoded = DecodedCropDataset.__getitem__


def collate_encoded(samples: list[EncodedSample]) -> EncodedBatch:
    """Concatenate the JPEG files, stack the rest."""
    jpegs = [s.image.data for s in samples if s.image.is_jpeg]
    ends = torch.tensor([len(data) for data in jpegs], dtype=torch.int64).cumsum(0)
    return EncodedBatch(torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8), ends,
                        [s.image.data for s in samples if not s.image.is_jpeg],
                        torch.tensor([s.image.is_jpeg for s in samples], dtype=torch.bool),
                        torch.tensor([[s.image.height, s.image.width] for s in samples], dtype=torch.int64),
                        torch.tensor([s.key for s in samples], dtype=torch.int64),
                        [s.image.path for s in samples], pack_params([s.params for s in samples]))


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG's RGB pixels, uint8 (3, h, w) on ``device`` (one batched decode), or
    None where that file fails to decode there (found by decoding one at a time
    when the batched call fails)."""
    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        pass
    decoded: list[torch.Tensor | None] = []
    for item in data:
        try:
            decoded.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            decoded.append(None)
    return decoded


class DecodeThenCrop:
    """``(EncodedBatch, device)`` -> the crops, list of float (B, 3, S, S) on the device:
    decode there (`decode_jpegs`), then ``crop.crop_images(images, params)`` (``crop`` a
    `pretrain.batch_augment.BatchMultiCrop`)."""

    def __init__(self, dataset: EncodedCropDataset, crop):
        self.dataset, self.crop = dataset, crop

    def images(self, batch: EncodedBatch, device: torch.device) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The batch decoded: B uint8 images (3, h_i, w_i) on ``device`` and the crops' params (those
        of a sample made again, see the module doc, replaced)."""
        starts = [0] + batch.jpeg_ends.tolist()
        files = [batch.jpeg_bytes[start:end] for start, end in zip(starts, starts[1:])]
        from_device, others = iter(decode_jpegs(files, device)), iter(batch.pixels)
        decoded: list[torch.Tensor | None] = []
        for is_jpeg, size in zip(batch.is_jpeg.tolist(), batch.sizes.tolist()):
            pixels = next(from_device) if is_jpeg else next(others)
            decoded.append(pixels if pixels is not None and list(pixels.shape[1:]) == size else None)
        params = batch.params
        for i, pixels in enumerate(decoded):
            if pixels is None:
                decoded[i], params = self.remake(batch, i, params)
        return [pixels.to(device, non_blocking=True) for pixels in decoded], params

    def remake(self, batch: EncodedBatch, i: int, params: dict[str, torch.Tensor]):
        """Sample ``i``, whose JPEG body did not decode on the device: PIL's pixels of the same file
        (same size, same params), or, when PIL fails too, the sample the workers make of a bad file."""
        path = batch.paths[i]
        base = self.dataset.base
        try:
            return TF.pil_to_tensor(load_rgb(path, base.max_pixels)), params
        except BadImageError as error:
            if not base.skip_bad:
                raise
            base.note_bad(path, error.reason)
        epoch, index = batch.keys[i].tolist()
        pixels, crop_params = self.dataset.decoded((epoch, index))
        single = pack_params([crop_params])
        params = {name: value.clone() for name, value in params.items()}
        for name, value in single.items():
            params[name][:, i] = value[:, 0]
        return pixels, params

    def __call__(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
        images, params = self.images(batch, device)
        return self.crop.crop_images(images, params)
