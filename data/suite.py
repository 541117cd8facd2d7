"""Generator of the embedded default suite: seeded synthetic data in the real datasets' layouts.

No dataset can be downloaded on a fresh machine, so ``make data`` writes a small
suite into ``data/suite/``, one folder per protocol, read by the evaluators
through the same code path as the real data (DESIGN.md, "The embedded default
suite"). This module writes the classification part, in the ImageFolder layout
of ImageNet (``classification/{train,val}/<class>/<index>.png``); the other
protocols (retrieval, copy detection, video and mask segmentation) go beside
`write_classification` and reuse `render_object_image` and `_write_atomically`.

What an image shows, and why: one foreground object whose SHAPE and surface
TEXTURE (two tones of its colour, `CLASS_TEXTURES`) are the class, with
foreground and background colours drawn independently at random (kept at
least `MIN_CONTRAST` luminance levels apart), a random position, size (40-80%
of the side) and rotation, over a cluttered background (random colour
gradient, smooth colour blotches, pixel noise, 2-4 small distractor strokes and
dots). Colour and position carry no class information, so a kNN on raw pixels
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

from data.errors import UserError, run_cli

SUITE_VERSION = 2  # bump whenever the rendering changes, so stale suites are regenerated
CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring",
               "star", "bar", "diamond", "crescent", "heart")
SPLIT_IDS = {"train": 0, "val": 1}
SUPERSAMPLING = 4
MIN_IMAGE_SIZE = 16  # below this the ten shapes stop being distinguishable
MIN_CONTRAST = 60  # min luminance gap object/background before pixel noise (distractors aside), of 255
BLOTCH_AMPLITUDE = 15  # max per-channel offset of the smooth background blotches
PIXEL_NOISE_STD = 6.0
OBJECT_DIAMETER_RANGE = (0.4, 0.8)  # fraction of the image side
OBJECT_MARGIN_PX = 1.0
# Each class's object is filled with its own two-tone texture (in image
# coordinates, period in output pixels), so a class has a shape AND a surface
# pattern, like a natural category; its colours stay random.
CLASS_TEXTURES = {"circle": "hstripes", "square": "vstripes", "triangle": "checker", "cross": "dots",
                  "ring": "solid", "star": "diagonal", "bar": "grid", "diamond": "rings",
                  "crescent": "coarse_checker", "heart": "waves"}
TEXTURE_PERIOD = 6.0


def _regular_polygon(corners: int, first_angle_deg: float) -> np.ndarray:
    angles = np.deg2rad(first_angle_deg + 360.0 / corners * np.arange(corners))
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star_outline(points: int = 5, inner_radius: float = 0.42) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner_radius)
    angles = np.deg2rad(-90.0 + 180.0 / points * np.arange(2 * points))
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _plus_outline(half_width: float = 0.3) -> np.ndarray:
    w, arm = half_width, np.sqrt(1.0 - half_width ** 2)  # arm ends touch the unit circle
    one_arm = np.array([(arm, -w), (arm, w), (w, w)])
    quarter_turn = np.array([[0.0, -1.0], [1.0, 0.0]])
    return np.concatenate([one_arm @ np.linalg.matrix_power(quarter_turn, k).T for k in range(4)])


def _heart_outline(samples: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, samples, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    outline = np.stack([x - (x.max() + x.min()) / 2, y - (y.max() + y.min()) / 2], axis=1)
    return outline / np.linalg.norm(outline, axis=1).max()


def _rectangle_outline(half_length: float, half_width: float) -> np.ndarray:
    scale = 1.0 / np.hypot(half_length, half_width)  # corners on the unit circle
    return scale * np.array([(half_length, half_width), (-half_length, half_width),
                             (-half_length, -half_width), (half_length, -half_width)])


# Polygon outlines in unit coordinates, each inside the unit circle (so an object
# of diameter d fits in a d x d box whatever its rotation).
POLYGON_OUTLINES = {
    "square": _regular_polygon(4, 45.0),
    "triangle": _regular_polygon(3, -90.0),
    "cross": _plus_outline(),
    "star": _star_outline(),
    "bar": _rectangle_outline(1.0, 0.3),
    "diamond": np.array([(1.0, 0.0), (0.0, 0.55), (-1.0, 0.0), (0.0, -0.55)]),
    "heart": _heart_outline(),
}


def _draw_object_mask(draw: ImageDraw.ImageDraw, shape: str, centre, radius: float, angle: float) -> None:
    """Draw ``shape`` (255 = object, 0 = hole) centred at ``centre`` with circumradius ``radius``."""
    def disc(disc_centre, disc_radius, fill):
        (cx, cy), r = disc_centre, disc_radius
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)

    if shape == "circle":
        disc(centre, radius, 255)
    elif shape == "ring":
        disc(centre, radius, 255)
        disc(centre, 0.55 * radius, 0)
    elif shape == "crescent":  # a disc with an offset disc bitten out, opening towards `angle`
        disc(centre, radius, 255)
        direction = np.array([np.cos(angle), np.sin(angle)])
        disc(np.asarray(centre) + 0.45 * radius * direction, 0.8 * radius, 0)
    else:
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = np.asarray(centre) + radius * POLYGON_OUTLINES[shape] @ rotation.T
        draw.polygon([tuple(point) for point in points], fill=255)


def _texture(name: str, size: int, rng: np.random.Generator, centre) -> np.ndarray:
    """(size, size) bool: where the object shows its first colour. ``size`` is
    the supersampled side; the pattern has a random phase."""
    period = TEXTURE_PERIOD * SUPERSAMPLING
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + rng.uniform(0, period, 2)[:, None, None]
    half = lambda v, p=period: (v // (p / 2)) % 2 == 0  # noqa: E731
    if name == "solid":
        return np.ones((size, size), bool)
    if name == "hstripes":
        return half(y)
    if name == "vstripes":
        return half(x)
    if name == "diagonal":
        return half(x + y, period * 1.4)
    if name == "checker":
        return half(x) ^ half(y)
    if name == "coarse_checker":
        return half(x, 2 * period) ^ half(y, 2 * period)
    if name == "dots":
        return ((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2) > (0.3 * period) ** 2
    if name == "grid":
        return (x % period > 0.35 * period) & (y % period > 0.35 * period)
    if name == "rings":
        cy, cx = centre
        return half(np.hypot(np.arange(size)[:, None] - cy, np.arange(size)[None, :] - cx))
    if name == "waves":
        return half(y + 0.25 * period * np.sin(2 * np.pi * x / (2 * period)))
    raise ValueError(f"unknown texture {name}")


def _second_tone(colour) -> np.ndarray:
    """The texture's other colour: the object colour darkened (light objects) or lightened."""
    colour = np.asarray(colour, dtype=np.float64)
    return colour * 0.45 if _luminance(colour) > 110 else colour + (255 - colour) * 0.55


