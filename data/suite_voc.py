"""VOC part of the suite (attention masks): synthetic photos with object masks, in the PASCAL VOC 2012 layout.

What it shows: each image holds 1-3 large textured objects of the suite's ten
classes (two may share a class, like two people in VOC) on a cluttered
background, partly overlapping in a depth order. The masks say which pixels
each object owns: the protocol scores how well a head's attention (its
highest-attention patches) covers an object, which a network that has
learnt to tell objects from clutter does well and a random one does not.

Ground truth by construction (data/suite_scenes.py): a pixel belongs to an
object when the object, after occlusion, covers at least half of it. As in
the real VOC masks, a void band (label 255) marks object borders: every
pixel whose 3 x 3 neighbourhood meets another label (about 2 px wide, one on
each side of a border, also between two touching objects). Class ids: 1..10
= `CLASS_NAMES` in order (circle 1, ..., heart 10), written to
``VOC2012/class_names.txt`` (line i = id i, line 0 = background).

Layout (VOC 2012), under ``<root>/voc/``, the folder that plays VOCdevkit:
``VOC2012/JPEGImages/<id>.jpg``, ``VOC2012/SegmentationClass/<id>.png``,
``VOC2012/SegmentationObject/<id>.png`` (palette PNGs, VOC palette: 0
background, 1..n instances or class ids, 255 void) and
``VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt``, and
``SUITE.json`` (the part's parameters) beside ``VOC2012/``. Ids are
``synth_<6 digits>``; the first ``n_val`` images are the val split.
"""

import os

import numpy as np
from PIL import Image, ImageFilter

from common.progress import progress_bar
from data.suite_common import check_integer, make_folders, part_rng, save_jpeg, save_label_png, write_part_atomically
from data.suite_scenes import SCENES_VERSION, canvas_size, place_objects, render_scene, scene_canvas
from data.suite_shapes import CLASS_NAMES

IMAGE_SIZE = (128, 96)  # landscape (width, height); a quarter of the images are portrait
PORTRAIT_PROBABILITY = 0.25
OBJECTS_PER_IMAGE = (1, 4)  # [low, high)
DIAMETER_RANGE = (24.0, 56.0)
MIN_VISIBLE_FRACTION = 0.5  # an arrangement hiding more of an object than this is drawn again
VOID_LABEL = 255
ROLE_IMAGE = 0


def image_id(index: int) -> str:
    return f"synth_{index:06d}"


def void_band(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose 3 x 3 neighbourhood (clipped at the image border) holds two labels."""
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    return np.asarray(image.filter(ImageFilter.MaxFilter(3))) != np.asarray(image.filter(ImageFilter.MinFilter(3)))


def render_segmentation_image(seed: int, index: int):
    """Image ``index``: ``(image, instance_map, class_map, render, objects)``.

    ``instance_map`` holds 1..n by depth order (back first), ``class_map``
    the class ids 1..10; both carry the void band (255). ``render`` is the
    `SceneRender` they come from (its ``visible`` coverages are the exact
    masks before thresholding and void).
    """
    rng = part_rng(seed, "voc", ROLE_IMAGE, index)
    width, height = canvas_size(rng, IMAGE_SIZE, PORTRAIT_PROBABILITY)
    canvas, pair = scene_canvas(rng, width, height)
    count = int(rng.integers(*OBJECTS_PER_IMAGE))
    while True:
        objects = place_objects(rng, width, height, count, DIAMETER_RANGE, pair, min_separation=0.7)
        render = render_scene(rng, canvas, objects)
        if all(render.visible_fraction([k]) >= MIN_VISIBLE_FRACTION for k in range(count)):
            break
    instances = render.labels()
    classes = np.array([0] + [item.class_index + 1 for item in objects], np.uint8)[instances]
    void = void_band(instances)
    instances[void], classes[void] = VOID_LABEL, VOID_LABEL
    return render.image, instances, classes, render, objects


def voc_parameters(n_val=120, n_train=20, seed=0) -> dict:
    """The SUITE.json content describing a mask-segmentation part (checked, JSON-ready)."""
    return {
        "protocol": "attention_masks", "version": SCENES_VERSION,
        "layout": "VOC2012: JPEGImages/<id>.jpg, SegmentationClass/<id>.png, SegmentationObject/<id>.png "
                  "(palette PNG, 0 background, 255 void), ImageSets/Segmentation/{train,val,trainval}.txt",
        "seed": check_integer("--seed", seed, 0),
        "image_size": list(IMAGE_SIZE), "portrait_probability": PORTRAIT_PROBABILITY,
        "n_val": check_integer("--val-images", n_val, 1),
        "n_train": check_integer("--train-images", n_train, 0),
        "objects_per_image": [OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] - 1],
        "class_ids": {name: index + 1 for index, name in enumerate(CLASS_NAMES)},
        "void_label": VOID_LABEL,
        "void_band": "pixels whose 3x3 neighbourhood meets another label (about 2 px on object borders)",
    }


def write_voc(root, n_val=120, n_train=20, seed=0, progress=True, force=False) -> dict:
    """Write ``root/voc/VOC2012/...`` (see the module docstring) and SUITE.json; return its dict."""
    p = voc_parameters(n_val, n_train, seed)

    def fill_folder(folder):
        voc = os.path.join(folder, "VOC2012")
        image_folder, class_folder, object_folder, sets_folder = make_folders(
            voc, "JPEGImages", "SegmentationClass", "SegmentationObject", os.path.join("ImageSets", "Segmentation"))
        ids = [image_id(index) for index in range(p["n_val"] + p["n_train"])]
        for index, name in enumerate(progress_bar(ids, desc="voc suite", unit="img", disable=not progress)):
            image, instances, classes, _, _ = render_segmentation_image(p["seed"], index)
            save_jpeg(image, os.path.join(image_folder, f"{name}.jpg"))
            save_label_png(classes, os.path.join(class_folder, f"{name}.png"))
            save_label_png(instances, os.path.join(object_folder, f"{name}.png"))
        splits = {"val": ids[:p["n_val"]], "train": ids[p["n_val"]:], "trainval": sorted(ids)}
        for split, split_ids in splits.items():
            with open(os.path.join(sets_folder, f"{split}.txt"), "w") as listing:
                listing.write("".join(f"{name}\n" for name in split_ids))
        with open(os.path.join(voc, "class_names.txt"), "w") as listing:
            listing.write("".join(f"{name}\n" for name in ("_background_", *CLASS_NAMES)))

    return write_part_atomically(root, "voc", p, fill_folder, force)


def describe(parameters: dict) -> str:
    p = parameters
    return f"{p['n_val']} val + {p['n_train']} train images, classes 1..{len(CLASS_NAMES)}, seed {p['seed']}"
