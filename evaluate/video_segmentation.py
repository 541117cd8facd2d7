"""DAVIS-2017 semi-supervised video object segmentation by label propagation
(docs/protocols.md, "DAVIS video segmentation").

    python -m evaluate.video_segmentation --ckpt runs/demo/checkpoint.pth --davis /data/DAVIS
    python -m evaluate.video_segmentation --ckpt random --arch vit_small --patch 16 --davis /data/DAVIS \
        --sequences dog libby --output /tmp/davis_pred
    python -m evaluate.video_segmentation --ckpt runs/demo/checkpoint.pth --davis data/suite/davis --frame-height 72

Each sequence's first-frame annotation is propagated frame by frame with the
frozen backbone's last-layer patch tokens (the math is in
`evaluate.label_propagation`); predictions are written as palette PNGs
``<output>/<seq>/<frame>.png`` at the original frame size (the first frame's
annotation copied) and scored with `evaluate.metrics.davis_j_and_f`.

Frames (OpenCV, as the official code): read BGR; resize (bilinear) so that
the short side is ``--frame-height`` (480) and the long side is
floor(frame_height * long / short / m) * m with m = ``--side-multiple`` (64):
854x480 -> 832x480, 480x854 -> 480x832. Then /255, BGR -> RGB, mean
(0.485, 0.456, 0.406), std (0.228, 0.224, 0.225). ``--frame-height`` and m
must be multiples of the patch size.

Small frames (the embedded suite's 128x72 clips): the protocol would blow
them up to 832x480. Evaluate them at their own size with ``--frame-height
72`` (128 is already a multiple of 64, so 128x72 is kept; 72 needs a patch
of 4 or 8), or, for patch 16, ``--frame-height 64 --side-multiple 16``
(112x64). Everything else is the protocol unchanged.

Outputs and re-runs: a sequence's PNGs are written into a hidden staging
folder that is renamed into place once the sequence is complete, so an
interrupted run leaves only complete sequences, and a re-run skips them.
``<output>/settings.json`` records the weights and options; a re-run with
different ones stops (``--force`` deletes the old predictions and starts
over). Runs in fp32 with TF32 disabled.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from common.atomic import atomic_write_text
from common.errors import UserError, run_cli
from common.progress import ProgressBar, progress_bar
from data.davis import Davis, davis_palette
from data.index_masks import write_index_mask
from evaluate.features import default_device, weights_fingerprint
from evaluate.label_propagation import (
    DEFAULT_MAX_AFFINITY_ELEMENTS,
    ContextQueue,
    full_fp32_matmuls,
    one_hot_patch_labels,
    propagate_labels,
    soft_labels_to_index_map,
)
from evaluate.metrics import davis_j_and_f
from evaluate.model_source import add_evaluator_arguments, feature_extractor, load_model

FRAME_MEAN = (0.485, 0.456, 0.406)
FRAME_STD = (0.228, 0.224, 0.225)  # 0.228, not ImageNet's 0.229: the official DAVIS code's value
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class PropagationOptions:
    """The protocol's knobs; the defaults are the paper's."""
    frame_height: int = 480          # short side after resizing
    side_multiple: int = 64          # the long side is floored to a multiple of this
    n_last_frames: int = 7           # recent frames in the context, besides the first
    size_mask_neighborhood: int = 12  # r: sources within +-r patches of the target (<= 0: no restriction)
    topk: int = 5
    temperature: float = 0.1

    def check(self, patch_size: int) -> None:
        """Raise UserError unless the sizes fit the patch and the counts are positive."""
        for flag, value in (("--frame-height", self.frame_height), ("--side-multiple", self.side_multiple)):
            if value <= 0 or value % patch_size:
                raise UserError(f"{flag} {value} is not a positive multiple of the patch size {patch_size}: "
                                f"pick one (e.g. {patch_size * max(1, value // patch_size)})")
        if self.topk < 1 or self.n_last_frames < 0 or self.temperature <= 0:
            raise UserError(f"--topk must be >= 1, --n-last-frames >= 0 and --temperature > 0 "
                            f"(got {self.topk}, {self.n_last_frames}, {self.temperature})")


def resized_frame_size(width: int, height: int, short_side: int = 480, side_multiple: int = 64) -> tuple[int, int]:
    """(width', height') of a frame: short side -> ``short_side``, long side -> the aspect-kept length
    floored to a multiple of ``side_multiple`` (exact integer floor). Square frames count as landscape."""
    if height > width:
        return short_side, short_side * height // (width * side_multiple) * side_multiple
    return short_side * width // (height * side_multiple) * side_multiple, short_side


def load_frame(path, options: PropagationOptions) -> tuple[torch.Tensor, tuple[int, int]]:
    """(normalised (3, H', W') fp32 frame, original (width, height)) of the JPEG at ``path``."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise UserError(f"cannot decode frame '{path}': delete or replace it")
    height, width = bgr.shape[:2]
    size = resized_frame_size(width, height, options.frame_height, options.side_multiple)
    if min(size) <= 0:
        raise UserError(f"frame '{path}' ({width}x{height}) resizes to {size[0]}x{size[1]}: "
                        f"lower --side-multiple or raise --frame-height")
    rgb = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)[:, :, ::-1] / 255.0
    frame = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in (FRAME_MEAN, FRAME_STD))
    return (frame - mean) / std, (width, height)


