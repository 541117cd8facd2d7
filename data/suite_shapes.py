"""What the embedded suite's things look like: ten object shapes, their surface textures, colours, backgrounds.

Every part of the suite (data/suite_classification.py and the other part
modules, data/suite_<part>.py) draws the same ten object classes, so that a
network pretrained on the 32-px classification part meets the same kind of
things when it is scored on retrieval, copy detection, video and mask
segmentation. A class is a SHAPE (`CLASS_NAMES`, outlines inside the unit
circle) filled with its own two-tone TEXTURE (`CLASS_TEXTURES`); colours are
drawn at random, independently of the class, with a luminance gap of at least
`MIN_CONTRAST` to the background.
Backgrounds are a colour gradient plus smooth blotches plus small distractor
strokes and dots. Shapes are drawn at `SUPERSAMPLING` times the output
resolution; callers downsample, so edges are anti-aliased.

Only drawing primitives live here; the generators that compose them (one object
per image for classification, several for the other parts) are elsewhere.
"""

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring",
               "star", "bar", "diamond", "crescent", "heart")
SUPERSAMPLING = 4
MIN_CONTRAST = 60  # min luminance gap object/background before pixel noise (distractors aside), of 255
BLOTCH_AMPLITUDE = 15  # max per-channel offset of the smooth background blotches
PIXEL_NOISE_STD = 6.0
REQUIRED_GAP = MIN_CONTRAST + BLOTCH_AMPLITUDE  # gap to the gradient colours, so blotches cannot close it
# Each class's object is filled with its own two-tone texture (period in output
# pixels), so a class has a shape AND a surface pattern, like a natural
# category; its colours stay random.
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


def draw_object_mask(draw: ImageDraw.ImageDraw, shape: str, centre, radius: float, angle: float) -> None:
    """Draw ``shape`` (255 = object, 0 = hole) centred at ``centre`` (x, y) with circumradius ``radius``."""
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


def texture_pattern(name: str, y, x, ring_dy, ring_dx, period: float) -> np.ndarray:
    """Bool array shaped like ``y``: where a surface shows its first colour.

    ``y``, ``x``: same-shape texture coordinates (pixels, phase included); ``ring_dy``,
    ``ring_dx``: offsets from the object's centre, used by the "rings" texture
    only; ``period``: the pattern's period in the same pixels.
    """
    half = lambda v, p=period: (v // (p / 2)) % 2 == 0  # noqa: E731
    if name == "solid":
        return np.ones(np.shape(y), bool)
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
        return half(np.hypot(ring_dy, ring_dx))
    if name == "waves":
        return half(y + 0.25 * period * np.sin(2 * np.pi * x / (2 * period)))
    raise ValueError(f"unknown texture {name}")


def luminance(rgb) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def second_tone(colour) -> np.ndarray:
    """The texture's other colour: the object colour darkened (light objects) or lightened."""
    colour = np.asarray(colour, dtype=np.float64)
    return colour * 0.45 if luminance(colour) > 110 else colour + (255 - colour) * 0.55


def sample_colours(rng: np.random.Generator):
    """Foreground colour and two background-gradient colours, all independent of the class.

    Both background colours lie on the same side of the foreground in luminance,
    far enough (`REQUIRED_GAP`) that blotches cannot close the gap below `MIN_CONTRAST`.
    """
    while True:
        foreground = rng.integers(0, 256, 3)
        candidates = rng.integers(0, 256, (64, 3))
        gap = luminance(candidates) - luminance(foreground)
        sides = [group for group in (candidates[gap >= REQUIRED_GAP], candidates[gap <= -REQUIRED_GAP])
                 if len(group) >= 2]
        if sides:
            background = sides[rng.integers(len(sides))]
            return foreground, background[0], background[1]


def background(rng: np.random.Generator, height: int, width: int, start_colour, end_colour,
               blotch_cells=(3, 3)) -> np.ndarray:
    """(height, width, 3) float array: linear gradient at a random angle plus smooth colour blotches.

    ``blotch_cells`` (rows, cols) is the coarse grid the blotches are drawn on.
    """
    angle = rng.uniform(0.0, 2.0 * np.pi)
    cols = (np.arange(width) + 0.5) / width - 0.5
    rows = (np.arange(height) + 0.5) / height - 0.5
    projection = np.cos(angle) * cols[None, :] + np.sin(angle) * rows[:, None]
    t = (projection - projection.min()) / (projection.max() - projection.min())
    gradient = (1.0 - t)[..., None] * start_colour + t[..., None] * end_colour
    # Bilinear upsampling of a coarse grid stays within its range: |blotch| <= BLOTCH_AMPLITUDE.
    coarse = rng.uniform(-BLOTCH_AMPLITUDE, BLOTCH_AMPLITUDE, (*blotch_cells, 3)).astype(np.float32)
    blotches = np.stack([np.asarray(Image.fromarray(coarse[..., channel]).resize((width, height), Image.BILINEAR))
                         for channel in range(3)], axis=-1)
    return gradient + blotches


def draw_distractors(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int,
                     count_range=(2, 5), stroke_scale: float = 32) -> None:
    """Short strokes (0.1-0.2 x ``stroke_scale`` long) or dots in random colours, far smaller than any object.

    ``count_range`` is the [low, high) range of their number; coordinates are
    output pixels, drawn on a canvas supersampled `SUPERSAMPLING` times.
    """
    scale = SUPERSAMPLING
    for _ in range(rng.integers(*count_range)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, (width, height))
        if rng.random() < 0.5:
            length, direction = rng.uniform(0.1, 0.2) * stroke_scale, rng.uniform(0, 2 * np.pi)
            end = (x + length * np.cos(direction), y + length * np.sin(direction))
            draw.line([(x * scale, y * scale), (end[0] * scale, end[1] * scale)], fill=colour, width=scale)
        else:
            r = rng.uniform(0.6, 1.2) * scale
            draw.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r], fill=colour)
