"""Reader for PASCAL VOC 2012 segmentation (docs/protocols.md, "VOC attention-mask Jaccard" and "Dataset layouts").

Layout::

    VOCdevkit/VOC2012/ImageSets/Segmentation/<split>.txt   image ids, one a line (val: 1449)
    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png    palette PNG: 0 background, 1..20 class, 255 void
    VOCdevkit/VOC2012/SegmentationObject/<id>.png   palette PNG: 0 background, 1..K instance, 255 void

``root`` may be the ``VOC2012`` folder, the ``VOCdevkit`` folder holding it,
or the folder holding ``VOCdevkit`` (torchvision's convention). Masks are read
as index maps with 255 kept as 255 (the attention-mask Jaccard ignores it);
see `data.index_masks`. At construction every id of the split must have its
image and the masks named in ``mask_kinds``; image/mask sizes are checked when
a mask is loaded.
"""

import os

import numpy as np

from common.errors import UserError
from data.imagefolder import _check_directory, load_rgb
from data.index_masks import check_mask_matches_image, read_index_mask
from data.split_files import read_split_file

VOC_CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                   "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                   "sheep", "sofa", "train", "tvmonitor")
MASK_FOLDERS = {"class": "SegmentationClass", "object": "SegmentationObject"}
LAYOUT_HINT = ("expected VOC2012/JPEGImages/<id>.jpg, VOC2012/SegmentationClass/<id>.png, "
               "VOC2012/SegmentationObject/<id>.png and VOC2012/ImageSets/Segmentation/<split>.txt; "
               "pass the VOC2012 or VOCdevkit folder")


def find_voc2012_folder(root) -> str:
    """The folder holding JPEGImages/: ``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    root = os.fspath(root)
    _check_directory(root, "VOC directory", LAYOUT_HINT)
    for candidate in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")):
            return candidate
    raise UserError(f"VOC directory '{root}' has no JPEGImages/ (nor VOC2012/JPEGImages/): {LAYOUT_HINT}")


class VOCSegmentation:
    """The images and class / instance masks of one VOC2012 segmentation split.

    Attributes: ``root`` (the VOC2012 folder), ``split``, ``image_ids`` (split-file order).
    ``mask_kinds`` names the mask folders that must be complete: "class", "object".
    """

    def __init__(self, root, split: str = "val", mask_kinds=("class", "object")):
        self.root = find_voc2012_folder(root)
        self.split = split
        unknown = [kind for kind in mask_kinds if kind not in MASK_FOLDERS]
        if unknown:
            raise ValueError(f"mask_kinds must be among {tuple(MASK_FOLDERS)}, got {unknown}")
        self.split_file = os.path.join(self.root, "ImageSets", "Segmentation", f"{split}.txt")
        self.image_ids = read_split_file(self.split_file, "VOC", LAYOUT_HINT)
        for kind in ("image", *mask_kinds):
            self._check_all_present(kind)

    def _check_all_present(self, kind: str) -> None:
        path_of = self.image_path if kind == "image" else (lambda image_id: self._mask_path(kind, image_id))
        missing = [path for path in map(path_of, self.image_ids) if not os.path.isfile(path)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            what = "image" if kind == "image" else f"{kind} mask"
            raise UserError(f"VOC {what} '{missing[0]}' of split '{self.split}' is missing{more}: "
                            f"{LAYOUT_HINT}")

    def image_path(self, image_id: str) -> str:
        return os.path.join(self.root, "JPEGImages", f"{image_id}.jpg")

    def class_mask_path(self, image_id: str) -> str:
        return self._mask_path("class", image_id)

    def object_mask_path(self, image_id: str) -> str:
        return self._mask_path("object", image_id)

    def _mask_path(self, kind: str, image_id: str) -> str:
        return os.path.join(self.root, MASK_FOLDERS[kind], f"{image_id}.png")

    def load_image(self, image_id: str):
        """The image as an RGB PIL image."""
        return load_rgb(self.image_path(image_id))

    def load_class_mask(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 class indices (0 background, 1..20, 255 void), checked against the image size."""
        return self._load_mask("class", image_id)

    def load_object_mask(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 instance indices (0 background, 1..K, 255 void), checked against the image size."""
        return self._load_mask("object", image_id)

    def _load_mask(self, kind: str, image_id: str) -> np.ndarray:
        mask_path = self._mask_path(kind, image_id)
        mask = read_index_mask(mask_path)
        check_mask_matches_image(mask, mask_path, self.image_path(image_id))
        return mask

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"VOCSegmentation(root={self.root!r}, split={self.split!r}, images={len(self.image_ids)})"
