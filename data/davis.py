"""Reader for DAVIS-2017 video object segmentation (docs/protocols.md, "DAVIS video segmentation" and
"Dataset layouts").

Layout (the trainval 480p archive)::

    root/ImageSets/2017/<split>.txt               sequence names, one a line (val: 30)
    root/JPEGImages/480p/<seq>/00000.jpg ...      frames, taken in filename order
    root/Annotations/480p/<seq>/00000.png ...     palette PNGs of label indices:
                                                  0 background, 1..N objects, 255 void

The semi-supervised protocol needs the first frame's annotation of every
sequence; train/val have one for every frame. Masks are read as index maps
(`data.index_masks.read_index_mask`), never through their colours. Predictions
are written as palette PNGs with `write_index_mask` and `davis_palette`.

Checked at construction, so that a run fails before any work: the split file
exists, every listed sequence has frames, and every sequence has its
first-frame annotation. Frame / mask size agreement is checked when a mask is
loaded (`load_annotation`), naming both files.
"""

import os

import numpy as np

from common.errors import UserError
from data.imagefolder import _check_directory, load_rgb
from data.index_masks import check_mask_matches_image, label_colormap, object_labels, read_index_mask, write_index_mask
from data.split_files import read_split_file

__all__ = ["Davis", "davis_palette", "read_index_mask", "write_index_mask"]

LAYOUT_HINT = ("expected <root>/ImageSets/2017/<split>.txt, <root>/JPEGImages/480p/<seq>/*.jpg and "
               "<root>/Annotations/480p/<seq>/*.png (the DAVIS-2017 trainval 480p archive)")


def davis_palette() -> np.ndarray:
    """The (256, 3) uint8 palette of DAVIS annotations and results (the same as PASCAL VOC's:
    0 black, 1 (128,0,0), 2 (0,128,0), 3 (128,128,0), ...), see `data.index_masks.label_colormap`."""
    return label_colormap()


class Davis:
    """DAVIS sequences of one split: frame paths, annotation paths and index masks.

    ``Davis(root, split="val")`` reads ``root/ImageSets/<year>/<split>.txt``.
    Attributes: ``root``, ``split``, ``sequences`` (names in split-file order),
    ``frames_dir`` and ``annotations_dir`` (``.../480p``).
    """

    def __init__(self, root, split: str = "val", year: str = "2017", resolution: str = "480p"):
        self.root = os.fspath(root)
        self.split = split
        _check_directory(self.root, "DAVIS directory", LAYOUT_HINT)
        self.frames_dir = os.path.join(self.root, "JPEGImages", resolution)
        self.annotations_dir = os.path.join(self.root, "Annotations", resolution)
        self.split_file = os.path.join(self.root, "ImageSets", str(year), f"{split}.txt")
        self.sequences = read_split_file(self.split_file, "DAVIS", LAYOUT_HINT)
        self._frame_paths = {sequence: self._find_frames(sequence) for sequence in self.sequences}
        for sequence in self.sequences:
            self._check_first_annotation(sequence)

    def _find_frames(self, sequence: str) -> list:
        folder = os.path.join(self.frames_dir, sequence)
        frames = sorted(entry.path for entry in os.scandir(folder)
                        if entry.is_file() and entry.name.lower().endswith(".jpg")) if os.path.isdir(folder) else []
        if not frames:
            what = "has no .jpg frames" if os.path.isdir(folder) else "does not exist"
            raise UserError(f"sequence '{sequence}' is listed in '{self.split_file}' but its frame folder "
                            f"'{folder}' {what}: add the frames or remove the line")
        return frames

    def _check_first_annotation(self, sequence: str) -> None:
        path = self.first_annotation_path(sequence)
        if not os.path.isfile(path):
            raise UserError(f"sequence '{sequence}' has no first-frame annotation '{path}': the "
                            f"semi-supervised protocol starts from it; {LAYOUT_HINT}")

    def _known(self, sequence: str) -> str:
        if sequence not in self._frame_paths:
            raise KeyError(f"sequence {sequence!r} is not in split {self.split!r}")
        return sequence

    def frame_paths(self, sequence: str) -> list:
        """The sequence's frame paths in filename order."""
        return list(self._frame_paths[self._known(sequence)])

    def frame_names(self, sequence: str) -> list:
        """Frame names without extension ("00000", ...): the names predictions are saved under."""
        return [os.path.splitext(os.path.basename(path))[0] for path in self.frame_paths(sequence)]

    def annotation_path(self, sequence: str, frame_name: str) -> str:
        """Where the annotation of ``frame_name`` is (it may not exist)."""
        return os.path.join(self.annotations_dir, self._known(sequence), f"{frame_name}.png")

    def annotation_paths(self, sequence: str) -> list:
        """Per frame, its annotation path, or None where that frame has none."""
        paths = [self.annotation_path(sequence, name) for name in self.frame_names(sequence)]
        return [path if os.path.isfile(path) else None for path in paths]

    def first_annotation_path(self, sequence: str) -> str:
        return self.annotation_path(sequence, self.frame_names(sequence)[0])

    def load_frame(self, sequence: str, frame_index: int):
        """Frame ``frame_index`` as an RGB PIL image."""
        return load_rgb(self.frame_paths(sequence)[frame_index])

    def load_annotation(self, sequence: str, frame_index: int) -> np.ndarray:
        """The (H, W) uint8 label map of frame ``frame_index``; checks it has the frame's size."""
        frame_path = self.frame_paths(sequence)[frame_index]
        mask_path = self.annotation_path(sequence, self.frame_names(sequence)[frame_index])
        mask = read_index_mask(mask_path)
        check_mask_matches_image(mask, mask_path, frame_path)
        return mask

    def load_first_annotation(self, sequence: str) -> np.ndarray:
        return self.load_annotation(sequence, 0)

    def object_ids(self, sequence: str) -> list:
        """The object labels of the first-frame annotation (background 0 and void 255 left out)."""
        return object_labels(self.load_first_annotation(sequence))

    def __len__(self) -> int:
        return len(self.sequences)

    def __repr__(self) -> str:
        return f"Davis(root={self.root!r}, split={self.split!r}, sequences={len(self.sequences)})"
