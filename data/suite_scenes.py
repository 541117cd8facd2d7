"""Scenes of several objects, with exact per-object masks, for the suite's non-classification parts.

The retrieval, copy-detection, video and mask-segmentation parts of the suite
show the same ten textured object classes as the classification part
(data/suite_shapes.py), but several at a time, larger, on a larger cluttered
background, so that features learnt on the 32-px images carry over. This
module composes such scenes:

* `scene_canvas`: the background (gradient, blotches on a grid of cells about
  as large as in a 32-px image, distractor strokes at the same density and
  size), supersampled `SUPERSAMPLING` times.
* `render_scene`: paints objects back to front (list order = depth order) on
  that canvas, keeps a supersampled map of which object owns each sub-pixel,
  downsamples with LANCZOS, optionally changes the colours, and adds pixel
  noise. Each object's texture is anchored to the object (it moves, turns
  and zooms with it), unlike the classification images where it is fixed in
  image coordinates.

Ground truth is right by construction: the visible coverage of object k at a
pixel is the fraction of that pixel's sub-pixels that object k owns after
occlusion (`SceneRender.visible`); a pixel belongs to k when that coverage is
at least 50% (`SceneRender.labels`). Whole areas, visible fractions and
bounding boxes come from the same sub-pixel map.

Randomness: the parts draw each image with its own generator,
`data.suite_common.part_rng(seed, part, role, index, sub)`, independent of
generation order and of the counts, like
`data.suite_classification.image_rng`. (Writing the files -- JPEGs, palette
PNGs, folders, SUITE.json -- is data/suite_common.py's job.)
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data.suite_shapes import (
    CLASS_NAMES,
    CLASS_TEXTURES,
    PIXEL_NOISE_STD,
    REQUIRED_GAP,
    SUPERSAMPLING,
    TEXTURE_PERIOD,
    background,
    draw_distractors,
    draw_object_mask,
    luminance,
    second_tone,
    texture_pattern,
)

SCENES_VERSION = 1  # bump whenever scene rendering changes, so stale parts are regenerated
REFERENCE_SIZE = 32  # the classification images' side: clutter keeps their density and stroke size
BLOTCH_CELL_PX = REFERENCE_SIZE / 3  # the classification images draw blotches on a 3 x 3 grid
DISTRACTORS_PER_REFERENCE_AREA = (2, 5)  # [low, high) strokes per 32 x 32 pixels, as in classification
BACKGROUND_LUMA_SPREAD = 40  # max luminance gap between a scene's two gradient colours
COVERAGE_THRESHOLD = 0.5  # a pixel belongs to an object when the object covers at least half of it


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, in output pixels (the canvas is supersampled when drawn)."""
    class_index: int
    centre: tuple  # (x, y)
    radius: float  # circumradius
    angle: float  # outline rotation, radians
    colour: tuple  # the texture's first tone (r, g, b); the second is `second_tone(colour)`
    phase: tuple = (0.0, 0.0)  # texture phase (y, x), output pixels
    texture_angle: float = 0.0  # rotation of the texture with the object (video)
    texture_scale: float = 1.0  # zoom of the texture with the object (landmark views)


@dataclass
class SceneRender:
    """A rendered scene and its exact ground truth."""
    image: Image.Image  # RGB, (width, height)
    visible: np.ndarray  # (n, H, W) float32: each object's visible coverage of each pixel, in [0, 1]
    full_area: np.ndarray  # (n,): each object's whole area in pixels, as if unoccluded and not clipped
    owner: np.ndarray  # (H*S, W*S) int16 sub-pixel map: 0 background, k + 1 object k

    def labels(self) -> np.ndarray:
        """(H, W) uint8: k + 1 where object k covers at least half the pixel (the front one on a tie), else 0."""
        labels = np.zeros(self.visible.shape[1:], np.uint8)
        for k, coverage in enumerate(self.visible):
            labels[coverage >= COVERAGE_THRESHOLD] = k + 1
        return labels

    def visible_fraction(self, indices) -> float:
        """Visible area of the objects ``indices`` over their whole area (clipping and occlusion included)."""
        indices = list(indices)
        return float(self.visible[indices].sum() / self.full_area[indices].sum())

    def visible_box(self, indices):
        """[x1, y1, x2, y2] (floats, pixels) around the visible parts of objects ``indices``; None if unseen."""
        owned = np.isin(self.owner, [k + 1 for k in indices])
        rows, cols = np.flatnonzero(owned.any(axis=1)), np.flatnonzero(owned.any(axis=0))
        if rows.size == 0:
            return None
        s = SUPERSAMPLING
        return [cols[0] / s, rows[0] / s, (cols[-1] + 1) / s, (rows[-1] + 1) / s]


