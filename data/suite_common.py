"""What every part of the embedded suite shares when it goes to disk: seeds, checks, SUITE.json, files.

Each part module (data/suite_classification.py, suite_retrieval.py,
suite_copydays.py, suite_davis.py, suite_voc.py) writes one folder
``<root>/<part>/`` through `write_part_atomically`: the content is written
into a hidden temp folder beside it (``<root>/.<part>.tmp-<pid>``), then
``SUITE.json`` (the part's parameters, as JSON, written last), and the temp
folder is renamed into place; an interrupted run leaves the previous folder
untouched. A folder whose SUITE.json equals the parameters asked for is up to
date (`is_up_to_date`) and is not written again.

Also here: `check_integer` (a size or seed given by the user, or a one-line
`UserError` naming its flag); the seeded generators (`part_rng`; the keys
after the seed tell the parts apart, `SPLIT_IDS` and `PART_IDS`, so no two
images share a generator); and the file writers of the scene parts
(`make_folders`, `save_jpeg`, and `save_label_png` with the VOC / DAVIS
colour map `LABEL_PALETTE`; the files go into the part's temp folder, which
is renamed into place as a whole, so they need no atomic write of their own).
"""

import json
import os
import shutil

import numpy as np
from PIL import Image

from common.errors import UserError
from data.index_masks import label_colormap

MANIFEST_NAME = "SUITE.json"
# The first key after the seed of every generator: the classification part's splits, then one id per other part.
SPLIT_IDS = {"train": 0, "val": 1}
PART_IDS = {"retrieval": 2, "copydays": 3, "davis": 4, "voc": 5}
JPEG_QUALITY = 90


def part_rng(seed: int, part: str, role: int, index: int, sub: int = 0) -> np.random.Generator:
    """The generator of one item of a part (image, sequence, landmark...): seeded by its keys only."""
    return np.random.default_rng([seed, PART_IDS[part], role, index, sub])


def check_integer(flag: str, value, minimum: int, maximum: int = None) -> int:
    """``value`` as an int, or a one-line `UserError` naming ``flag`` when it is not an integer in range."""
    if isinstance(value, bool) or int(value) != value or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise UserError(f"invalid {flag} {value!r}: pass an integer {bound}")
    return int(value)


def is_up_to_date(folder, parameters: dict) -> bool:
    """True when ``folder`` holds a complete suite generated with exactly ``parameters``."""
    try:
        with open(os.path.join(folder, MANIFEST_NAME)) as manifest:
            return json.load(manifest) == parameters
    except (OSError, ValueError):
        return False


def write_part_atomically(root, name: str, parameters: dict, fill_folder, force: bool) -> dict:
    """Create ``root/name`` by filling a temp folder and renaming it into place; return ``parameters``.

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
        with open(os.path.join(staging_folder, MANIFEST_NAME), "w") as manifest:
            json.dump(parameters, manifest, indent=2)
            manifest.write("\n")
        if os.path.lexists(final_folder):
            os.replace(final_folder, retired_folder)
        os.replace(staging_folder, final_folder)
    finally:
        shutil.rmtree(staging_folder, ignore_errors=True)
        shutil.rmtree(retired_folder, ignore_errors=True)
    return parameters


def make_folders(root, *relative) -> list:
    """Create ``root/relative`` for each (parents included) and return their paths."""
    paths = [os.path.join(root, folder) for folder in relative]
    for path in paths:
        os.makedirs(path, exist_ok=True)
    return paths


def save_jpeg(image: Image.Image, path, quality: int = JPEG_QUALITY) -> None:
    image.save(path, format="JPEG", quality=quality)


# The PASCAL VOC colour map, also DAVIS's (data/index_masks.py), as 768 ints for `putpalette`: 0 black,
# 1 (128, 0, 0), 2 (0, 128, 0), ..., 255 (224, 224, 192) for void.
LABEL_PALETTE = label_colormap().reshape(-1).tolist()


def save_label_png(labels: np.ndarray, path) -> None:
    """Write a (H, W) uint8 label map as a palette ('P') PNG with `LABEL_PALETTE`."""
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.putpalette(LABEL_PALETTE)  # an 'L' image becomes 'P'
    image.save(path, format="PNG")
