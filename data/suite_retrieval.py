"""Retrieval part of the suite: synthetic landmarks in the revisited Oxford/Paris (revisitop) layout.

What it shows: a few LANDMARKS, each a fixed arrangement of 3-4 textured
objects of distinct classes (fixed positions, sizes, angles, colours and
texture phases, inside an 80 x 56 pixel "facade"), photographed in many
views. A view places the landmark in a new cluttered scene with a zoom, a
small camera roll, a shift, other objects behind or in front of it (partial
occlusion) and a change of light (per-channel gain and offset). Distractor
images show random objects of the same classes, never a landmark. Only the
arrangement (which objects, where, in which colours) tells a landmark apart,
which is what instance retrieval tests: a descriptor that encodes the objects
and their layout ranks the views of the query's landmark first.

Ground truth, by construction, from the exact visible fraction of the landmark
(visible area of its objects after clipping and occlusion, over their whole
area at that zoom, `SceneRender.visible_fraction`), as revisitop labels
views by how much of the landmark they show:

* easy: fraction >= `EASY_MIN_FRACTION` and zoom in `EASY_ZOOM`;
* hard: fraction >= `JUNK_MAX_FRACTION` otherwise (a small part, a far or
  very close view, heavy occlusion);
* junk: fraction below `JUNK_MAX_FRACTION` (almost nothing of it; ignored by
  the metric).
Views are drawn with recipes aimed at each label (cycle `VIEW_KINDS`), but
the label is always the measured one. Each landmark has
`n_queries_per_landmark` separate query images (the landmark whole, mild
changes), not in the database, whose `bbx` is the exact box around the
landmark's visible objects (for the protocol variant that crops queries).

Layout (revisitop), under ``<root>/retrieval/``: ``rsynth/jpg/<name>.jpg``
(database and query images), ``SUITE.json`` (the part's parameters) and
``rsynth/gnd_rsynth.pkl``: a plain dict with ``imlist``
and ``qimlist`` (names without extension) and ``gnd``, one dict per query
with ``bbx`` [x1, y1, x2, y2] floats and ``easy``, ``hard``, ``junk`` index
lists into imlist. Names mimic Oxford's: ``<landmark>_<6 digits>`` for
views (queries numbered from 900000) and ``rsynth_<6 digits>`` for
distractors; imlist is in a seeded random order.
"""

import os
import pickle
from dataclasses import dataclass, replace

import numpy as np

from common.progress import progress_bar
from data.suite_common import check_integer, make_folders, part_rng, save_jpeg, write_part_atomically
from data.suite_scenes import (
    SCENES_VERSION,
    SceneObject,
    canvas_size,
    place_objects,
    render_random_scene,
    render_scene,
    sample_background_pair,
    scene_canvas,
)
from data.suite_shapes import CLASS_NAMES, TEXTURE_PERIOD, luminance

DATASET = "rsynth"
LANDMARK_NAMES = ("abbey", "arch", "bridge", "castle", "chapel", "dome", "fountain", "gate",
                  "library", "mill", "spire", "tower")
ROLE_LANDMARK, ROLE_VIEW, ROLE_QUERY, ROLE_DISTRACTOR, ROLE_ORDER = range(5)
IMAGE_SIZE = (128, 96)  # landscape (width, height); a quarter of the images are portrait
PORTRAIT_PROBABILITY = 0.25
LANDMARK_BOX = (80.0, 56.0)  # the facade's width and height at zoom 1, pixels
LANDMARK_OBJECTS = (3, 5)  # [low, high) objects per landmark
LANDMARK_DIAMETER = (18.0, 30.0)
CLUTTER_DIAMETER = (14.0, 30.0)
BRIGHT_MIN_LUMA, DARK_MAX_LUMA = 170, 85  # a landmark's objects are all bright or all dark, so one
#                                           background can contrast with all of them
EASY_MIN_FRACTION, JUNK_MAX_FRACTION = 0.7, 0.25
EASY_ZOOM = (0.7, 1.4)
QUERY_MIN_FRACTION = 0.9
MIN_VIEW_FRACTION = 0.02  # a "view" showing less than this is drawn again (it would be a distractor)
VIEW_KINDS = ("easy", "hard", "easy", "hard", "junk")  # aimed label of view j: VIEW_KINDS[j % 5]
QUERY_NUMBER_BASE = 900000


