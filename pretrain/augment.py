"""DINO multi-crop augmentation (docs/protocols.md, "Multi-crop augmentation"), deterministic per sample.

Per source image: 2 global crops (scale ``global_scale``, default (0.4, 1))
and ``n_local`` local crops (scale ``local_scale``, default (0.05, 0.4)),
each through

    RandomResizedCrop(ratio 3/4..4/3, bicubic) -> hflip p=.5
    -> ColorJitter(.4, .4, .2, .1) with p=.8 (the four in random order)
    -> grayscale p=.2 -> [invert] -> Gaussian blur (PIL radius ~ U(.1, 2))
    -> solarize (threshold 128) -> to tensor -> ImageNet normalisation

with blur probability 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals and
solarization 0.2 on the second global crop only. The inversion (x -> 255 - x,
each local crop with probability ``local_invert_p``) is not the paper's: it
is off by default, and its coin is only drawn when it is on, so the paper's
pipeline draws exactly the same numbers with or without this option.

Every random draw comes from a ``random.Random`` seeded by
(seed, epoch, image index), so an image's crops do not depend on the number
of processes, data-loader workers or batch position: a 2-process run sees
exactly the crops of a 1-process run, and a resumed run those of an
uninterrupted one.

Drawing and applying are separate: ``MultiCropAugmentation.draw`` makes all
of a crop's random choices (a `CropParams`), which two paths apply:
``apply_crop_params`` with PIL, one image at a time in the loader workers
(`MultiCropDataset`), or `pretrain.batch_augment.BatchMultiCrop` on a whole
batch on the training device, fed by `DecodedCropDataset` (decode and draw
only) and `collate_decoded`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from common.errors import UserError
from common.transforms import IMAGENET_MEAN, IMAGENET_STD


def random_resized_crop_box(rng: random.Random, width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering ``scale`` of the area with
    aspect ratio in ``ratio`` (log-uniform); 10 tries, then a centre crop with
    the ratio clamped — the torchvision rule."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
HUE_SPACES = ("hsv", "yiq")
# NTSC RGB -> YIQ (rows Y, I, Q). Y is the ITU-R 601 luma that grayscale uses.
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def rotate_hue_yiq(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Luma-preserving hue rotation of RGB ``x`` (N, 3, H, W) in [0, 1] by ``turns`` (N,).

    (Y, I, Q) = M x; the chroma (I, Q) turns by theta = 2 pi d:
    I' = I cos theta - Q sin theta, Q' = I sin theta + Q cos theta; then
    x' = clamp(M^-1 (Y, I', Q'), 0, 1). Unlike the HSV shift of
    ``ColorJitter`` (which changes luma: blue -> green brightens 5x), the
    grayscale image is unchanged up to the clamp, so the object/background
    contrast a shape is seen by survives every draw.
    """
    yiq = torch.einsum("ij,njhw->nihw", RGB_TO_YIQ.to(x), x)
    angle = (2 * math.pi * turns.to(x)).view(-1, 1, 1)
    cos, sin = angle.cos(), angle.sin()
    rotated = torch.stack([yiq[:, 0], yiq[:, 1] * cos - yiq[:, 2] * sin, yiq[:, 1] * sin + yiq[:, 2] * cos], 1)
    return torch.einsum("ij,njhw->nihw", YIQ_TO_RGB.to(x), rotated).clamp_(0, 1)


def adjust_hue_yiq(img: Image.Image, turns: float) -> Image.Image:
    """`rotate_hue_yiq` of one PIL RGB image (rounded back to uint8)."""
    x = TF.pil_to_tensor(img).float().div_(255)[None]
    out = rotate_hue_yiq(x, torch.tensor([turns]))[0].mul_(255).round_().to(torch.uint8)
    return TF.to_pil_image(out)


@dataclass(frozen=True)
class ColorJitterParams:
    """Colour-jitter factors, indexed like ``JITTER_OPS``: brightness, contrast
    and saturation blend factors f (1 = unchanged) and the hue shift d in turns
    (0 = unchanged); ``order`` lists the op indices in the order applied."""
    factors: tuple[float, float, float, float]
    order: tuple[int, int, int, int]


@dataclass(frozen=True)
class CropParams:
    """Every random choice of one crop: the box (top, left, height, width) in
    source pixels, the horizontal flip, colour jitter (None: not applied),
    grayscale, the PIL Gaussian-blur radius (None: no blur), solarization and inversion."""
    box: tuple[int, int, int, int]
    flip: bool
    jitter: ColorJitterParams | None
    grayscale: bool
    blur_radius: float | None
    solarize: bool
    invert: bool = False


@dataclass
class CropRecipe:
    """How one crop is drawn: output side, area range and the probabilities of blur, solarization and
    inversion."""
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0
    invert_p: float = 0.0


