"""Generator of the embedded default suite: seeded synthetic data in the real datasets' layouts.

No dataset can be downloaded on a fresh machine, so ``make data`` writes a small
suite into ``data/suite/``, one folder per protocol, read by the evaluators
through the same code path as the real data (DESIGN.md, "The embedded default
suite"). This module writes the classification part, in the ImageFolder layout
of ImageNet (``classification/{train,val}/<class>/<index>.png``), and holds the
command line that writes every part; the other parts live beside it
(data/suite_retrieval.py, suite_copydays.py, suite_video.py,
suite_segmentation.py), draw the same objects (data/suite_shapes.py) composed
into larger scenes (data/suite_scenes.py), and write through
`_write_atomically`.

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

import argparse
import json
import os
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from common.errors import UserError, run_cli
from data.suite_shapes import (CLASS_NAMES, CLASS_TEXTURES, PIXEL_NOISE_STD, SUPERSAMPLING, TEXTURE_PERIOD,
                               background, draw_distractors, draw_object_mask, sample_colours, second_tone,
                               texture_pattern)

SUITE_VERSION = 3  # bump whenever the rendering changes, so stale suites are regenerated
SPLIT_IDS = {"train": 0, "val": 1}
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


def check_integer(flag: str, value, minimum: int, maximum: int = None) -> int:
    """``value`` as an int, or a one-line `UserError` naming ``flag`` when it is not an integer in range."""
    if isinstance(value, bool) or int(value) != value or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise UserError(f"invalid {flag} {value!r}: pass an integer {bound}")
    return int(value)


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


def is_up_to_date(folder, parameters: dict) -> bool:
    """True when ``folder`` holds a complete suite generated with exactly ``parameters``."""
    try:
        with open(os.path.join(folder, "SUITE.json")) as manifest:
            return json.load(manifest) == parameters
    except (OSError, ValueError):
        return False


def _write_atomically(root, name: str, parameters: dict, fill_folder, force: bool) -> dict:
    """Create ``root/name`` by filling a temp folder and renaming it into place.

    ``fill_folder(path)`` writes the content; SUITE.json is written last. An
    interrupted run leaves the previous ``root/name`` (if any) untouched and
    no temp folder behind; the previous one is removed only once the new one is
    complete. A matching SUITE.json means there is nothing to do (unless ``force``).
    """
    final_folder = os.path.join(root, name)
    if not force and is_up_to_date(final_folder, parameters):
        return parameters
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create suite folder '{root}' ({error.strerror or error}): "
                        f"pass --out <writable folder>") from None
    staging_folder = os.path.join(root, f".{name}.tmp-{os.getpid()}")
    retired_folder = os.path.join(root, f".{name}.old-{os.getpid()}")
    shutil.rmtree(staging_folder, ignore_errors=True)
    try:
        os.makedirs(staging_folder)
        fill_folder(staging_folder)
        with open(os.path.join(staging_folder, "SUITE.json"), "w") as manifest:
            json.dump(parameters, manifest, indent=2)
            manifest.write("\n")
        if os.path.lexists(final_folder):
            os.replace(final_folder, retired_folder)
        os.replace(staging_folder, final_folder)
    finally:
        shutil.rmtree(staging_folder, ignore_errors=True)
        shutil.rmtree(retired_folder, ignore_errors=True)
    return parameters


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
        with tqdm(total=parameters["num_images"], desc="classification suite", unit="img",
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

    return _write_atomically(root, "classification", parameters, fill_folder, force)


PART_NAMES = ("classification", "retrieval", "copydays", "davis", "voc")


def describe_classification(parameters: dict) -> str:
    p = parameters
    return (f"{p['num_images']} images, {len(CLASS_NAMES)} classes x {p['n_train_per_class']} train + "
            f"{p['n_val_per_class']} val, {p['image_size']} px, seed {p['seed']}")


def _parse_parts(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(PART_NAMES)
    if not names or any(name not in PART_NAMES for name in names):
        raise UserError(f"invalid --parts {text!r}: pass a comma-separated list of {', '.join(PART_NAMES)}, "
                        f"or all")
    return [name for name in PART_NAMES if name in names]


def _part_plans(args, parts: list) -> list:
    """(name, parameters, write(progress, force), describe) per part, all checked before anything is written."""
    # The scene parts import this module (for _write_atomically), so they are imported here, not at the top.
    from data import suite_copydays, suite_retrieval, suite_segmentation, suite_video
    scene_parts = {  # name: (parameters(seed=...), write(root, seed=..., progress=..., force=...), describe)
        "retrieval": (suite_retrieval.retrieval_parameters, suite_retrieval.write_retrieval, suite_retrieval.describe),
        "copydays": (suite_copydays.copydays_parameters, suite_copydays.write_copydays, suite_copydays.describe),
        "davis": (suite_video.davis_parameters, suite_video.write_davis, suite_video.describe),
        "voc": (suite_segmentation.voc_parameters, suite_segmentation.write_voc, suite_segmentation.describe)}
    plans = []
    for name in parts:
        if name == "classification":
            sizes = (args.train_per_class, args.val_per_class, args.image_size, args.seed)
            plans.append((name, classification_parameters(*sizes),
                          lambda progress, force, sizes=sizes: write_classification(args.out, *sizes,
                                                                                    progress=progress, force=force),
                          describe_classification))
        else:
            parameters, write, describe = scene_parts[name]
            plans.append((name, parameters(seed=args.seed),
                          lambda progress, force, write=write: write(args.out, seed=args.seed, progress=progress,
                                                                     force=force),
                          describe))
    return plans


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.suite",
                                     description="Write the embedded default suite (every part by default).")
    parser.add_argument("--out", default=os.path.join("data", "suite"), help="suite root folder")
    parser.add_argument("--parts", default="all",
                        help=f"comma-separated parts to write, of {', '.join(PART_NAMES)}; or all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=300, help="classification part")
    parser.add_argument("--val-per-class", type=int, default=100, help="classification part")
    parser.add_argument("--image-size", type=int, default=32, help="classification part")
    parser.add_argument("--force", action="store_true", help="regenerate even when SUITE.json matches")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    for name, parameters, write, describe in _part_plans(args, _parse_parts(args.parts)):
        started = time.perf_counter()
        folder = os.path.join(args.out, name)
        already_there = not args.force and is_up_to_date(folder, parameters)
        write(progress=not args.no_progress, force=args.force)
        action = f"{name} suite already up to date" if already_there else f"wrote {name} suite"
        print(f"{action}: {folder} ({describe(parameters)}) in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
