"""Classification part of the embedded suite: 32-px images of ten object classes, in the ImageFolder layout.

No dataset can be downloaded on a fresh machine, so ``make data`` (``python -m
data.suite``, data/suite.py) writes a small suite into ``data/suite/``, one
folder per protocol, read by the evaluators through the same code path as the
real data (docs/design.md, "The embedded default suite"). This module writes the
classification part, the one the demo pretrains on, in ImageNet's ImageFolder
layout: ``classification/train/<class>/<index>.png`` and
``classification/val/<class>/<index>.png`` (lossless PNG; one folder per
class of `CLASS_NAMES`; indices zero-padded to at least 4 digits) and
``classification/SUITE.json`` (its parameters). The other parts live beside it
(data/suite_retrieval.py, suite_copydays.py, suite_davis.py, suite_voc.py),
draw the same objects (data/suite_shapes.py) composed into larger scenes
(data/suite_scenes.py); every part is written through
`data.suite_common.write_part_atomically`.

What an image shows, and why: one foreground object whose SHAPE and surface
TEXTURE (two tones of its colour, `CLASS_TEXTURES`) are the class, with
foreground and background colours drawn independently at random (kept at
least `MIN_CONTRAST` luminance levels apart), a random position, size (55-90%
of the side) and rotation, over a cluttered background (random colour
gradient, smooth colour blotches, pixel noise, 2-4 small distractor strokes and
dots). The object is the main content of the image, as in an ImageNet photo,
whose labelled object typically fills about half of it: self-distillation
matches a small crop of an image to a large one, and when most small crops
held only background (objects of 40-80% of the side, suite version 2), the
network learnt to describe the background, and its [CLS] attention avoided the
objects. Colour and position carry no class information, so a kNN on raw pixels
or on a random network does poorly, while features that learn shape and
texture invariant to colour, position and crop -- what DINO's augmentations
teach -- do well. (With flat-coloured objects, a short CPU pretraining only
learnt the colours: two crops of one image share them, so they are the
easiest cue; the textures give a class cue that is as quick to learn.)
Shapes are drawn at `SUPERSAMPLING` times the resolution and downsampled with
LANCZOS, so edges are anti-aliased like a photograph's.

Every image has its own random generator seeded by (seed, split, class, index):
the same seed gives byte-identical files, and changing a count does not change
the images that both runs share.
"""

import os

import numpy as np
from PIL import Image, ImageDraw

from common.progress import progress_bar
from data.suite_common import SPLIT_IDS, check_integer, write_part_atomically
from data.suite_shapes import (
    CLASS_NAMES,
    CLASS_TEXTURES,
    PIXEL_NOISE_STD,
    SUPERSAMPLING,
    TEXTURE_PERIOD,
    background,
    draw_distractors,
    draw_object_mask,
    sample_colours,
    second_tone,
    texture_pattern,
)

SUITE_VERSION = 3  # bump whenever the rendering changes, so stale suites are regenerated
MIN_IMAGE_SIZE = 16  # below this the ten shapes stop being distinguishable
OBJECT_DIAMETER_RANGE = (0.55, 0.9)  # fraction of the image side
OBJECT_MARGIN_PX = 1.0


def _texture(name: str, size: int, rng: np.random.Generator, centre) -> np.ndarray:
    """(size, size) bool: where the object shows its first colour, in image coordinates.

    ``size`` is the supersampled side, ``centre`` the object's (row, col); the
    pattern has a random phase.
    """
    period = TEXTURE_PERIOD * SUPERSAMPLING
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + rng.uniform(0, period, 2)[:, None, None]
    cy, cx = centre
    return texture_pattern(name, y, x, np.arange(size)[:, None] - cy, np.arange(size)[None, :] - cx, period)