@dataclass(frozen=True)
class Landmark:
    name: str
    objects: tuple  # SceneObjects in facade coordinates: (0, 0) is the facade's centre, zoom 1


def make_landmark(seed: int, index: int) -> Landmark:
    """Landmark ``index``: 3-4 objects of distinct classes placed without overlap in `LANDMARK_BOX`."""
    rng = part_rng(seed, "retrieval", ROLE_LANDMARK, index)
    count = int(rng.integers(*LANDMARK_OBJECTS))
    classes = rng.choice(len(CLASS_NAMES), count, replace=False)
    bright = rng.random() < 0.5
    half_w, half_h = LANDMARK_BOX[0] / 2, LANDMARK_BOX[1] / 2
    objects = []
    for class_index in classes:
        radius = rng.uniform(*LANDMARK_DIAMETER) / 2
        for _ in range(200):
            centre = rng.uniform((-half_w + radius, -half_h + radius), (half_w - radius, half_h - radius))
            if all(np.hypot(*(centre - other.centre)) >= radius + other.radius + 2 for other in objects):
                break
        while True:
            colour = rng.integers(0, 256, 3)
            if (luminance(colour) >= BRIGHT_MIN_LUMA) if bright else (luminance(colour) <= DARK_MAX_LUMA):
                break
        objects.append(SceneObject(int(class_index), tuple(float(c) for c in centre), float(radius),
                                   float(rng.uniform(0, 2 * np.pi)), tuple(int(c) for c in colour),
                                   tuple(rng.uniform(0.0, TEXTURE_PERIOD, 2))))
    return Landmark(LANDMARK_NAMES[index], tuple(objects))


def _view_geometry(rng: np.random.Generator, kind: str, width: int, height: int):
    """(zoom, roll, facade centre (x, y), number of occluders in front) of a view aimed at ``kind``."""
    recipe = kind if kind != "hard" else ("far", "partial", "occluded")[rng.integers(3)]
    zoom = {"query": (0.85, 1.15), "easy": (0.75, 1.3), "far": (0.45, 0.65), "partial": (0.9, 1.5),
            "occluded": (0.8, 1.2), "junk": (0.8, 1.4)}[recipe]
    zoom = rng.uniform(*zoom)
    roll = np.deg2rad(rng.uniform(-5, 5) if recipe == "query" else rng.uniform(-10, 10))
    half = np.array(LANDMARK_BOX) / 2 * zoom
    size = np.array([width, height], dtype=np.float64)
    inside_low, inside_high = np.minimum(half + 2, size / 2), np.maximum(size - half - 2, size / 2)
    centre = rng.uniform(inside_low, inside_high)
    if recipe in ("partial", "junk"):  # push the facade across one border: part (or nearly all) of it outside
        axis, far_side = rng.integers(2), rng.random() < 0.5
        share_inside = rng.uniform(0.3, 0.75) if recipe == "partial" else rng.uniform(0.03, 0.22)
        near = (2 * share_inside - 1) * half[axis]  # facade centre when it enters from the near border
        centre[axis] = size[axis] - near if far_side else near
    occluders = int(rng.integers(2, 4)) if recipe == "occluded" else int(rng.random() < 0.3)
    return zoom, roll, centre, occluders


