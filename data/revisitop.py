"""Reader for revisited Oxford / Paris (revisitop): ``root/<dataset>/gnd_<dataset>.pkl`` + ``jpg/<name>.jpg``.

Layout (docs/protocols.md, "Dataset layouts"; pass the folder holding ``roxford5k/`` and
``rparis6k/`` -- revisitop's ``data/datasets`` -- as ``root``)::

    root/roxford5k/gnd_roxford5k.pkl      ground truth
    root/roxford5k/jpg/<name>.jpg         every database and query image

The ground-truth pickle is a dict: ``imlist`` (database image names, no
extension; 4993 / 6322), ``qimlist`` (query names; 70 / 70; queries are not
in the database), ``gnd`` (one dict per query: ``bbx`` = [x1, y1, x2, y2] in
pixels, zero-based, and ``easy`` / ``hard`` / ``junk`` = lists of indices into
``imlist``). It is read with `data.safe_pickle` and validated here, so a wrong
file fails at load time with the key and query at fault.

Query boxes (docs/protocols.md, "Image retrieval"): the revisitop protocol crops every query to its
``bbx`` before anything else; DINO's evaluation does not. Both are supported
(``crop_queries``); the crop follows revisitop's Python example, which calls
``PIL.Image.crop(bbx)``: PIL rounds each coordinate to the nearest integer
(`query_crop_box`). The box is also clamped to the image, as revisitop's
MATLAB code does, so no black padding can appear.

Difficulty protocols (`ground_truth_for`): Easy = positives easy, junk
junk + hard; Medium = positives easy + hard, junk junk; Hard = positives
hard, junk junk + easy. DINO reports Medium and Hard.
"""

import math
import os
from dataclasses import dataclass

import numpy as np

from common.errors import UserError
from data.imagefolder import load_rgb
from data.safe_pickle import load_pickle_file

GND_KEYS = ("imlist", "qimlist", "gnd")
QUERY_KEYS = ("bbx", "easy", "hard", "junk")
DIFFICULTIES = ("easy", "medium", "hard")
LAYOUT_HINT = ("expected <root>/<dataset>/gnd_<dataset>.pkl and <root>/<dataset>/jpg/<name>.jpg "
               "(revisitop's data/datasets folder as root)")


@dataclass(frozen=True)
class QueryGroundTruth:
    """One query's annotation: box (x1, y1, x2, y2) floats; easy/hard/junk int64 index arrays."""
    bbx: tuple
    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


@dataclass(frozen=True)
class GroundTruth:
    """A validated gnd file: database names, query names, one `QueryGroundTruth` per query."""
    imlist: list
    qimlist: list
    queries: list


