"""Per-head [CLS] attention of the last block, drawn as the paper's attention figure, with the 60%-mass masks.

    python -m analysis.attention --ckpt runs/demo/checkpoint.pth --image-size 96 \
        --images data/suite/voc/VOC2012/JPEGImages
    python -m analysis.attention --ckpt dino_vits8.pth --images photo.jpg more_photos/ --resize short-side

What is drawn, per image x resized to (3, H, W) with patch size p and (h, w) = (H / p, W / p)
(the maps come from `evaluate.attention_masks.attention_maps`, so figure and VOC score agree):

    A[k]    = attn_last[k, 0, 1:]    head k's attention of the [CLS] query over the h * w patches, (h, w)
    mask[k] = the highest-attention patches of A[k] that together carry ``mass`` (0.6) of its total

Both are nearest-upsampled by p to (H, W), so each patch is a p x p block. The grid (`attention_figure`):
top rows, the image then one heatmap of A[k] per head (viridis, each head scaled to its own range);
bottom rows, the image with the union of all masks, then each head's mask (red tint, white outline).
More than `HEADS_PER_ROW` heads wrap onto further rows; unused cells are blank. One PNG per input
image, ``<out>/attention_<stem>.png`` (``_2``, ``_3``... when stems clash); with a ``model_name``
(the report draws "random init" beside the trained model) ``<out>/attention_<model-name>_<stem>.png``
("random-init"), the name leading the figure's title. 480 x 480 with p = 8 is 3600 tokens: the last
block's (heads, 3601, 3601) attention matrix fits on the CPU.
"""
from __future__ import annotations

import argparse
import math
import re
import textwrap
from pathlib import Path

import torch

from analysis.figures import FigureFile, FigureSet, overlay, plt, print_outcome, save_figure, to_uint8
from common.errors import UserError, run_cli
from common.progress import progress_bar
from data.imagefolder import IMAGE_EXTENSIONS, images_directly_in, load_rgb
from evaluate.attention_masks import RESIZE_MODES, AttentionMaps, attention_maps
from evaluate.features import default_device
from evaluate.model_source import add_device_argument, add_model_arguments, load_model

HEADS_PER_ROW = 6  # ViT-S/8, the paper's figure, has 6 heads: one row each for heatmaps and masks
TILE_INCHES = 2.0
HEATMAP_COLORMAP = "viridis"
MASK_OUTLINE = "white"  # drawn around each mask: the red tint alone is weak on red or dark images
TITLE_CHARS_PER_INCH = 13
PNG_DPI = 120
IMAGE_HINT = f"pass image files ({', '.join(IMAGE_EXTENSIONS)}) or folders that hold them"


def attention_figure(maps: AttentionMaps, title: str = ""):
    """A matplotlib figure of one image's per-head attention heatmaps (top) and mass masks (bottom).

    Panels are labelled (``Axes.get_label()``) ``attention k`` / ``mask k`` for head k, ``image`` and
    ``union of masks``; their titles read ``head k``. Heatmap panel data: ``maps.pixel_attentions[k]``
    (H, W); mask panel data: ``overlay(image, maps.pixel_masks[k])`` (H, W, 3) uint8.
    """
    rgb = to_uint8(maps.image)
    heatmaps, masks = maps.pixel_attentions, maps.pixel_masks
    heads = len(heatmaps)
    heads_per_row = min(heads, HEADS_PER_ROW)
    band = math.ceil(heads / heads_per_row)  # rows of heatmaps; as many rows of masks below them
    columns = 1 + heads_per_row
    title_lines = textwrap.wrap(title, int(TITLE_CHARS_PER_INCH * TILE_INCHES * columns))
    fig, axes = plt.subplots(2 * band, columns, squeeze=False, layout="constrained",
                             figsize=(TILE_INCHES * columns, TILE_INCHES * 2 * band + 0.2 * len(title_lines)))
    for axis in axes.flat:
        axis.axis("off")

    def draw(axis, picture, caption: str, label: str, **style):
        axis.imshow(picture, interpolation="nearest", **style)
        axis.set_title(caption, fontsize=9)
        axis.set_label(label)

    def draw_mask(axis, mask, caption: str, label: str):
        draw(axis, overlay(rgb, mask), caption, label)
        if mask.any() and not mask.all():
            axis.contour(mask, levels=[0.5], colors=MASK_OUTLINE, linewidths=0.8)

    draw(axes[0][0], rgb, "image", "image")
    draw_mask(axes[band][0], masks.any(axis=0), "all heads' masks", "union of masks")
    for head in range(heads):
        row, column = divmod(head, heads_per_row)
        draw(axes[row][1 + column], heatmaps[head], f"head {head}", f"attention {head}", cmap=HEATMAP_COLORMAP)
        draw_mask(axes[band + row][1 + column], masks[head], f"head {head}", f"mask {head}")
    if title_lines:
        fig.suptitle("\n".join(title_lines), fontsize=10)
    return fig