def _luminance(rgb) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def _sample_colours(rng: np.random.Generator):
    """Foreground colour and two background-gradient colours, all independent of the class.

    Both background colours lie on the same side of the foreground in luminance,
    far enough that blotches cannot close the gap below `MIN_CONTRAST`.
    """
    required_gap = MIN_CONTRAST + BLOTCH_AMPLITUDE
    while True:
        foreground = rng.integers(0, 256, 3)
        candidates = rng.integers(0, 256, (64, 3))
        gap = _luminance(candidates) - _luminance(foreground)
        sides = [group for group in (candidates[gap >= required_gap], candidates[gap <= -required_gap])
                 if len(group) >= 2]
        if sides:
            background = sides[rng.integers(len(sides))]
            return foreground, background[0], background[1]


def _background(rng: np.random.Generator, size: int, start_colour, end_colour) -> np.ndarray:
    """(size, size, 3) float array: linear gradient at a random angle plus smooth colour blotches."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    coords = (np.arange(size) + 0.5) / size - 0.5
    projection = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    t = (projection - projection.min()) / (projection.max() - projection.min())
    gradient = (1.0 - t)[..., None] * start_colour + t[..., None] * end_colour
    # Bilinear upsampling of a coarse grid stays within its range: |blotch| <= BLOTCH_AMPLITUDE.
    coarse = rng.uniform(-BLOTCH_AMPLITUDE, BLOTCH_AMPLITUDE, (3, 3, 3)).astype(np.float32)
    blotches = np.stack([np.asarray(Image.fromarray(coarse[..., channel]).resize((size, size), Image.BILINEAR))
                         for channel in range(3)], axis=-1)
    return gradient + blotches


def _draw_distractors(draw: ImageDraw.ImageDraw, rng: np.random.Generator, image_size: int) -> None:
    """2-4 short strokes or dots in random colours, far smaller than any object."""
    scale = SUPERSAMPLING
    for _ in range(rng.integers(2, 5)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, image_size, 2)
        if rng.random() < 0.5:
            length, direction = rng.uniform(0.1, 0.2) * image_size, rng.uniform(0, 2 * np.pi)
            end = (x + length * np.cos(direction), y + length * np.sin(direction))
            draw.line([(x * scale, y * scale), (end[0] * scale, end[1] * scale)], fill=colour, width=scale)
        else:
            r = rng.uniform(0.6, 1.2) * scale
            draw.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r], fill=colour)


def render_object_image(rng: np.random.Generator, class_index: int, image_size: int = 32):
    """Render one object of class ``CLASS_NAMES[class_index]`` on a cluttered background.

    Returns ``(image, object_mask)``: an RGB PIL image of ``image_size`` pixels
    and a (image_size, image_size) uint8 array, the anti-aliased object
    coverage (255 = object), for the protocols that need masks.
    """
    big = image_size * SUPERSAMPLING
    foreground, background_start, background_end = _sample_colours(rng)
    # The background is smooth, so it is computed at the final size and only upsampled.
    background = _background(rng, image_size, background_start, background_end)
    canvas = Image.fromarray(np.clip(background, 0, 255).round().astype(np.uint8)).resize((big, big), Image.BILINEAR)
    _draw_distractors(ImageDraw.Draw(canvas), rng, image_size)

    radius = rng.uniform(*OBJECT_DIAMETER_RANGE) * image_size / 2
    centre = rng.uniform(radius + OBJECT_MARGIN_PX, image_size - radius - OBJECT_MARGIN_PX, 2)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    mask = Image.new("L", (big, big), 0)
    _draw_object_mask(ImageDraw.Draw(mask), CLASS_NAMES[class_index], centre * SUPERSAMPLING,
                      radius * SUPERSAMPLING, angle)
    texture = _texture(CLASS_TEXTURES[CLASS_NAMES[class_index]], big, rng, centre[::-1] * SUPERSAMPLING)
    fill = np.where(texture[..., None], foreground, _second_tone(foreground)).astype(np.uint8)
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
    for flag, value, minimum in (("--train-per-class", n_train_per_class, 1),
                                 ("--val-per-class", n_val_per_class, 1),
                                 ("--image-size", image_size, MIN_IMAGE_SIZE), ("--seed", seed, 0)):
        if int(value) != value or value < minimum:
            raise UserError(f"invalid {flag} {value!r}: pass an integer >= {minimum}")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.suite",
                                     description="Write the embedded default suite (classification part).")
    parser.add_argument("--out", default=os.path.join("data", "suite"), help="suite root folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--force", action="store_true", help="regenerate even when SUITE.json matches")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    folder = os.path.join(args.out, "classification")
    parameters = classification_parameters(args.train_per_class, args.val_per_class, args.image_size, args.seed)
    already_there = not args.force and is_up_to_date(folder, parameters)
    write_classification(args.out, args.train_per_class, args.val_per_class, args.image_size, args.seed,
                         progress=not args.no_progress, force=args.force)
    action = "classification suite already up to date" if already_there else "wrote classification suite"
    print(f"{action}: {folder} ({parameters['num_images']} images, {len(CLASS_NAMES)} classes x "
          f"{args.train_per_class} train + {args.val_per_class} val, {args.image_size} px, seed {args.seed}) "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