def sample_background_pair(rng: np.random.Generator, avoid=()):
    """Two gradient colours at most `BACKGROUND_LUMA_SPREAD` apart in luminance, both at least
    `REQUIRED_GAP` away from every colour of ``avoid`` (objects whose colours are fixed beforehand)."""
    avoid_luma = luminance(np.reshape(np.asarray(avoid, dtype=np.float64), (-1, 3)))
    while True:
        start = rng.integers(0, 256, 3)
        candidates = rng.integers(0, 256, (64, 3))
        close = candidates[np.abs(luminance(candidates) - luminance(start)) <= BACKGROUND_LUMA_SPREAD]
        if len(close) == 0:
            continue
        pair_luma = luminance(np.stack([start, close[0]]))
        if np.all(np.abs(avoid_luma[:, None] - pair_luma[None, :]) >= REQUIRED_GAP):
            return start, close[0]


def sample_object_colour(rng: np.random.Generator, background_pair) -> tuple:
    """A colour at least `REQUIRED_GAP` luminance levels from both background colours (so from the whole gradient)."""
    pair_luma = luminance(np.stack(background_pair))
    while True:
        candidates = rng.integers(0, 256, (64, 3))
        gap = np.abs(luminance(candidates)[:, None] - pair_luma[None, :]).min(axis=1)
        good = np.flatnonzero(gap >= REQUIRED_GAP)
        if good.size:
            return tuple(int(c) for c in candidates[good[0]])


def scene_canvas(rng: np.random.Generator, width: int, height: int, background_pair=None):
    """A supersampled (height*S, width*S, 3) uint8 background and its two gradient colours.

    The clutter keeps the classification images' scale: blotch cells of about
    `BLOTCH_CELL_PX` pixels, distractor strokes of the same length and
    density per area (`DISTRACTORS_PER_REFERENCE_AREA`).
    """
    start, end = sample_background_pair(rng) if background_pair is None else background_pair
    cells = (max(3, round(height / BLOTCH_CELL_PX)), max(3, round(width / BLOTCH_CELL_PX)))
    smooth = background(rng, height, width, start, end, blotch_cells=cells)
    s = SUPERSAMPLING
    canvas = Image.fromarray(np.clip(smooth, 0, 255).round().astype(np.uint8)).resize((width * s, height * s),
                                                                                      Image.BILINEAR)
    areas = width * height / REFERENCE_SIZE ** 2
    low, high = DISTRACTORS_PER_REFERENCE_AREA
    draw_distractors(ImageDraw.Draw(canvas), rng, width, height,
                     count_range=(max(1, round(low * areas)), max(2, round(high * areas))),
                     stroke_scale=REFERENCE_SIZE)
    return np.array(canvas), (start, end)