def apply_crop_params(img: Image.Image, params: CropParams, size: int, hue_space: str = "hsv") -> Image.Image:
    """The PIL pipeline of one crop: crop + bicubic resize to ``size`` -> flip ->
    jitter ops in ``order`` (hue in ``hue_space``: "hsv" as ColorJitter, or
    "yiq", `rotate_hue_yiq`) -> grayscale (ITU-R 601-2 luma) -> invert (v -> 255 - v) ->
    Gaussian blur -> solarize (values >= 128 become 255 - v). Returns an RGB ``size`` x ``size`` image."""
    top, left, height, width = params.box
    out = img.crop((left, top, left + width, top + height)).resize((size, size), Image.BICUBIC)
    if params.flip:
        out = ImageOps.mirror(out)
    if params.jitter is not None:
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation,
                  adjust_hue_yiq if hue_space == "yiq" else TF.adjust_hue)
        for op in params.jitter.order:
            out = adjust[op](out, params.jitter.factors[op])
    if params.grayscale:
        out = ImageOps.grayscale(out).convert("RGB")
    if params.invert:
        out = ImageOps.invert(out)
    if params.blur_radius is not None:
        out = out.filter(ImageFilter.GaussianBlur(radius=params.blur_radius))
    if params.solarize:
        out = ImageOps.solarize(out, threshold=128)
    return out


