"""Copy-detection part of the suite: synthetic 'holiday photos' and their copies, in the INRIA Copydays layout.

What it shows: originals are scenes of 2-5 textured objects of the suite's ten
classes on cluttered backgrounds (the suite's "photos"). Each is attacked the
ways Copydays attacks its photos:

* ``jpegqual/<q>/``: the original re-encoded at JPEG quality q (3 ... 75);
* ``crops/<c>/``: the central part of the original with c% of its surface
  removed (10 ... 80), same aspect ratio;
* ``strong/``: 1-2 copies per original, each a random mix of a crop and
  rescale or a paste onto another background (a print or a screenshot), then
  1-3 of: small rotation, colour change (grey, swapped channels, gamma,
  posterisation), blur, noise, painted strokes, and maybe a low-quality JPEG
  round trip.
``distractors/`` and ``whitening/`` hold other photos from the same generator
(separate seeds: disjoint from the originals and from each other), for the
database padding and the whitening statistics of the protocol.

A copy is found by what the original shows (its objects and their layout),
not by its colours or pixels, which the attacks change: what DINO's
invariances should give.

Layout (Copydays), under ``<root>/copydays/``: flat folders of JPEGs
``original/``, ``strong/``, ``jpegqual/<q>/``, ``crops/<c>/``,
``distractors/`` and ``whitening/``, and ``SUITE.json`` (the part's
parameters). Names as in the real set: an original is ``BBBB00.jpg``
with BBBB = 2000 + its index (the block id, the first 4 characters), its
strong copies are ``BBBB01.jpg``, ``BBBB02.jpg``, and its ``jpegqual/<q>/`` and
``crops/<c>/`` versions keep the original's name, so every block sorts in the
originals' order (the protocol matches those 1:1 by sorted position and the
strong copies by the first 4 characters).
"""

import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from common.progress import progress_bar
from data.suite_common import check_integer, make_folders, part_rng, save_jpeg, write_part_atomically
from data.suite_scenes import (
    SCENES_VERSION,
    canvas_size,
    place_objects,
    render_random_scene,
    render_scene,
    scene_canvas,
)
from data.suite_shapes import CLASS_NAMES

JPEG_QUALITIES = (3, 5, 8, 10, 15, 20, 30, 50, 75)
CROP_PERCENTS = (10, 15, 20, 30, 40, 50, 60, 70, 80)
FIRST_BLOCK_ID = 2000
IMAGE_SIZE = (128, 96)  # landscape (width, height); a quarter of the photos are portrait
PORTRAIT_PROBABILITY = 0.25
OBJECTS_PER_PHOTO = (2, 6)  # [low, high)
DIAMETER_RANGE = (16.0, 36.0)
SECOND_COPY_PROBABILITY = 0.46  # Copydays: 229 strong copies of 157 originals
ROLE_ORIGINAL, ROLE_STRONG, ROLE_DISTRACTOR, ROLE_WHITENING, ROLE_COPY_COUNT = range(5)


def original_name(index: int) -> str:
    return f"{FIRST_BLOCK_ID + index}00.jpg"


def strong_name(index: int, copy_index: int) -> str:
    return f"{FIRST_BLOCK_ID + index}{copy_index + 1:02d}.jpg"


def render_photo(seed: int, role: int, index: int) -> Image.Image:
    """Photo ``index`` of ``role`` (original, distractor or whitening): a random scene, lossless."""
    rng = part_rng(seed, "copydays", role, index)
    width, height = canvas_size(rng, IMAGE_SIZE, PORTRAIT_PROBABILITY)
    return render_random_scene(rng, width, height, OBJECTS_PER_PHOTO, DIAMETER_RANGE).image


def central_crop(image: Image.Image, percent_removed: float) -> Image.Image:
    """The centred part of ``image`` with ``percent_removed`` % of its surface cut away, same aspect ratio."""
    keep = np.sqrt(1.0 - percent_removed / 100.0)
    width, height = image.size
    new_width, new_height = max(1, round(width * keep)), max(1, round(height * keep))
    left, top = (width - new_width) // 2, (height - new_height) // 2
    return image.crop((left, top, left + new_width, top + new_height))


def _crop_and_rescale(rng, image):
    width, height = image.size
    keep_area, aspect = rng.uniform(0.35, 0.8), np.exp(rng.uniform(-0.3, 0.3))
    crop_w = min(width, round(width * np.sqrt(keep_area * aspect)))
    crop_h = min(height, round(height * np.sqrt(keep_area / aspect)))
    left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
    scale = rng.uniform(0.6, 1.4)
    return image.crop((left, top, left + crop_w, top + crop_h)).resize(
        (max(8, round(crop_w * scale)), max(8, round(crop_h * scale))), Image.BICUBIC)


def _paste_on_other_background(rng, image):
    """The copy shown smaller inside another scene, like a printed photo lying on a table."""
    width, height = canvas_size(rng, IMAGE_SIZE, PORTRAIT_PROBABILITY)
    canvas, pair = scene_canvas(rng, width, height)
    scene = render_scene(rng, canvas, place_objects(rng, width, height, int(rng.integers(0, 3)),
                                                     DIAMETER_RANGE, pair)).image
    scale = rng.uniform(0.55, 0.85) * min(width / image.width, height / image.height)
    small = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.BICUBIC)
    scene.paste(small, (int(rng.integers(0, width - small.width + 1)), int(rng.integers(0, height - small.height + 1))))
    return scene


def _rotate(rng, image):
    return image.rotate(rng.uniform(-20, 20), resample=Image.BICUBIC, expand=False,
                        fillcolor=tuple(int(c) for c in rng.integers(0, 256, 3)))