def _landmark_in_view(landmark: Landmark, zoom: float, roll: float, centre) -> list:
    rotation = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])
    placed = []
    for item in landmark.objects:
        item_centre = np.asarray(centre) + zoom * rotation @ np.array(item.centre)
        placed.append(replace(item, centre=tuple(float(c) for c in item_centre), radius=item.radius * zoom,
                              angle=item.angle + roll, texture_angle=roll, texture_scale=zoom))
    return placed


def render_view(seed: int, landmark_index: int, view_index: int, query: bool = False):
    """Render database view (or query) ``view_index`` of landmark ``landmark_index``.

    Returns ``(render, landmark_objects, zoom)``: the `SceneRender`, the indices
    of the landmark's objects in it, and the zoom. Drawn again (same
    generator, next draws) until the landmark shows enough of itself.
    """
    landmark = make_landmark(seed, landmark_index)
    rng = part_rng(seed, "retrieval", ROLE_QUERY if query else ROLE_VIEW, landmark_index, view_index)
    kind = "query" if query else VIEW_KINDS[view_index % len(VIEW_KINDS)]
    width, height = canvas_size(rng, IMAGE_SIZE, PORTRAIT_PROBABILITY)
    pair = sample_background_pair(rng, avoid=[item.colour for item in landmark.objects])
    canvas, _ = scene_canvas(rng, width, height, pair)
    while True:
        zoom, roll, centre, occluders = _view_geometry(rng, kind, width, height)
        behind = place_objects(rng, width, height, int(rng.integers(1, 3)), CLUTTER_DIAMETER, pair)
        facade = _landmark_in_view(landmark, zoom, roll, centre)
        # Occluders are centred on random landmark objects, so they do hide part of the landmark.
        front = [replace(item, centre=tuple(np.array(facade[rng.integers(len(facade))].centre) + rng.uniform(-8, 8, 2)))
                 for item in place_objects(rng, width, height, 0 if query else occluders, CLUTTER_DIAMETER, pair)]
        gain, offset = (0.1, 8.0) if query else (0.2, 20.0)  # a change of light
        colour_change = (rng.uniform(1 - gain, 1 + gain, 3), rng.uniform(-offset, offset, 3))
        render = render_scene(rng, canvas, behind + facade + front, colour_change)
        indices = list(range(len(behind), len(behind) + len(facade)))
        if render.visible_fraction(indices) >= (QUERY_MIN_FRACTION if query else MIN_VIEW_FRACTION):
            return render, indices, zoom


def view_label(fraction: float, zoom: float) -> str:
    """'easy', 'hard' or 'junk' for a view showing ``fraction`` of its landmark at ``zoom``."""
    if fraction >= EASY_MIN_FRACTION and EASY_ZOOM[0] <= zoom <= EASY_ZOOM[1]:
        return "easy"
    return "hard" if fraction >= JUNK_MAX_FRACTION else "junk"


def retrieval_parameters(n_landmarks=8, n_views_per_landmark=20, n_queries_per_landmark=5, n_distractors=100,
                         seed=0) -> dict:
    """The SUITE.json content describing a retrieval part (checked, JSON-ready)."""
    n_landmarks = check_integer("--landmarks", n_landmarks, 1, len(LANDMARK_NAMES))
    n_views = check_integer("--views-per-landmark", n_views_per_landmark, 1)
    n_queries = check_integer("--queries-per-landmark", n_queries_per_landmark, 1)
    n_distractors = check_integer("--distractors", n_distractors, 0)
    return {
        "protocol": "retrieval", "version": SCENES_VERSION,
        "layout": f"revisitop: {DATASET}/jpg/<name>.jpg, {DATASET}/gnd_{DATASET}.pkl "
                  "(dict: imlist, qimlist, gnd[q] = {bbx, easy, hard, junk})",
        "dataset": DATASET, "seed": check_integer("--seed", seed, 0),
        "image_size": list(IMAGE_SIZE), "portrait_probability": PORTRAIT_PROBABILITY,
        "n_landmarks": n_landmarks, "n_views_per_landmark": n_views, "n_queries_per_landmark": n_queries,
        "n_distractors": n_distractors, "landmark_names": list(LANDMARK_NAMES[:n_landmarks]),
        "labels": {"easy": f"visible fraction >= {EASY_MIN_FRACTION} and zoom in {list(EASY_ZOOM)}",
                   "hard": f"visible fraction >= {JUNK_MAX_FRACTION}, not easy",
                   "junk": f"visible fraction < {JUNK_MAX_FRACTION}"},
        "class_names": list(CLASS_NAMES),
        "num_database_images": n_landmarks * n_views + n_distractors,
        "num_queries": n_landmarks * n_queries,
    }


