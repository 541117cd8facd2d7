"""DAVIS part of the suite (video segmentation): short synthetic clips in the DAVIS-2017 layout, exact masks.

What it shows: each sequence follows 1-3 textured objects of the suite's ten
classes (distinct classes within a sequence) over a cluttered background
while the camera pans slowly. Objects glide at 0.5-2 px per frame, bounce
off the frame borders, turn (their texture turns with them) and breathe in
size; they pass in front of one another in a fixed depth order, so
occlusions happen and the masks stay exact (each pixel belongs to the front
object covering at least half of it). In frame 0 the objects do not overlap
and lie inside the frame, so frame 0 shows every object id 1..N, as the
semi-supervised protocol requires (N = the largest id of frame 0). Tracking
the objects by their look from frame 0 is what label propagation with
frozen patch features tests.

Layout (DAVIS 2017 trainval), under ``<root>/davis/``:
``JPEGImages/480p/<seq>/00000.jpg ...``, ``Annotations/480p/<seq>/00000.png
...`` (palette PNGs, DAVIS / VOC palette, 0 background, k object k; every
frame annotated), ``ImageSets/2017/val.txt`` and ``train.txt`` (one sequence
name per line), and ``SUITE.json`` (the part's parameters). Sequence names join the
objects' class names (``star-ring``). The folder is named 480p as in DAVIS,
but frames are `FRAME_SIZE` = 128 x 72 (DAVIS's 16:9 aspect): the protocol's
resize (height 480, width floored to a multiple of 64) maps them to 832 x 480
like real frames; an evaluator that keeps the native height gets 128 x 72
unchanged, since 128 is already a multiple of 64.
"""

import os
from dataclasses import replace

import numpy as np

from common.progress import progress_bar
from data.suite_common import check_integer, make_folders, part_rng, save_jpeg, save_label_png, write_part_atomically
from data.suite_scenes import SCENES_VERSION, place_objects, render_scene, scene_canvas
from data.suite_shapes import CLASS_NAMES, SUPERSAMPLING

FRAME_SIZE = (128, 72)  # (width, height)
OBJECTS_PER_SEQUENCE = (1, 4)  # [low, high)
DIAMETER_RANGE = (18.0, 32.0)
SPEED_RANGE = (0.5, 2.0)  # object speed, pixels per frame
MAX_TURN = 0.08  # radians per frame
MAX_BREATHING = 0.15  # relative size change amplitude
MAX_PAN_SPEED = 1.0  # camera, pixels per frame
PAN_MARGIN = 24  # background pixels beyond the frame on each axis, for the pan
ROLE_SEQUENCE, ROLE_FRAME = range(2)


def _bounce(position: float, velocity: float, low: float, high: float):
    """Move one coordinate one step, reflecting it (and its velocity) off [low, high]."""
    position += velocity
    if position < low:
        return 2 * low - position, -velocity
    if position > high:
        return 2 * high - position, -velocity
    return position, velocity


class Sequence:
    """One clip: its background, objects (in depth order) and their motion; `frame(t)` renders frame t."""

    def __init__(self, seed: int, index: int):
        self.seed, self.index = seed, index
        rng = part_rng(seed, "davis", ROLE_SEQUENCE, index)
        width, height = FRAME_SIZE
        self.background, pair = scene_canvas(rng, width + PAN_MARGIN, height + PAN_MARGIN)
        self.pan_start = rng.uniform(0, PAN_MARGIN, 2)
        self.pan_velocity = rng.uniform(-MAX_PAN_SPEED, MAX_PAN_SPEED, 2)
        count = int(rng.integers(*OBJECTS_PER_SEQUENCE))
        while True:  # frame 0: no overlap, all inside (place_objects keeps a margin), so every id is seen
            self.objects = place_objects(rng, width, height, count, DIAMETER_RANGE, pair, min_separation=1.0)
            if len({item.class_index for item in self.objects}) == count and all(
                    np.hypot(*np.subtract(a.centre, b.centre)) >= a.radius + b.radius
                    for i, a in enumerate(self.objects) for b in self.objects[i + 1:]):
                break
        directions = rng.uniform(0, 2 * np.pi, count)
        speeds = rng.uniform(*SPEED_RANGE, count)
        self.velocities = np.stack([np.cos(directions), np.sin(directions)], axis=1) * speeds[:, None]
        self.turns = rng.uniform(-MAX_TURN, MAX_TURN, count)
        self.breathing = rng.uniform(0, MAX_BREATHING, count), rng.uniform(0.1, 0.3, count), \
            rng.uniform(0, 2 * np.pi, count)
        self.depth_order = rng.permutation(count)  # back to front; object k keeps id k + 1
        self.name = "-".join(CLASS_NAMES[item.class_index] for item in self.objects)

    def objects_at(self, t: int) -> list:
        """The objects (id order) at frame ``t``: glided with bounces, turned and resized."""
        width, height = FRAME_SIZE
        amplitude, frequency, phase = self.breathing
        moved = []
        for k, item in enumerate(self.objects):
            (x, y), (vx, vy) = item.centre, self.velocities[k]
            for _ in range(t):  # bounce the centre off a band one radius inside the frame
                x, vx = _bounce(x, vx, item.radius, width - item.radius)
                y, vy = _bounce(y, vy, item.radius, height - item.radius)
            scale = 1 + amplitude[k] * (np.sin(frequency[k] * t + phase[k]) - np.sin(phase[k]))
            turn = self.turns[k] * t
            moved.append(replace(item, centre=(x, y), radius=item.radius * scale, angle=item.angle + turn,
                                 texture_angle=turn, texture_scale=scale))
        return moved

    def frame(self, t: int):
        """(image, labels) of frame ``t``: labels is (H, W) uint8 with object ids 1..N, 0 background."""
        width, height = FRAME_SIZE
        s = SUPERSAMPLING
        offset = np.clip(self.pan_start + self.pan_velocity * t, 0, PAN_MARGIN)
        left, top = (np.round(offset * s)).astype(int)
        canvas = self.background[top:top + height * s, left:left + width * s]
        objects = self.objects_at(t)
        render = render_scene(part_rng(self.seed, "davis", ROLE_FRAME, self.index, t), canvas,
                              [objects[k] for k in self.depth_order])
        ids = np.concatenate([[0], self.depth_order + 1]).astype(np.uint8)  # render order -> object id
        return render.image, ids[render.labels()]


