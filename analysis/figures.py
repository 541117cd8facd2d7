"""Drawing helpers shared by every figure: un-normalising, overlays, marked tiles, tile grids, atomic PNGs.

Images are handled as ``uint8`` arrays of shape (H, W, 3); masks as bool
(H, W). Every figure is drawn with matplotlib's Agg backend (no display
needed) and written through `common.atomic`, so a half-written PNG is never
left behind.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from common.atomic import atomic_write_bytes  # noqa: E402
from common.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

# RGB colours of the marks a tile can carry (retrieval: easy/hard/junk/negative)
MARKS = {
    "query": (40, 110, 230),
    "positive": (30, 170, 60),
    "easy": (30, 170, 60),
    "hard": (240, 150, 20),
    "junk": (150, 150, 150),
    "negative": (220, 40, 40),
    "none": (255, 255, 255),
}


@dataclass
class FigureFile:
    """A written figure: its PNG, a title for the report, and a caption saying what it shows."""
    path: Path
    title: str
    caption: str = ""


@dataclass
class FigureSet:
    """What one figure maker produced: the figures written, and one line per input it had to skip."""
    figures: list[FigureFile]
    problems: list[str]


def to_uint8(image: torch.Tensor | np.ndarray | PIL.Image.Image) -> np.ndarray:
    """An ImageNet-normalised (3, H, W) tensor, a PIL image or a uint8 array -> (H, W, 3) uint8."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        return image
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def overlay(rgb: np.ndarray, mask: np.ndarray, colour=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
    """Blend ``colour`` into the pixels of ``rgb`` (H, W, 3) where ``mask`` (H, W) is true."""
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out.round().astype(np.uint8)


def fit_square(rgb: np.ndarray, side: int) -> np.ndarray:
    """Resize (aspect kept, bilinear) and pad with white to a ``side`` x ``side`` tile."""
    image = PIL.Image.fromarray(rgb)
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    tile = PIL.Image.new("RGB", (side, side), (255, 255, 255))
    tile.paste(image.resize(size, PIL.Image.BILINEAR), ((side - size[0]) // 2, (side - size[1]) // 2))
    return np.asarray(tile)


def with_border(rgb: np.ndarray, mark: str = "none", width: int = 4) -> np.ndarray:
    """``rgb`` (H, W, 3) framed by ``width`` pixels of the colour of ``mark`` (see `MARKS`)."""
    if mark not in MARKS:
        raise ValueError(f"unknown mark {mark!r}: one of {', '.join(MARKS)}")
    height, breadth = rgb.shape[:2]
    framed = np.empty((height + 2 * width, breadth + 2 * width, 3), np.uint8)
    framed[:] = MARKS[mark]
    framed[width:width + height, width:width + breadth] = rgb
    return framed


def tile_grid(rows: list[list[tuple[np.ndarray, str]]], tile_inches: float = 1.6, title: str | None = None):
    """A matplotlib figure with one image per cell: ``rows[r][c] = (rgb, label)``; short rows leave blanks."""
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(tile_inches * n_cols, tile_inches * n_rows + 0.3 * bool(title)),
                             squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            axis = axes[r][c]
            axis.axis("off")
            if c < len(rows[r]):
                rgb, label = rows[r][c]
                axis.imshow(rgb, interpolation="nearest")
                axis.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Render ``fig`` to PNG, write it atomically to ``path`` and close the figure."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def print_outcome(result: FigureSet) -> int:
    """A figure CLI's ending: a line per figure written and per input skipped; the exit status, 1 if some
    input was skipped, else 0 (a maker that drew nothing raises UserError: exit 2)."""
    for figure in result.figures:
        print(f"wrote {figure.path}")
    for problem in result.problems:
        print(f"skipped: {problem}")
    return 1 if result.problems else 0