def image_files(inputs) -> tuple[list[Path], list[str]]:
    """The image files ``inputs`` name (a folder: its image files, sorted, not recursive), and one problem
    line per input that names none (missing path, folder without images)."""
    files, problems = [], []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = images_directly_in(str(entry))
            files.extend(map(Path, found))
            if not found:
                problems.append(f"folder '{entry}' holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
        elif entry.exists():
            files.append(entry)
        else:
            problems.append(f"'{entry}' does not exist")
    return files, problems


def unique_name(stem: str, taken: set[str], prefix: str = "attention") -> str:
    """``<prefix>_<stem>.png``, or ``<prefix>_<stem>_2.png``, ``_3``... when already in ``taken``; added to it."""
    name, copy = f"{prefix}_{stem}.png", 1
    while name in taken:
        copy += 1
        name = f"{prefix}_{stem}_{copy}.png"
    taken.add(name)
    return name


def file_prefix(model_name: str) -> str:
    """``attention``, or ``attention_<model name>`` with every run of non-alphanumerics as one '-'."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model_name).strip("-")
    return f"attention_{slug}" if slug else "attention"


def attention_figures(model: torch.nn.Module, images, out_dir, image_size: int = 480, resize: str = "square",
                      mass: float = 0.6, device=None, progress: bool = True, model_name: str = "") -> FigureSet:
    """One `attention_figure` PNG per image that ``images`` (files or folders) name, written to ``out_dir``
    (named and titled after ``model_name`` when given: see the module docstring).

    Inputs that cannot be drawn (missing, not an image, corrupt, empty folder) are skipped with one line each
    in ``problems``; a `UserError` when nothing at all was drawn, or when ``model`` is not a ViT.
    """
    if not hasattr(model, "get_last_selfattention") or not hasattr(model, "patch_size"):
        raise UserError(f"attention maps need a ViT backbone, not {type(model).__name__}: "
                        "pass a ViT checkpoint or --arch vit_small/vit_base")
    if resize not in RESIZE_MODES or not 0 < mass <= 1:
        raise UserError(f"--resize must be one of {RESIZE_MODES} and --mass in (0, 1] (got {resize}, {mass})")
    images = [images] if isinstance(images, (str, Path)) else list(images)
    files, problems = image_files(images)
    model = model.float().eval().to(device or default_device())
    figures, taken = [], set()
    for path in progress_bar(files, desc="attention figures", unit="img", disable=not progress):
        try:
            image = load_rgb(path)
        except UserError as error:
            problems.append(str(error))
            continue
        maps = attention_maps(model, image, image_size, resize, mass)
        heads, rows, cols = maps.attentions.shape
        height, width = maps.image.shape[1:]
        title = (f"{model_name + ': ' if model_name else ''}{path.name}: last-block [CLS] attention, "
                 f"{width}x{height} px, patch {maps.patch_size}; masks keep {mass:.0%} of each head's attention")
        written = save_figure(attention_figure(maps, title),
                              Path(out_dir) / unique_name(path.stem, taken, file_prefix(model_name)), dpi=PNG_DPI)
        figures.append(FigureFile(written, f"{model_name}: {path.name}" if model_name else path.name,
                                  f"{heads} heads of the last block: [CLS] attention over the {rows}x{cols} "
                                  f"patches of {width}x{height} px (patch {maps.patch_size}), and each head's "
                                  f"top patches holding {mass:.0%} of its attention"))
    if not figures:
        named = ", ".join(f"'{entry}'" for entry in images[:3]) + (" ..." if len(images) > 3 else "")
        first = problems[0] if problems else "no input given"
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"no attention figure drawn from {named}: {first}{more}; {IMAGE_HINT}")
    return FigureSet(figures, problems)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.attention",
                                     description="per-head last-block [CLS] attention maps and their mass masks, "
                                                 "one PNG grid per image (fp32)")
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or folders of images")
    parser.add_argument("--out", default=None, help="output folder (default results/<run>/attention)")
    parser.add_argument("--image-size", type=int, default=480, help="resize side (default 480)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="square",
                        help="square: exactly image-size x image-size (default); short-side: aspect kept")
    parser.add_argument("--mass", type=float, default=0.6, help="attention mass each head's mask keeps (default 0.6)")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    source = load_model(args)
    out_dir = Path(args.out or source.results_dir("attention"))
    result = attention_figures(source.model, args.images, out_dir, args.image_size, args.resize, args.mass,
                               args.device, progress=not args.no_progress)
    return print_outcome(result)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