def random_object(rng: np.random.Generator, class_index: int, centre, radius: float, background_pair) -> SceneObject:
    """An object of ``class_index`` at ``centre`` with a random angle, contrasting colour and texture phase."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    colour = sample_object_colour(rng, background_pair)
    phase = tuple(rng.uniform(0.0, TEXTURE_PERIOD, 2))
    return SceneObject(int(class_index), (float(centre[0]), float(centre[1])), float(radius), float(angle),
                       colour, phase)


def place_objects(rng: np.random.Generator, width: int, height: int, count: int, diameter_range,
                  background_pair, min_separation: float = 0.75, margin: float = 1.0, tries: int = 100) -> list:
    """``count`` objects of random classes, inside the canvas (``margin`` pixels to spare), their centres
    at least ``min_separation`` x (sum of radii) apart when that can be found in ``tries`` draws
    (overlaps are then resolved by the depth order, the list order)."""
    objects = []
    for _ in range(count):
        class_index = rng.integers(len(CLASS_NAMES))
        radius = min(rng.uniform(*diameter_range) / 2, (min(width, height) - 2 * margin) / 2)
        low = np.array([radius + margin, radius + margin])
        high = np.array([width - radius - margin, height - radius - margin])
        for _ in range(tries):
            centre = rng.uniform(low, high)
            if all(np.hypot(*(centre - np.array(other.centre))) >= min_separation * (radius + other.radius)
                   for other in objects):
                break
        objects.append(random_object(rng, class_index, centre, radius, background_pair))
    return objects


def _paint_object(canvas: np.ndarray, owner: np.ndarray, item: SceneObject, object_id: int) -> float:
    """Paint ``item`` on the supersampled ``canvas`` and ``owner`` map (in place); return its whole area."""
    s = SUPERSAMPLING
    (cx, cy), r = item.centre, item.radius
    # An output-pixel-aligned box holding the whole object, one pixel to spare: its sub-pixel mask is
    # drawn unclipped (for the whole area) and then clipped to the canvas.
    x0, y0 = int(np.floor(cx - r)) - 1, int(np.floor(cy - r)) - 1
    x1, y1 = int(np.ceil(cx + r)) + 1, int(np.ceil(cy + r)) + 1
    mask_image = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw_object_mask(ImageDraw.Draw(mask_image), CLASS_NAMES[item.class_index], ((cx - x0) * s, (cy - y0) * s),
                     r * s, item.angle)
    mask = np.asarray(mask_image) > 127
    whole_area = mask.sum() / s ** 2
    big_h, big_w = owner.shape
    left, top, right, bottom = max(x0 * s, 0), max(y0 * s, 0), min(x1 * s, big_w), min(y1 * s, big_h)
    if left >= right or top >= bottom:
        return whole_area
    inside = mask[top - y0 * s:bottom - y0 * s, left - x0 * s:right - x0 * s]
    # Texture coordinates in the object's own frame (anchored at its centre, turned and zoomed with it).
    dy = (np.arange(top, bottom, dtype=np.float64) - cy * s)[:, None]
    dx = (np.arange(left, right, dtype=np.float64) - cx * s)[None, :]
    cos, sin = np.cos(item.texture_angle), np.sin(item.texture_angle)
    u = (cos * dx + sin * dy) / item.texture_scale
    v = (-sin * dx + cos * dy) / item.texture_scale
    period = TEXTURE_PERIOD * s
    first_tone = texture_pattern(CLASS_TEXTURES[CLASS_NAMES[item.class_index]], v + item.phase[0] * s,
                                 u + item.phase[1] * s, v, u, period)
    fill = np.where(first_tone[..., None], np.asarray(item.colour, np.float64), second_tone(item.colour))
    canvas[top:bottom, left:right][inside] = fill.astype(np.uint8)[inside]
    owner[top:bottom, left:right][inside] = object_id
    return whole_area


def render_scene(rng: np.random.Generator, canvas: np.ndarray, objects, colour_transform=None) -> SceneRender:
    """Paint ``objects`` back to front on a copy of the supersampled ``canvas``, downsample, add noise.

    ``colour_transform`` = (gain, offset), per channel, changes the colours of
    the whole downsampled image before the noise (a view under other light).
    """
    s = SUPERSAMPLING
    canvas = canvas.copy()
    big_h, big_w = canvas.shape[:2]
    height, width = big_h // s, big_w // s
    owner = np.zeros((big_h, big_w), np.int16)
    full_area = np.array([_paint_object(canvas, owner, item, k + 1) for k, item in enumerate(objects)])
    small = np.asarray(Image.fromarray(canvas).resize((width, height), Image.LANCZOS), dtype=np.float64)
    if colour_transform is not None:
        gain, offset = colour_transform
        small = small * np.asarray(gain) + np.asarray(offset)
    noisy = small + rng.normal(0.0, PIXEL_NOISE_STD, small.shape)
    image = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))
    visible = np.stack([(owner == k + 1).reshape(height, s, width, s).mean(axis=(1, 3), dtype=np.float32)
                        for k in range(len(objects))]) if objects else np.zeros((0, height, width), np.float32)
    return SceneRender(image, visible, full_area.astype(np.float64), owner)


def render_random_scene(rng: np.random.Generator, width: int, height: int, count_range, diameter_range) -> SceneRender:
    """A scene of a random number (``count_range`` = [low, high)) of random objects: the suite's 'photo'."""
    canvas, pair = scene_canvas(rng, width, height)
    objects = place_objects(rng, width, height, int(rng.integers(*count_range)), diameter_range, pair)
    return render_scene(rng, canvas, objects)


def canvas_size(rng: np.random.Generator, landscape, portrait_probability: float):
    """(width, height): ``landscape`` or, with ``portrait_probability``, the same turned upright."""
    width, height = landscape
    return (height, width) if rng.random() < portrait_probability else (width, height)
