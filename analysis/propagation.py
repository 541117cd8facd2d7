"""DAVIS label-propagation overlays: the masks ``make eval-all`` propagated, beside the ground truth.

``davis_<sequence>.png`` (`propagation_figures`): a 2 x F grid of F frames
evenly spaced over the sequence, the first (whose annotation is given) and
the last included. Top row: the frame with its ground-truth objects
overlaid; bottom row: the same frame with the predicted objects overlaid.
The frame is shown in grey (its luminance) so that the colours stand out;
object l (1..N) is blended into it at 60 % in the DAVIS palette's colour
for l (1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), ...:
`data.davis.davis_palette`, the colours the annotation PNGs carry);
background 0 and void 255 stay grey. Bottom labels: the frame's J (region
IoU) and F (boundary F-measure), each the mean over the sequence's N
objects (N = the first annotation's largest label, as the DAVIS scorer
counts them), computed by `evaluate.metrics.score_sequence`; frame 0 is the
given annotation (J = F = 1).

Inputs: the DAVIS tree (`data.davis.Davis`: ImageSets/2017/<split>.txt,
JPEGImages/480p, Annotations/480p) and the predictions folder
`evaluate.video_segmentation` writes (``results/<run>/davis/<sequence>/<frame>.png``:
palette PNGs of label indices at the frame's size). Frames are drawn at
their own size; masks are never resampled.

    python -m analysis.propagation --davis data/suite/davis --predictions results/demo/davis  # -> results/demo/figures
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from common.errors import UserError, one_line_message, run_cli
from data.davis import Davis, davis_palette
from data.index_masks import object_labels, read_index_mask
from evaluate.metrics import score_sequence

from .figures import FigureFile, FigureSet, overlay, print_outcome, save_figure, tile_grid, to_uint8

OVERLAY_ALPHA = 0.6


@dataclass
class FramePanel:
    """One column of a sequence's figure: the frame's name, its two overlaid images (H, W, 3) uint8, J and F."""
    name: str
    ground_truth: np.ndarray
    prediction: np.ndarray
    j: float
    f: float


def grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> its luminance (ITU-R 601-2, as PIL's "L") in all three channels."""
    return np.repeat(np.asarray(PIL.Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)


def overlay_labels(rgb: np.ndarray, label_map: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``rgb`` (H, W, 3) with each object label l of ``label_map`` (H, W) blended in the DAVIS colour of l."""
    palette = davis_palette()
    for label in object_labels(label_map):
        rgb = overlay(rgb, label_map == label, tuple(int(value) for value in palette[label]), alpha)
    return rgb


def frame_indices(n_frames: int, count: int) -> list[int]:
    """``count`` frame indices evenly spaced over 0..n_frames-1, first and last included (fewer if n_frames is)."""
    return sorted({int(index) for index in np.linspace(0, n_frames - 1, min(count, n_frames)).round()})


def read_prediction(path: Path, shape: tuple[int, int], sequence: str) -> np.ndarray:
    """The (H, W) label map at ``path``; UserError when it is missing or not the annotation's size."""
    if not path.is_file():
        raise UserError(f"sequence '{sequence}' has no prediction '{path}': re-run make eval-all")
    prediction = read_index_mask(path)
    if prediction.shape != shape:
        raise UserError(f"prediction '{path}' is {prediction.shape[1]}x{prediction.shape[0]} but the annotation is "
                        f"{shape[1]}x{shape[0]}: re-run make eval-all")
    return prediction


def sequence_panels(davis: Davis, predictions_dir, sequence: str, frames: int = 4) -> list[FramePanel]:
    """The panels of ``frames`` evenly spaced frames of ``sequence``; UserError if its predictions are missing."""
    folder = Path(predictions_dir) / sequence
    if not folder.is_dir():
        raise UserError(f"no predictions for sequence '{sequence}' in '{predictions_dir}': "
                        f"run make eval-all (or evaluate.video_segmentation --sequences {sequence})")
    names = davis.frame_names(sequence)
    chosen = frame_indices(len(names), frames)
    ground_truths = np.stack([davis.load_annotation(sequence, index) for index in chosen])
    predictions = np.stack([read_prediction(folder / f"{names[index]}.png", ground_truths.shape[1:], sequence)
                            for index in chosen])
    n_objects = max(object_labels(ground_truths[0]), default=0)
    j_values, f_values = score_sequence(ground_truths, predictions, n_objects)  # (n_objects, len(chosen))
    panels = []
    for column, index in enumerate(chosen):
        rgb = grey(to_uint8(davis.load_frame(sequence, index)))
        panels.append(FramePanel(names[index], overlay_labels(rgb, ground_truths[column]),
                                 overlay_labels(rgb, predictions[column]),
                                 float(j_values[:, column].mean()) if n_objects else float("nan"),
                                 float(f_values[:, column].mean()) if n_objects else float("nan")))
    return panels


def draw_sequence(panels: list[FramePanel], sequence: str, out_dir) -> FigureFile:
    """Write ``davis_<sequence>.png``: ground truth on top, prediction below, one column per panel."""
    rows = [[(panel.ground_truth, f"{panel.name} ground truth") for panel in panels],
            [(panel.prediction, f"prediction J {panel.j:.2f} F {panel.f:.2f}") for panel in panels]]
    fig = tile_grid(rows, tile_inches=2.0, title=f"DAVIS {sequence}: label propagation from frame {panels[0].name}")
    path = save_figure(fig, Path(out_dir) / f"davis_{sequence}.png")
    caption = (f"{len(panels)} frames of '{sequence}' (frame {panels[0].name} is the given annotation), in grey. "
               "Top: ground truth, bottom: masks propagated with the frozen backbone's patch features, each object "
               "in its DAVIS palette colour; J (IoU) and F (boundary) per frame, mean over the objects.")
    return FigureFile(path, f"DAVIS label propagation: {sequence}", caption)


def propagation_figures(davis_root, predictions_dir, out_dir, sequences: int | list[str] = 2, frames: int = 4,
                        split: str = "val") -> FigureSet:
    """Draw ``davis_<sequence>.png`` for ``sequences`` sequences of ``split`` (a count: the split's first ones
    that have predictions; or a list of names). A sequence without predictions is one problem line."""
    predictions_dir = Path(predictions_dir)
    if not predictions_dir.is_dir() or not any(entry.is_dir() and not entry.name.startswith(".")
                                               for entry in predictions_dir.iterdir()):
        raise UserError(f"no DAVIS predictions in '{predictions_dir}': run make eval-all first")
    if frames < 1 or (isinstance(sequences, int) and sequences < 1):
        raise UserError(f"frames and sequences must be at least 1, got {frames} and {sequences}")
    davis = Davis(davis_root, split)
    names, limit = (davis.sequences, sequences) if isinstance(sequences, int) else (list(sequences), len(sequences))
    figures, problems = [], []
    for sequence in names:
        if len(figures) >= limit:
            break
        if sequence not in davis.sequences:
            problems.append(f"sequence '{sequence}' is not in '{davis.split_file}'")
            continue
        try:
            figures.append(draw_sequence(sequence_panels(davis, predictions_dir, sequence, frames), sequence, out_dir))
        except UserError as error:
            problems.append(one_line_message(error))
    return FigureSet(figures, problems)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.propagation",
                                     description="DAVIS label-propagation overlays: ground truth vs prediction")
    parser.add_argument("--davis", required=True,
                        help="DAVIS root (ImageSets/2017, JPEGImages/480p, Annotations/480p)")
    parser.add_argument("--predictions", required=True,
                        help="prediction folder make eval-all wrote (results/<run>/davis)")
    parser.add_argument("--out", default=None, help="figure folder (default: <predictions>/../figures)")
    parser.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default val)")
    parser.add_argument("--sequences", type=int, default=2,
                        help="how many sequences (the split's first ones with predictions)")
    parser.add_argument("--only", nargs="+", default=None, metavar="SEQUENCE", help="draw these sequences instead")
    parser.add_argument("--frames", type=int, default=4, help="frames per sequence, evenly spaced (default 4)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.predictions).parent / "figures"
    result = propagation_figures(args.davis, args.predictions, out, args.only or args.sequences, args.frames,
                                 args.split)
    return print_outcome(result)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