def patch_features(model: torch.nn.Module, frame: torch.Tensor, device) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, D) last-block patch tokens (after the final LayerNorm, [CLS] dropped) and the (h, w) grid."""
    patch = model.patch_size
    tokens = model.get_intermediate_layers(frame[None].to(device), n=1)[0]
    return tokens[0, 1:], (frame.shape[1] // patch, frame.shape[2] // patch)


def propagate_sequence(model: torch.nn.Module, frame_paths: list, first_label_map: np.ndarray,
                       options: PropagationOptions, device="cpu",
                       max_affinity_elements: int = DEFAULT_MAX_AFFINITY_ELEMENTS):
    """Yield the predicted (H, W) uint8 label map of frames 1..T-1 of a sequence, in order.

    first_label_map: frame 0's (H, W) annotation (0 background, 1..N objects).
    """
    frame, _ = load_frame(frame_paths[0], options)
    features, grid = patch_features(model, frame, device)
    queue = ContextQueue(features, one_hot_patch_labels(first_label_map, grid).to(device), options.n_last_frames)
    for index, path in enumerate(frame_paths[1:], start=1):
        frame, original_size = load_frame(path, options)
        features, frame_grid = patch_features(model, frame, device)
        if frame_grid != grid:
            raise UserError(f"frame '{path}' gives a {frame_grid[1]}x{frame_grid[0]} patch grid but the first "
                            f"frame '{frame_paths[0]}' gives {grid[1]}x{grid[0]}: "
                            "a sequence's frames must share a size")
        soft_labels = propagate_labels(features, queue.features(), queue.labels(), grid,
                                       options.size_mask_neighborhood, options.topk, options.temperature,
                                       max_affinity_elements)
        queue.push(index, features, soft_labels)
        yield soft_labels_to_index_map(soft_labels, grid, model.patch_size, original_size)


def sequence_is_complete(output_dir: Path, sequence: str, frame_names: list) -> bool:
    return all((output_dir / sequence / f"{name}.png").is_file() for name in frame_names)


def move_into_place(staging: Path, final: Path) -> None:
    """Rename the folder ``staging`` to ``final``, replacing an existing ``final``."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        old.rmdir()
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)