def render_object_image(rng: np.random.Generator, class_index: int, image_size: int = 32):
    """Render one object of class ``CLASS_NAMES[class_index]`` on a cluttered background.

    Returns ``(image, object_mask)``: an RGB PIL image of ``image_size`` pixels
    and a (image_size, image_size) uint8 array, the anti-aliased object
    coverage (255 = object), for the protocols that need masks.
    """
    big = image_size * SUPERSAMPLING
    foreground, background_start, background_end = sample_colours(rng)
    # The background is smooth, so it is computed at the final size and only upsampled.
    smooth = background(rng, image_size, image_size, background_start, background_end)
    canvas = Image.fromarray(np.clip(smooth, 0, 255).round().astype(np.uint8)).resize((big, big), Image.BILINEAR)
    draw_distractors(ImageDraw.Draw(canvas), rng, image_size, image_size, count_range=(2, 5),
                     stroke_scale=image_size)

    # (capped so that the object fits inside the margins of the smallest images)
    radius = min(rng.uniform(*OBJECT_DIAMETER_RANGE) * image_size / 2, image_size / 2 - OBJECT_MARGIN_PX)
    centre = rng.uniform(radius + OBJECT_MARGIN_PX, image_size - radius - OBJECT_MARGIN_PX, 2)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    mask = Image.new("L", (big, big), 0)
    draw_object_mask(ImageDraw.Draw(mask), CLASS_NAMES[class_index], centre * SUPERSAMPLING,
                     radius * SUPERSAMPLING, angle)
    texture = _texture(CLASS_TEXTURES[CLASS_NAMES[class_index]], big, rng, centre[::-1] * SUPERSAMPLING)
    fill = np.where(texture[..., None], foreground, second_tone(foreground)).astype(np.uint8)
    canvas.paste(Image.fromarray(fill), mask=mask)

    small = np.asarray(canvas.resize((image_size, image_size), Image.LANCZOS), dtype=np.float64)
    noisy = small + rng.normal(0.0, PIXEL_NOISE_STD, small.shape)
    image = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))
    object_mask = np.asarray(mask.resize((image_size, image_size), Image.LANCZOS))
    return image, object_mask


def image_rng(seed: int, split: str, class_index: int, image_index: int) -> np.random.Generator:
    """The generator of one image: independent of generation order and of the counts."""
    return np.random.default_rng([seed, SPLIT_IDS[split], class_index, image_index])


def classification_parameters(n_train_per_class=300, n_val_per_class=100, image_size=32, seed=0) -> dict:
    """The SUITE.json content describing a classification suite (checked, JSON-ready)."""
    n_train_per_class = check_integer("--train-per-class", n_train_per_class, 1)
    n_val_per_class = check_integer("--val-per-class", n_val_per_class, 1)
    image_size = check_integer("--image-size", image_size, MIN_IMAGE_SIZE)
    seed = check_integer("--seed", seed, 0)
    return {
        "protocol": "classification",
        "version": SUITE_VERSION,
        "layout": "ImageFolder: {train,val}/<class>/<index>.png",
        "seed": int(seed),
        "image_size": int(image_size),
        "n_train_per_class": int(n_train_per_class),
        "n_val_per_class": int(n_val_per_class),
        "class_names": list(CLASS_NAMES),
        "num_images": len(CLASS_NAMES) * int(n_train_per_class + n_val_per_class),
    }


def write_classification(root, n_train_per_class=300, n_val_per_class=100, image_size=32, seed=0,
                         progress=True, force=False) -> dict:
    """Write ``root/classification/{train,val}/<class>/<index>.png`` and SUITE.json; return its dict.

    Skips the work when the folder already holds a suite with the same
    parameters, unless ``force``. Lossless PNG, so the pixels on disk are the
    pixels rendered.
    """
    parameters = classification_parameters(n_train_per_class, n_val_per_class, image_size, seed)
    counts = {"train": parameters["n_train_per_class"], "val": parameters["n_val_per_class"]}

    def fill_folder(folder):
        with progress_bar(total=parameters["num_images"], desc="classification suite", unit="img",
                          disable=not progress) as bar:
            for split, count in counts.items():
                digits = max(4, len(str(count - 1)))
                for class_index, class_name in enumerate(CLASS_NAMES):
                    class_folder = os.path.join(folder, split, class_name)
                    os.makedirs(class_folder)
                    for image_index in range(count):
                        rng = image_rng(parameters["seed"], split, class_index, image_index)
                        image, _ = render_object_image(rng, class_index, parameters["image_size"])
                        image.save(os.path.join(class_folder, f"{image_index:0{digits}d}.png"), format="PNG")
                        bar.update()

    return write_part_atomically(root, "classification", parameters, fill_folder, force)


def describe(parameters: dict) -> str:
    p = parameters
    return (f"{p['num_images']} images, {len(CLASS_NAMES)} classes x {p['n_train_per_class']} train + "
            f"{p['n_val_per_class']} val, {p['image_size']} px, seed {p['seed']}")