def davis_parameters(n_val_sequences=6, n_train_sequences=2, n_frames=20, seed=0) -> dict:
    """The SUITE.json content describing a video part (checked, JSON-ready)."""
    return {
        "protocol": "video_segmentation", "version": SCENES_VERSION,
        "layout": "DAVIS-2017: JPEGImages/480p/<seq>/00000.jpg, Annotations/480p/<seq>/00000.png "
                  "(palette PNG, 0 background, 1..N objects), ImageSets/2017/{val,train}.txt",
        "seed": check_integer("--seed", seed, 0),
        "frame_size": list(FRAME_SIZE),
        "n_val_sequences": check_integer("--val-sequences", n_val_sequences, 1),
        "n_train_sequences": check_integer("--train-sequences", n_train_sequences, 0),
        "n_frames": check_integer("--frames", n_frames, 2),
        "objects_per_sequence": [OBJECTS_PER_SEQUENCE[0], OBJECTS_PER_SEQUENCE[1] - 1],
        "class_names": list(CLASS_NAMES),
    }


def write_davis(root, n_val_sequences=6, n_train_sequences=2, n_frames=20, seed=0, progress=True,
                force=False) -> dict:
    """Write ``root/davis/{JPEGImages,Annotations}/480p/<seq>/``, ``ImageSets/2017/*.txt`` and SUITE.json."""
    p = davis_parameters(n_val_sequences, n_train_sequences, n_frames, seed)

    def fill_folder(folder):
        image_root, annotation_root, sets_folder = make_folders(
            folder, os.path.join("JPEGImages", "480p"), os.path.join("Annotations", "480p"),
            os.path.join("ImageSets", "2017"))
        names = []
        n_sequences = p["n_val_sequences"] + p["n_train_sequences"]
        with progress_bar(total=n_sequences * p["n_frames"], desc="davis suite", unit="frame",
                          disable=not progress) as bar:
            for index in range(n_sequences):
                sequence = Sequence(p["seed"], index)
                name = sequence.name if sequence.name not in names else f"{sequence.name}-{index}"
                names.append(name)
                image_folder, annotation_folder = make_folders(image_root, name)[0], \
                    make_folders(annotation_root, name)[0]
                for t in range(p["n_frames"]):
                    image, labels = sequence.frame(t)
                    save_jpeg(image, os.path.join(image_folder, f"{t:05d}.jpg"))
                    save_label_png(labels, os.path.join(annotation_folder, f"{t:05d}.png"))
                    bar.update()
        for split, split_names in (("val", names[:p["n_val_sequences"]]), ("train", names[p["n_val_sequences"]:])):
            with open(os.path.join(sets_folder, f"{split}.txt"), "w") as listing:
                listing.write("".join(f"{name}\n" for name in split_names))

    return write_part_atomically(root, "davis", p, fill_folder, force)


def describe(parameters: dict) -> str:
    p = parameters
    return (f"{p['n_val_sequences']} val + {p['n_train_sequences']} train sequences x {p['n_frames']} frames, "
            f"{p['frame_size'][0]}x{p['frame_size'][1]} px, seed {p['seed']}")