def write_sequence(model, davis: Davis, sequence: str, first_label_map: np.ndarray, output_dir: Path,
                   options: PropagationOptions, device, progress: ProgressBar,
                   max_affinity_elements: int = DEFAULT_MAX_AFFINITY_ELEMENTS) -> None:
    """Propagate one sequence and write its PNGs; the folder appears only once complete."""
    names = davis.frame_names(sequence)
    staging = Path(tempfile.mkdtemp(prefix=f".{sequence}.", suffix=".partial", dir=output_dir))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the predictions from other users
    try:
        write_index_mask(staging / f"{names[0]}.png", first_label_map, davis_palette())
        progress.update()
        predictions = propagate_sequence(model, davis.frame_paths(sequence), first_label_map, options, device,
                                         max_affinity_elements)
        for name, prediction in zip(names[1:], predictions):
            write_index_mask(staging / f"{name}.png", prediction, davis_palette())
            progress.update()
        move_into_place(staging, output_dir / sequence)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def prepare_output(output_dir: Path, settings: dict, sequences: list, split_sequences: list, force: bool) -> None:
    """Check ``output_dir`` holds nothing made with other settings, record the settings.

    ``force`` deletes the predictions of ``sequences`` first, and those of every
    sequence of the split when the recorded settings differ (they are stale).
    """
    settings_path = output_dir / SETTINGS_FILE
    try:
        recorded = json.loads(settings_path.read_text()) if settings_path.is_file() else None
    except (OSError, ValueError):
        recorded = None  # unreadable: the predictions' origin is unknown
    existing = [name for name in split_sequences if (output_dir / name).exists()]
    if force:
        for name in existing:
            if recorded != settings or name in sequences:
                shutil.rmtree(output_dir / name)
    elif existing and recorded != settings:
        changed = ", ".join(sorted(k for k in settings if (recorded or {}).get(k) != settings[k]))
        raise UserError(f"output folder '{output_dir}' holds predictions made with other settings ({changed}): "
                        "pass --force to delete and recompute them, or choose another --output")
    atomic_write_text(settings_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def run_video_segmentation(model: torch.nn.Module, davis_root, output_dir, split: str = "val",
                           sequences: list | None = None, options: PropagationOptions = PropagationOptions(),
                           force: bool = False, device=None, progress: bool = True,
                           max_affinity_elements: int = DEFAULT_MAX_AFFINITY_ELEMENTS) -> dict:
    """Propagate every (or each named) sequence of ``split``, write the PNGs, score them.

    Returns percentages {'J&F_mean', 'J_mean', 'F_mean', 'J_recall', 'J_decay',
    'F_recall', 'F_decay'}. Sequences whose PNGs are all in ``output_dir``
    already are not recomputed; settings.json identifies the weights by
    `evaluate.features.weights_fingerprint`.
    """
    if not hasattr(model, "get_intermediate_layers") or not hasattr(model, "patch_size"):
        raise UserError(f"DAVIS label propagation needs a ViT backbone (patch tokens), not {type(model).__name__}")
    options.check(model.patch_size)
    davis = Davis(davis_root, split)
    sequences = list(sequences or davis.sequences)
    unknown = [name for name in sequences if name not in davis.sequences]
    if unknown:
        raise UserError(f"sequence(s) {', '.join(unknown)} not in '{davis.split_file}': "
                        f"choose among {', '.join(davis.sequences)}")
    first_label_maps = {name: davis.load_first_annotation(name) for name in sequences}  # checks sizes up front
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"weights_sha256": weights_fingerprint(model), "patch_size": model.patch_size, **asdict(options)}
    prepare_output(output_dir, settings, sequences, davis.sequences, force)
    todo = [name for name in sequences if not sequence_is_complete(output_dir, name, davis.frame_names(name))]
    device = device or default_device()
    model = model.float().eval().to(device)
    total = sum(len(davis.frame_names(name)) for name in todo)
    with full_fp32_matmuls(), torch.inference_mode(), \
            progress_bar(total=total, desc="davis", unit="frame", disable=not progress) as bar:
        for name in todo:
            bar.set_postfix_str(name)
            write_sequence(model, davis, name, first_label_maps[name], output_dir, options, device, bar,
                           max_affinity_elements)
    scores = davis_j_and_f(davis.root, output_dir, split, sequences)
    return {"J&F_mean": scores["J&F"], "J_mean": scores["J"], "F_mean": scores["F"],
            "J_recall": scores["J-Recall"], "J_decay": scores["J-Decay"],
            "F_recall": scores["F-Recall"], "F_decay": scores["F-Decay"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.video_segmentation",
                                     description="DAVIS-2017 label propagation with frozen patch features "
                                                 "(always fp32: --fp32, --batch-size and the cache flags do not apply)")
    parser.add_argument("--davis", required=True, help="DAVIS root (ImageSets/2017, JPEGImages/480p, Annotations/480p)")
    parser.add_argument("--output", default=None, help="prediction folder (default results/<run>/davis)")
    parser.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default val)")
    parser.add_argument("--sequences", nargs="+", default=None, help="only these sequences of the split")
    defaults = PropagationOptions()
    parser.add_argument("--frame-height", type=int, default=defaults.frame_height,
                        help="short side of the resized frames (default 480; small frames: their own height)")
    parser.add_argument("--side-multiple", type=int, default=defaults.side_multiple,
                        help="the long side is floored to a multiple of this (default 64)")
    parser.add_argument("--n-last-frames", type=int, default=defaults.n_last_frames)
    parser.add_argument("--size-mask-neighborhood", type=int, default=defaults.size_mask_neighborhood)
    parser.add_argument("--topk", type=int, default=defaults.topk)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--force", action="store_true", help="delete earlier predictions in --output and recompute")
    add_evaluator_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    source = load_model(args)
    extractor = feature_extractor(source, args)
    options = PropagationOptions(args.frame_height, args.side_multiple, args.n_last_frames,
                                 args.size_mask_neighborhood, args.topk, args.temperature)
    output = args.output or source.results_dir("davis")  # davis-random-init for --random-like
    scores = run_video_segmentation(extractor.model, args.davis, output, args.split, args.sequences, options,
                                    args.force, extractor.device, extractor.progress)
    print(f"J&F {scores['J&F_mean']:.2f}  J {scores['J_mean']:.2f}  F {scores['F_mean']:.2f}  "
          f"(predictions in {output})")
    if args.json:
        atomic_write_text(args.json, json.dumps(scores, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
