"""Index-map masks (palette PNGs) as DAVIS and PASCAL VOC store them: read, check, write.

A mask is a PNG in mode ``P`` whose pixel values are label indices (0 =
background, 1..N = objects or classes, 255 = void / object border); the
palette only colours them for display. Reading therefore takes the raw index
values (``numpy.array`` of the ``P`` image), never ``convert("RGB")`` or
``convert("L")``, which would replace indices by colours or luminance.
Grayscale (``L``) masks, such as the DAVIS-2016 binary masks, are read as their
values too.

The palette DAVIS and VOC both use is the 256-entry colour map built by
spreading the bits of each index over the three channels, most significant
colour bit first (`label_colormap`): 0 black, 1 (128,0,0), 2 (0,128,0),
3 (128,128,0), 4 (0,0,128), ..., 255 (224,224,192). It was checked against the
palettes stored in the DAVIS-2017 annotation and OSVOS result files and in the
VOC masks.
"""

import os

import numpy as np
import PIL.Image

from common.atomic import atomic_write
from common.errors import UserError

INDEX_MASK_MODES = ("P", "L")
VOID_LABEL = 255


def label_colormap() -> np.ndarray:
    """The (256, 3) uint8 DAVIS / PASCAL VOC palette: bit k of each colour channel
    comes from bit 3*(7-k) + channel of the label index."""
    labels = np.arange(256)
    colormap = np.zeros((256, 3), dtype=np.uint8)
    for shift in range(7, -1, -1):  # the label's lowest bit triple lands in the colour's top bit
        for channel in range(3):
            colormap[:, channel] |= (((labels >> channel) & 1) << shift).astype(np.uint8)
        labels = labels >> 3
    return colormap


def read_index_mask(path) -> np.ndarray:
    """The label indices of the mask PNG at ``path`` as a (H, W) uint8 array (255 kept as 255).

    Raises `UserError` for a missing or undecodable file and for images that do
    not hold indices (RGB, RGBA, 16-bit...).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"mask '{path}' does not exist: check the dataset root and split")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            mode = image.mode
            values = np.array(image) if mode in INDEX_MASK_MODES else None
    except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"cannot decode mask '{path}' ({reason}): delete or replace it") from None
    if values is None:
        raise UserError(f"mask '{path}' is a mode-{mode} image, not an index map (mode P or L): "
                        f"save masks as palette PNGs whose pixel values are the label indices")
    return values.astype(np.uint8, copy=False)


def object_labels(mask: np.ndarray) -> list:
    """The labels present in ``mask`` other than background 0 and void 255, ascending."""
    return [int(label) for label in np.unique(mask) if label not in (0, VOID_LABEL)]


def image_size(path) -> tuple:
    """(width, height) of the image at ``path``, read from its header only."""
    path = os.fspath(path)
    try:
        with PIL.Image.open(path) as image:
            return image.size
    except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"cannot decode image '{path}' ({reason}): delete or replace it") from None


def check_mask_matches_image(mask: np.ndarray, mask_path, image_path) -> None:
    """Raise `UserError` naming both files unless ``mask`` has the image's height and width."""
    width, height = image_size(image_path)
    if mask.shape != (height, width):
        raise UserError(f"mask '{os.fspath(mask_path)}' is {mask.shape[1]}x{mask.shape[0]} but its image "
                        f"'{os.fspath(image_path)}' is {width}x{height}: the mask must have the image's size")


def write_index_mask(path, mask, palette=None) -> None:
    """Write ``mask`` ((H, W) integers in 0..255) as a palette PNG at ``path``, atomically.

    ``palette`` is (256, 3) or a flat list of 768 values; default `label_colormap`.
    Written through `common.atomic.atomic_write`, so a reader never sees a
    half-written mask. Parent folders are created.
    """
    path = os.fspath(path)
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype.kind not in "iub":
        raise ValueError(f"an index mask is a 2-D integer array, got shape {mask.shape} dtype {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"index mask values must lie in 0..255, got {mask.min()}..{mask.max()}")
    flat_palette = np.asarray(label_colormap() if palette is None else palette, dtype=np.uint8).reshape(-1)
    image = PIL.Image.fromarray(mask.astype(np.uint8))  # mode L: the values are the indices
    image.putpalette(flat_palette.tolist())  # turns the L image into a P image, indices unchanged
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))
