"""DINO multi-crop augmentation (PROTOCOLS A3), deterministic per sample.

Per source image: 2 global crops (scale ``global_scale``, default (0.4, 1))
and ``n_local`` local crops (scale ``local_scale``, default (0.05, 0.4)),
each through

    RandomResizedCrop(ratio 3/4..4/3, bicubic) -> hflip p=.5
    -> ColorJitter(.4, .4, .2, .1) with p=.8 (the four in random order)
    -> grayscale p=.2 -> Gaussian blur (PIL radius ~ U(.1, 2))
    -> solarize (threshold 128) -> to tensor -> ImageNet normalisation

with blur probability 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals and
solarization 0.2 on the second global crop only.

Every random draw comes from a ``random.Random`` seeded by
(seed, epoch, image index), so an image's crops do not depend on the number
of processes, data-loader workers or batch position: a 2-process run sees
exactly the crops of a 1-process run, and a resumed run those of an
uninterrupted one.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(image_size: int = 224) -> T.Compose:
    """The evaluation view (PROTOCOLS B1): Resize(image_size * 256/224, bicubic)
    -> CenterCrop(image_size) -> tensor -> ImageNet normalisation."""
    return T.Compose([
        T.Resize(round(image_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


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


def color_jitter(img: Image.Image, rng: random.Random, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1) -> Image.Image:
    """The four jitters with factors drawn uniformly, applied in random order."""
    adjustments = [
        lambda im: TF.adjust_brightness(im, rng.uniform(1 - brightness, 1 + brightness)),
        lambda im: TF.adjust_contrast(im, rng.uniform(1 - contrast, 1 + contrast)),
        lambda im: TF.adjust_saturation(im, rng.uniform(1 - saturation, 1 + saturation)),
        lambda im: TF.adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    rng.shuffle(adjustments)
    for adjust in adjustments:
        img = adjust(img)
    return img


@dataclass
class CropRecipe:
    """How one crop is drawn: output side, area range and the two probabilities."""
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


class MultiCropAugmentation:
    """PIL image + rng -> list of 2 + n_local normalised (3, S, S) tensors."""

    def __init__(self, global_size: int = 224, local_size: int = 96,
                 global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4), n_local: int = 8,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, saturation: float = 0.2, hue: float = 0.1,
                 grayscale_p: float = 0.2, blur_radius: tuple[float, float] = (0.1, 2.0)):
        self.recipes = [CropRecipe(global_size, tuple(global_scale), blur_p=1.0),
                        CropRecipe(global_size, tuple(global_scale), blur_p=0.1, solarize_p=0.2)]
        self.recipes += [CropRecipe(local_size, tuple(local_scale), blur_p=0.5)] * n_local
        self.mean, self.std = list(mean), list(std)
        self.saturation, self.hue, self.grayscale_p = saturation, hue, grayscale_p
        self.blur_radius = tuple(blur_radius)

    @property
    def ncrops(self) -> int:
        return len(self.recipes)

    def crop(self, img: Image.Image, recipe: CropRecipe, rng: random.Random) -> torch.Tensor:
        top, left, height, width = random_resized_crop_box(rng, img.width, img.height, recipe.scale)
        out = img.crop((left, top, left + width, top + height)).resize(
            (recipe.size, recipe.size), Image.BICUBIC)
        if rng.random() < 0.5:
            out = ImageOps.mirror(out)
        if rng.random() < 0.8:
            out = color_jitter(out, rng, saturation=self.saturation, hue=self.hue)
        if rng.random() < self.grayscale_p:
            out = ImageOps.grayscale(out).convert("RGB")
        if rng.random() <= recipe.blur_p:
            out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_radius)))
        if rng.random() < recipe.solarize_p:
            out = ImageOps.solarize(out, threshold=128)
        return TF.normalize(TF.to_tensor(out), self.mean, self.std)

    def __call__(self, img: Image.Image, rng: random.Random) -> list[torch.Tensor]:
        return [self.crop(img, recipe, rng) for recipe in self.recipes]


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