def load_ground_truth(path) -> GroundTruth:
    """Read ``gnd_<dataset>.pkl`` at ``path`` safely and validate every key, index and box."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"ground-truth file '{path}' does not exist: {LAYOUT_HINT}")
    raw = load_pickle_file(path)
    if not isinstance(raw, dict):
        _malformed(path, f"the top level is a {type(raw).__name__}, not a dict with keys {', '.join(GND_KEYS)}")
    missing = [key for key in GND_KEYS if key not in raw]
    if missing:
        _malformed(path, f"key {', '.join(repr(key) for key in missing)} is missing")
    imlist = _names(raw["imlist"], path, "imlist")
    qimlist = _names(raw["qimlist"], path, "qimlist")
    if not isinstance(raw["gnd"], (list, tuple)) or len(raw["gnd"]) != len(qimlist):
        found = len(raw["gnd"]) if isinstance(raw["gnd"], (list, tuple)) else type(raw["gnd"]).__name__
        _malformed(path, f"'gnd' must be a list with one dict per query ({len(qimlist)}), found {found}")
    queries = [_query_ground_truth(entry, index, qimlist[index], len(imlist), path)
               for index, entry in enumerate(raw["gnd"])]
    return GroundTruth(imlist=imlist, qimlist=qimlist, queries=queries)


def _malformed(path: str, what: str):
    raise UserError(f"ground-truth file '{path}' is malformed: {what}; use the official revisitop file")


def _names(value, path: str, key: str) -> list:
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) and name for name in value):
        _malformed(path, f"'{key}' must be a list of image names (non-empty strings)")
    return list(value)


def _query_ground_truth(entry, index: int, query_name: str, database_size: int, path: str) -> QueryGroundTruth:
    where = f"gnd[{index}] (query '{query_name}')"
    if not isinstance(entry, dict):
        _malformed(path, f"{where} is a {type(entry).__name__}, not a dict")
    missing = [key for key in QUERY_KEYS if key not in entry]
    if missing:
        _malformed(path, f"{where} lacks key {', '.join(repr(key) for key in missing)}")
    lists = {key: _index_array(entry[key], f"{where}['{key}']", database_size, path)
             for key in ("easy", "hard", "junk")}
    return QueryGroundTruth(bbx=_box(entry["bbx"], f"{where}['bbx']", path), **lists)


def _index_array(value, where: str, database_size: int, path: str) -> np.ndarray:
    """``value`` (list or numpy array of ints) as int64, every index in [0, database_size)."""
    items = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(item, (int, np.integer)) and not isinstance(item, bool) for item in items):
        _malformed(path, f"{where} must be a list of integer indices into imlist")
    indices = np.asarray(items, dtype=np.int64).reshape(-1)
    out_of_range = indices[(indices < 0) | (indices >= database_size)]
    if out_of_range.size:
        _malformed(path, f"{where} holds index {int(out_of_range[0])}, outside imlist's 0..{database_size - 1}")
    return indices


def _box(value, where: str, path: str) -> tuple:
    items = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else value
    if (not isinstance(items, (list, tuple)) or len(items) != 4
            or not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in items)):
        _malformed(path, f"{where} must be 4 numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(v) for v in items)
    if not (x1 < x2 and y1 < y2):
        _malformed(path, f"{where} = {[x1, y1, x2, y2]} is empty (needs x1 < x2 and y1 < y2)")
    return (x1, y1, x2, y2)


class RevisitopDataset:
    """Revisited Oxford or Paris: database and query image paths, query boxes, ground truth.

    ``RevisitopDataset(root, "roxford5k")`` reads ``root/roxford5k/gnd_roxford5k.pkl``
    (``gnd_path`` overrides that) and images ``root/roxford5k/jpg/<name><image_ext>``.
    ``crop_queries`` sets what `load_query_image` returns by default: False =
    DINO's protocol (whole image), True = revisitop's (cropped to ``bbx``).
    ``check_images`` verifies at construction that every listed image exists.
    Attributes: ``dataset``, ``image_dir``, ``gnd_path``, ``ground_truth``
    (`GroundTruth`), ``database_paths``, ``query_paths``, ``crop_queries``.
    """

    def __init__(self, root, dataset: str, gnd_path=None, crop_queries: bool = False,
                 image_ext: str = ".jpg", check_images: bool = True):
        self.root = os.fspath(root)
        self.dataset = dataset
        self.crop_queries = crop_queries
        dataset_dir = os.path.join(self.root, dataset)
        self.image_dir = os.path.join(dataset_dir, "jpg")
        self.gnd_path = os.fspath(gnd_path) if gnd_path is not None \
            else os.path.join(dataset_dir, f"gnd_{dataset}.pkl")
        self.ground_truth = load_ground_truth(self.gnd_path)
        self.database_paths = [os.path.join(self.image_dir, name + image_ext) for name in self.ground_truth.imlist]
        self.query_paths = [os.path.join(self.image_dir, name + image_ext) for name in self.ground_truth.qimlist]
        if check_images:
            self._check_images_exist()

    def _check_images_exist(self) -> None:
        missing = [path for path in self.database_paths + self.query_paths if not os.path.isfile(path)]
        if missing:
            more = f" (and {len(missing) - 1} more of the {len(self.database_paths)} database + " \
                   f"{len(self.query_paths)} query images)" if len(missing) > 1 else ""
            raise UserError(f"{self.dataset} image '{missing[0]}' is missing{more}: put the dataset's images "
                            f"in '{self.image_dir}'; {LAYOUT_HINT}")

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    def query_bbox(self, query_index: int) -> tuple:
        """The query's box (x1, y1, x2, y2) as stored in the gnd file (float pixels)."""
        return self.ground_truth.queries[query_index].bbx

    def query_crop_box(self, query_index: int, image_size=None) -> tuple:
        """Integer (left, top, right, bottom) PIL would crop for the query: each bbx value rounded
        (Python's round, as ``PIL.Image.crop`` does); clamped to ``image_size`` (w, h) when given."""
        left, top, right, bottom = (round(value) for value in self.query_bbox(query_index))
        if image_size is not None:
            width, height = image_size
            left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
            right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)
        return (left, top, right, bottom)

    def load_database_image(self, index: int):
        """Database image ``index`` as an RGB PIL image."""
        return load_rgb(self.database_paths[index])

    def load_query_image(self, query_index: int, crop=None):
        """Query ``query_index`` as RGB PIL; cropped to its box when ``crop`` (default ``crop_queries``)."""
        image = load_rgb(self.query_paths[query_index])
        if self.crop_queries if crop is None else crop:
            image = image.crop(self.query_crop_box(query_index, image.size))
        return image

    def ground_truth_for(self, difficulty: str) -> list:
        """Per query, ``(positives, junk)`` index arrays under the Easy, Medium or Hard protocol."""
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        protocol = []
        for query in self.ground_truth.queries:
            if difficulty == "easy":
                positives, junk = query.easy, np.concatenate([query.junk, query.hard])
            elif difficulty == "medium":
                positives, junk = np.concatenate([query.easy, query.hard]), query.junk
            else:
                positives, junk = query.hard, np.concatenate([query.junk, query.easy])
            protocol.append((positives, junk))
        return protocol

    def __repr__(self) -> str:
        return (f"RevisitopDataset(dataset={self.dataset!r}, database={len(self.database_paths)}, "
                f"queries={len(self.query_paths)}, crop_queries={self.crop_queries})")