def _change_colours(rng, image):
    pixels = np.asarray(image, dtype=np.float64)
    kind = rng.integers(4)
    if kind == 0:
        return ImageOps.grayscale(image).convert("RGB")
    if kind == 1:
        pixels = pixels[..., rng.permutation(3)]
    elif kind == 2:
        pixels = 255.0 * (pixels / 255.0) ** rng.uniform(0.5, 2.0)
    else:
        return ImageOps.posterize(image, int(rng.integers(2, 4)))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _blur(rng, image):
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0)))


def _add_noise(rng, image):
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, rng.uniform(8, 20), (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _paint_strokes(rng, image):
    image = image.copy()
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        points = rng.uniform(0, (image.width, image.height), (2, 2))
        draw.line([tuple(p) for p in points], fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=int(rng.integers(2, 5)))
    return image


def _jpeg_round_trip(rng, image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(10, 40)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


PHOTOMETRIC_ATTACKS = (_rotate, _change_colours, _blur, _add_noise, _paint_strokes)


def strong_copy(seed: int, index: int, copy_index: int, original: Image.Image) -> Image.Image:
    """Strong copy ``copy_index`` of original ``index``: geometric change, 1-3 photometric ones, maybe JPEG."""
    rng = part_rng(seed, "copydays", ROLE_STRONG, index, copy_index)
    image = _crop_and_rescale(rng, original) if rng.random() < 0.65 else original
    if rng.random() < 0.35:
        image = _paste_on_other_background(rng, image)
    for position in sorted(rng.choice(len(PHOTOMETRIC_ATTACKS), int(rng.integers(1, 4)), replace=False)):
        image = PHOTOMETRIC_ATTACKS[position](rng, image)
    return _jpeg_round_trip(rng, image) if rng.random() < 0.5 else image


def strong_copy_count(seed: int, index: int) -> int:
    return 1 + int(part_rng(seed, "copydays", ROLE_COPY_COUNT, index).random() < SECOND_COPY_PROBABILITY)


def copydays_parameters(n_originals=40, n_distractors=150, n_whitening=400, seed=0) -> dict:
    """The SUITE.json content describing a copy-detection part (checked, JSON-ready)."""
    n_originals = check_integer("--originals", n_originals, 1, 10000 - FIRST_BLOCK_ID)
    return {
        "protocol": "copy_detection", "version": SCENES_VERSION,
        "layout": "Copydays: original/*.jpg, strong/*.jpg, jpegqual/<q>/*.jpg, crops/<c>/*.jpg; "
                  "distractors/*.jpg and whitening/*.jpg (flat folders)",
        "seed": check_integer("--seed", seed, 0),
        "image_size": list(IMAGE_SIZE), "portrait_probability": PORTRAIT_PROBABILITY,
        "n_originals": n_originals,
        "n_distractors": check_integer("--distractors", n_distractors, 0),
        "n_whitening": check_integer("--whitening", n_whitening, 0),
        "jpeg_qualities": list(JPEG_QUALITIES), "crop_percents_removed": list(CROP_PERCENTS),
        "naming": "original BBBB00.jpg (BBBB = block id = first 4 characters), strong copies BBBB01.jpg..., "
                  "jpegqual and crops keep the original's name",
        "class_names": list(CLASS_NAMES),
    }


def write_copydays(root, n_originals=40, n_distractors=150, n_whitening=400, seed=0, progress=True,
                   force=False) -> dict:
    """Write ``root/copydays/...`` (see the module docstring) and SUITE.json; return its dict."""
    p = copydays_parameters(n_originals, n_distractors, n_whitening, seed)

    def fill_folder(folder):
        original_folder, strong_folder, distractor_folder, whitening_folder = make_folders(
            folder, "original", "strong", "distractors", "whitening")
        quality_folders = make_folders(folder, *(os.path.join("jpegqual", str(q)) for q in JPEG_QUALITIES))
        crop_folders = make_folders(folder, *(os.path.join("crops", str(c)) for c in CROP_PERCENTS))
        total = p["n_originals"] + p["n_distractors"] + p["n_whitening"]
        with progress_bar(total=total, desc="copydays suite", unit="photo", disable=not progress) as bar:
            for index in range(p["n_originals"]):
                original, name = render_photo(p["seed"], ROLE_ORIGINAL, index), original_name(index)
                save_jpeg(original, os.path.join(original_folder, name))
                for quality, quality_folder in zip(JPEG_QUALITIES, quality_folders):
                    save_jpeg(original, os.path.join(quality_folder, name), quality=quality)
                for percent, crop_folder in zip(CROP_PERCENTS, crop_folders):
                    save_jpeg(central_crop(original, percent), os.path.join(crop_folder, name))
                for copy_index in range(strong_copy_count(p["seed"], index)):
                    save_jpeg(strong_copy(p["seed"], index, copy_index, original),
                              os.path.join(strong_folder, strong_name(index, copy_index)))
                bar.update()
            for role, count, target, prefix in ((ROLE_DISTRACTOR, p["n_distractors"], distractor_folder, "distractor"),
                                                (ROLE_WHITENING, p["n_whitening"], whitening_folder, "whitening")):
                for index in range(count):
                    save_jpeg(render_photo(p["seed"], role, index), os.path.join(target, f"{prefix}_{index:06d}.jpg"))
                    bar.update()

    return write_part_atomically(root, "copydays", p, fill_folder, force)


def describe(parameters: dict) -> str:
    p = parameters
    return (f"{p['n_originals']} originals with {len(JPEG_QUALITIES)} jpeg, {len(CROP_PERCENTS)} crop and 1-2 strong "
            f"copies each, {p['n_distractors']} distractors, {p['n_whitening']} whitening images, seed {p['seed']}")
