"""Reader for the Copydays copy-detection layout (docs/protocols.md, "Copy detection" and "Dataset layouts").

Layout, each block a folder of ``*.jpg`` files taken in filename order::

    root/original/*.jpg            the database (157 in the real set)
    root/strong/*.jpg              strong attacks (229)
    root/jpegqual/<q>/*.jpg        JPEG quality q (3, 5, ..., 75), one per original
    root/crops/<c>/*.jpg           c% cropped (10, ..., 80), one per original
    distractors_path/*             optional, any image files (paper: 10k YFCC100M)
    whitening_path/*               optional, any image files (paper: 20k other YFCC100M)

Every block, ``original`` included, is a query block; the database is the
originals followed by the distractors. Positives of a query (database
indices): in ``strong``, every original whose filename has the same first 4
characters (the Copydays scene id); in every other block, the original at the
query's own position within its block (the files correspond 1:1 in sorted
order, so such a block must hold exactly as many images as ``original/``).
Block sizes are not fixed here: only ``original/`` and ``strong/`` are
required, and ``jpegqual/`` / ``crops/`` sub-folders are read when present, in
numeric order, so a smaller embedded suite reads through the same code.
Distractor and whitening images are taken in sorted order (the official code
uses directory-listing order, which is arbitrary).
"""

import os
from dataclasses import dataclass

from common.errors import UserError
from data.imagefolder import _check_directory, images_directly_in

ORIGINAL_BLOCK = "original"
STRONG_BLOCK = "strong"
VARIANT_FAMILIES = ("jpegqual", "crops")  # folders of one sub-folder per strength
SCENE_PREFIX_LENGTH = 4
LAYOUT_HINT = ("expected <root>/original/*.jpg, <root>/strong/*.jpg and optionally "
               "<root>/jpegqual/<q>/*.jpg and <root>/crops/<c>/*.jpg")


@dataclass(frozen=True)
class CopydaysBlock:
    """One query block: ``name`` ("strong", "jpegqual/3"...), image ``paths`` in filename
    order, and for each query the tuple of database indices that are its ``positives``."""
    name: str
    paths: tuple
    positives: tuple


def _block_images(folder: str) -> list:
    """Sorted paths of the ``*.jpg`` files (any case) directly in ``folder``."""
    return sorted(entry.path for entry in os.scandir(folder)
                  if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(".jpg"))


def _strength_order(name: str):
    """Numeric folder names in numeric order (3 before 10), then any others by name."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


class Copydays:
    """Copydays blocks, database and optional distractor / whitening images under ``root``.

    Attributes: ``root``; ``original_paths``; ``distractor_paths``;
    ``whitening_paths`` (empty when no folder is given); ``database_paths``
    (originals then distractors); ``query_blocks`` (list of `CopydaysBlock`:
    original, strong, jpegqual/*, crops/*).
    """

    def __init__(self, root, distractors_path=None, whitening_path=None):
        self.root = os.fspath(root)
        _check_directory(self.root, "Copydays directory", LAYOUT_HINT)
        self.original_paths = self._required_block(ORIGINAL_BLOCK)
        self.distractor_paths = self._optional_images(distractors_path, "distractors")
        self.whitening_paths = self._optional_images(whitening_path, "whitening")
        self.database_paths = self.original_paths + self.distractor_paths
        self.query_blocks = [self._same_index_block(ORIGINAL_BLOCK, self.original_paths),
                             self._strong_block()]
        for family in VARIANT_FAMILIES:
            self.query_blocks.extend(self._family_blocks(family))

    def _required_block(self, name: str) -> list:
        folder = os.path.join(self.root, name)
        _check_directory(folder, "Copydays block folder", LAYOUT_HINT)
        paths = _block_images(folder)
        if not paths:
            raise UserError(f"Copydays block folder '{folder}' has no .jpg images: {LAYOUT_HINT}")
        return paths

    def _same_index_block(self, name: str, paths: list) -> CopydaysBlock:
        if len(paths) != len(self.original_paths):
            raise UserError(f"Copydays block '{os.path.join(self.root, name)}' has {len(paths)} images but "
                            f"original/ has {len(self.original_paths)}: each original needs exactly one "
                            f"transformed copy, matched by sorted filename")
        return CopydaysBlock(name, tuple(paths), tuple((index,) for index in range(len(paths))))

    def _strong_block(self) -> CopydaysBlock:
        paths = self._required_block(STRONG_BLOCK)
        scene_to_originals = {}
        for index, path in enumerate(self.original_paths):
            scene_to_originals.setdefault(os.path.basename(path)[:SCENE_PREFIX_LENGTH], []).append(index)
        positives = []
        for path in paths:
            scene = os.path.basename(path)[:SCENE_PREFIX_LENGTH]
            if scene not in scene_to_originals:
                raise UserError(f"strong copy '{path}' matches no original: its first {SCENE_PREFIX_LENGTH} "
                                f"characters '{scene}' must start the filename of an image in "
                                f"'{os.path.join(self.root, ORIGINAL_BLOCK)}'")
            positives.append(tuple(scene_to_originals[scene]))
        return CopydaysBlock(STRONG_BLOCK, tuple(paths), tuple(positives))

    def _family_blocks(self, family: str) -> list:
        family_folder = os.path.join(self.root, family)
        if not os.path.isdir(family_folder):
            return []
        strengths = sorted((entry.name for entry in os.scandir(family_folder)
                            if entry.is_dir() and not entry.name.startswith(".")), key=_strength_order)
        if not strengths:
            raise UserError(f"Copydays folder '{family_folder}' has no sub-folders: expected "
                            f"{family_folder}/<strength>/*.jpg, or remove the folder")
        blocks = []
        for strength in strengths:
            name = f"{family}/{strength}"
            blocks.append(self._same_index_block(name, _block_images(os.path.join(self.root, family, strength))))
        return blocks

    @staticmethod
    def _optional_images(folder, what: str) -> list:
        if folder is None:
            return []
        folder = os.fspath(folder)
        hint = f"pass a flat folder of {what} images or leave the option out"
        _check_directory(folder, f"{what} directory", hint)
        paths = images_directly_in(folder)
        if not paths:
            raise UserError(f"{what} directory '{folder}' holds no image files: {hint}")
        return paths

    def block(self, name: str) -> CopydaysBlock:
        """The query block called ``name`` ("original", "strong", "jpegqual/3", ...)."""
        for block in self.query_blocks:
            if block.name == name:
                return block
        raise KeyError(f"no Copydays block {name!r}; blocks: {', '.join(b.name for b in self.query_blocks)}")

    @property
    def block_names(self) -> list:
        return [block.name for block in self.query_blocks]

    @property
    def query_paths(self) -> list:
        """All query images, block after block (the order of `query_blocks`)."""
        return [path for block in self.query_blocks for path in block.paths]

    def __repr__(self) -> str:
        return (f"Copydays(root={self.root!r}, originals={len(self.original_paths)}, "
                f"distractors={len(self.distractor_paths)}, whitening={len(self.whitening_paths)}, "
                f"blocks={len(self.query_blocks)}, queries={len(self.query_paths)})")