def write_retrieval(root, n_landmarks=8, n_views_per_landmark=20, n_queries_per_landmark=5, n_distractors=100,
                    seed=0, progress=True, force=False) -> dict:
    """Write ``root/retrieval/rsynth/{jpg/*.jpg, gnd_rsynth.pkl}`` and SUITE.json; return its dict."""
    p = retrieval_parameters(n_landmarks, n_views_per_landmark, n_queries_per_landmark, n_distractors, seed)

    def fill_folder(folder):
        dataset_folder, = make_folders(folder, DATASET)
        image_folder, = make_folders(dataset_folder, "jpg")
        database, labels, qimlist, boxes = [], [], [], []  # labels[i] = (landmark, label) or None
        with progress_bar(total=p["num_database_images"] + p["num_queries"], desc="retrieval suite", unit="img",
                          disable=not progress) as bar:
            for landmark_index, name in enumerate(p["landmark_names"]):
                for view_index in range(p["n_views_per_landmark"]):
                    render, indices, zoom = render_view(p["seed"], landmark_index, view_index)
                    database.append(f"{name}_{view_index:06d}")
                    labels.append((landmark_index, view_label(render.visible_fraction(indices), zoom)))
                    save_jpeg(render.image, os.path.join(image_folder, database[-1] + ".jpg"))
                    bar.update()
                for query_index in range(p["n_queries_per_landmark"]):
                    render, indices, _ = render_view(p["seed"], landmark_index, query_index, query=True)
                    qimlist.append(f"{name}_{QUERY_NUMBER_BASE + query_index:06d}")
                    boxes.append((landmark_index, [float(v) for v in render.visible_box(indices)]))
                    save_jpeg(render.image, os.path.join(image_folder, qimlist[-1] + ".jpg"))
                    bar.update()
            for index in range(p["n_distractors"]):
                rng = part_rng(p["seed"], "retrieval", ROLE_DISTRACTOR, index)
                width, height = canvas_size(rng, IMAGE_SIZE, PORTRAIT_PROBABILITY)
                render = render_random_scene(rng, width, height, (2, 6), CLUTTER_DIAMETER)
                database.append(f"{DATASET}_{index:06d}")
                labels.append(None)
                save_jpeg(render.image, os.path.join(image_folder, database[-1] + ".jpg"))
                bar.update()
        order = part_rng(p["seed"], "retrieval", ROLE_ORDER, 0).permutation(len(database))
        imlist = [database[i] for i in order]
        labels = [labels[i] for i in order]
        gnd = [{"bbx": bbx, **{kind: [i for i, label in enumerate(labels) if label == (landmark_index, kind)]
                               for kind in ("easy", "hard", "junk")}}
               for landmark_index, bbx in boxes]
        with open(os.path.join(dataset_folder, f"gnd_{DATASET}.pkl"), "wb") as handle:
            pickle.dump({"gnd": gnd, "imlist": imlist, "qimlist": qimlist}, handle, protocol=3)

    return write_part_atomically(root, "retrieval", p, fill_folder, force)


def describe(parameters: dict) -> str:
    p = parameters
    return (f"{p['num_database_images']} database images + {p['num_queries']} queries of {p['n_landmarks']} "
            f"landmarks, dataset {p['dataset']}, seed {p['seed']}")