class MultiCropAugmentation:
    """PIL image + rng -> list of 2 + n_local normalised (3, S, S) tensors.

    ``draw`` makes every random choice (a `CropParams` per crop); the PIL path
    (``__call__``) and the batched path (`pretrain.batch_augment`) both apply
    those same choices.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96,
                 global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4), n_local: int = 8,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, saturation: float = 0.2, hue: float = 0.1,
                 grayscale_p: float = 0.2, blur_radius: tuple[float, float] = (0.1, 2.0),
                 hue_space: str = "hsv", local_invert_p: float = 0.0):
        if hue_space not in HUE_SPACES:
            raise UserError(f"unknown hue space '{hue_space}': use one of {', '.join(HUE_SPACES)}")
        self.hue_space = hue_space
        self.recipes = [CropRecipe(global_size, tuple(global_scale), blur_p=1.0),
                        CropRecipe(global_size, tuple(global_scale), blur_p=0.1, solarize_p=0.2)]
        self.recipes += [CropRecipe(local_size, tuple(local_scale), blur_p=0.5, invert_p=local_invert_p)] * n_local
        self.mean, self.std = list(mean), list(std)
        # factor ranges of brightness, contrast, saturation (blend factors) and hue (shift in turns)
        self.jitter_ranges = ((0.6, 1.4), (0.6, 1.4), (1 - saturation, 1 + saturation), (-hue, hue))
        self.grayscale_p = grayscale_p
        self.blur_radius = tuple(blur_radius)

    @classmethod
    def from_config(cls, cfg) -> "MultiCropAugmentation":
        """The multi-crop of a `pretrain.config.TrainConfig` (its crop sizes, scales, counts, jitter, blur)."""
        return cls(cfg.global_crops_size, cfg.local_crops_size, cfg.global_crops_scale, cfg.local_crops_scale,
                   cfg.local_crops_number, saturation=cfg.jitter_saturation, hue=cfg.jitter_hue,
                   grayscale_p=cfg.grayscale_p, blur_radius=cfg.blur_radius, hue_space=cfg.jitter_hue_space,
                   local_invert_p=cfg.local_invert_p)

    @property
    def ncrops(self) -> int:
        return len(self.recipes)

    @property
    def sizes(self) -> list[int]:
        return [recipe.size for recipe in self.recipes]

    def draw_crop(self, rng: random.Random, width: int, height: int, recipe: CropRecipe) -> CropParams:
        """One crop's choices, drawn in a fixed order: box, flip, jitter gate,
        jitter order then the factors in that order, grayscale, blur gate
        (``u <= p``), blur radius (only when blurring), solarize gate (``u < p``), and the
        invert gate (``u < p``) only when the recipe's p > 0."""
        box = random_resized_crop_box(rng, width, height, recipe.scale)
        flip = rng.random() < 0.5
        jitter = None
        if rng.random() < 0.8:
            order = list(range(len(JITTER_OPS)))
            rng.shuffle(order)
            factors = [0.0] * len(JITTER_OPS)
            for op in order:
                factors[op] = rng.uniform(*self.jitter_ranges[op])
            jitter = ColorJitterParams(tuple(factors), tuple(order))
        grayscale = rng.random() < self.grayscale_p
        blur_radius = rng.uniform(*self.blur_radius) if rng.random() <= recipe.blur_p else None
        solarize = rng.random() < recipe.solarize_p
        invert = recipe.invert_p > 0 and rng.random() < recipe.invert_p
        return CropParams(box, flip, jitter, grayscale, blur_radius, solarize, invert)

    def draw(self, width: int, height: int, rng: random.Random) -> list[CropParams]:
        """The choices of all 2 + n_local crops of a ``width`` x ``height`` image."""
        return [self.draw_crop(rng, width, height, recipe) for recipe in self.recipes]

    def __call__(self, img: Image.Image, rng: random.Random) -> list[torch.Tensor]:
        crops = []
        for params, recipe in zip(self.draw(img.width, img.height, rng), self.recipes):
            out = apply_crop_params(img, params, recipe.size, self.hue_space)
            crops.append(TF.normalize(TF.to_tensor(out), self.mean, self.std))
        return crops


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of one image in one epoch (independent of rank/worker)."""
    return random.Random((seed * 1_000_003 + epoch) * 1_000_000_007 + index)


class MultiCropDataset(torch.utils.data.Dataset):
    """Wrap an image dataset; ``dataset[(epoch, index)]`` -> list of crops.

    The base dataset returns (PIL image, label); labels are dropped. The
    (epoch, index) key comes from ``pretrain.sampler.ShardedSampler``.
    """

    def __init__(self, base: torch.utils.data.Dataset, augmentation: MultiCropAugmentation, seed: int = 0):
        self.base, self.augmentation, self.seed = base, augmentation, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        epoch, index = key
        img, _ = self.base[index]
        return self.augmentation(img, sample_rng(self.seed, epoch, index))


def pack_params(per_image: list[list[CropParams]]) -> dict[str, torch.Tensor]:
    """B lists of C crops' `CropParams` -> CPU tensors with leading dims (C, B):
    box (top, left, height, width) int64 (C, B, 4); flip, jitter, grayscale,
    blur, solarize, invert bool (C, B); jitter factors float64 (C, B, 4), indexed like
    ``JITTER_OPS`` (1, 1, 1, 0 where not jittered); jitter order int64
    (C, B, 4); blur radius float64 (C, B) (0 where not blurred)."""
    crops = [list(column) for column in zip(*per_image)]  # crop slot -> its B params

    def field(get, dtype):
        return torch.tensor([[get(p) for p in column] for column in crops], dtype=dtype)

    return {
        "box": field(lambda p: p.box, torch.int64),
        "flip": field(lambda p: p.flip, torch.bool),
        "jitter": field(lambda p: p.jitter is not None, torch.bool),
        "factors": field(lambda p: p.jitter.factors if p.jitter else (1.0, 1.0, 1.0, 0.0), torch.float64),
        "order": field(lambda p: p.jitter.order if p.jitter else (0, 1, 2, 3), torch.int64),
        "grayscale": field(lambda p: p.grayscale, torch.bool),
        "blur": field(lambda p: p.blur_radius is not None, torch.bool),
        "blur_radius": field(lambda p: p.blur_radius or 0.0, torch.float64),
        "solarize": field(lambda p: p.solarize, torch.bool),
        "invert": field(lambda p: p.invert, torch.bool),
    }


def pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 images (3, h_i, w_i), on one device -> one uint8 batch (B, 3, max h, max w) there,
    each zero-padded at the bottom/right (zeros no crop reads)."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = torch.zeros(len(images), 3, height, width, dtype=torch.uint8, device=images[0].device)
    for slot, image in enumerate(images):
        batch[slot, :, :image.shape[1], :image.shape[2]] = image
    return batch


class DecodedBatch(NamedTuple):
    """A collated batch for the batched path: the B images' uint8 pixels, each (3, h_i, w_i)
    flattened, one after the other in ``pixels`` (one tensor: one shared-memory block from a
    worker, one copy to a device, and no padding to the largest image), their ``sizes`` (B, 2)
    int64 (height, width), and `pack_params` of their crops."""
    pixels: torch.Tensor
    sizes: torch.Tensor
    params: dict[str, torch.Tensor]

    def images(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The B images, uint8 (3, h_i, w_i), on ``device`` (default: where they are), views of one copy."""
        flat = self.pixels if device is None else self.pixels.to(device, non_blocking=True)
        sizes = self.sizes.tolist()
        parts = flat.split([3 * height * width for height, width in sizes])
        return [part.view(3, height, width) for part, (height, width) in zip(parts, sizes)]

    def padded(self) -> torch.Tensor:
        """The images zero-padded into one uint8 batch (B, 3, max h, max w) (`pad_images`)."""
        return pad_images(self.images())


class DecodedCropDataset(MultiCropDataset):
    """``dataset[(epoch, index)]`` -> (uint8 (3, H, W) image, its crops' `CropParams`).

    The loader side of the batched path: decode and draw only (the same draws
    as `MultiCropDataset`); the pixels are augmented in batches by
    `pretrain.batch_augment.BatchMultiCrop`, on the training device.
    """

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, list[CropParams]]:
        epoch, index = key
        img, _ = self.base[index]
        return TF.pil_to_tensor(img), self.augmentation.draw(img.width, img.height, sample_rng(self.seed, epoch, index))


def collate_decoded(samples: list[tuple[torch.Tensor, list[CropParams]]]) -> DecodedBatch:
    """Concatenate the images' pixels and pack the crops' parameters."""
    return DecodedBatch(torch.cat([image.reshape(-1) for image, _ in samples]),
                        torch.tensor([list(image.shape[1:]) for image, _ in samples], dtype=torch.int64),
                        pack_params([params for _, params in samples]))
