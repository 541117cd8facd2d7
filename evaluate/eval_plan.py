"""What ``make eval-all`` runs: the evaluators whose data is under a data root, and their settings.

Parts, each looked for as the first existing folder of its names under the data root:

    classification/ | imagenet/       train/<class>/ + val/<class>/  -> knn, linear   (table2_linear_knn)
    retrieval/ | revisitop/ | (root)  <name>/gnd_<name>.pkl + jpg/   -> retrieval:<name>, one per dataset
                                                                        (table3_retrieval)
    copydays/                         original/, strong/, ...        -> copy_detection (table4_copy_detection)
                                      distractors/ and whitening/ are used when present, inside
                                      copydays/ (the suite's layout) or beside it
    davis/ | DAVIS/                   DAVIS-2017 480p layout          -> davis          (table5_davis)
    voc/ | VOCdevkit/ | VOC2012/      VOC2012 segmentation layout     -> voc            (voc_attention_jaccard)

Settings. A part without ``SUITE.json`` is real data and gets the paper's
settings (docs/protocols.md, "Evaluators"); a part written by ``python -m data.suite`` (it has
``SUITE.json``) gets the same protocol scaled to its image sizes (p = the
patch size; only k-NN and linear may enlarge images, to the crop the model
was trained at):

    evaluator       real data (paper)                               embedded suite
    knn             Resize 256 + CenterCrop 224, k 10/20/100/200,   crop = the checkpoint's global crop size
                    T 0.07 (k = 20 in the table)                     (else the suite's image size)
    linear          224 crops, 100 epochs, batch 1024, base lr       same crop as knn; cached features of the
                    1e-3, augmented crops re-extracted each epoch    val view (no augmentation), 100 epochs,
                                                                    batch 256, base lr swept over 1e-3, 1e-2,
                                                                    1e-1 (the best val top-1 is kept)
    retrieval       roxford5k: thumbnail 224, one scale;             thumbnail = the images' long side (128),
                    rparis6k: 512, multiscale (the README's);        one scale
                    any other dataset: 224, one scale
    copy_detection  square 224 (patch 16) / 320 (patch 8), the       square = the short side floored to a
                    resolutions of Table 4's DINO rows                multiple of p (96)
    davis           short side 480, long side a multiple of 64      short side = frame height floored to a
                                                                    multiple of p (72 for p = 8), long side a
                                                                    multiple of p
    voc             480 x 480, class masks, mass 0.6                square = the short side floored to a
                                                                    multiple of p (96), class masks, mass 0.6

`EvalOptions` overrides the linear probe's epochs and path and restricts the
evaluators (``only``). Every `Evaluation` carries its settings as JSON-ready
data: eval-all records them beside the tables and prints them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError, one_line_message

from .linear import BASE_LR, BATCH_SIZE, EPOCHS
from .retrieval import find_datasets

KINDS = ("knn", "linear", "retrieval", "copy_detection", "davis", "voc")
TABLES = {"knn": "table2_linear_knn", "linear": "table2_linear_knn", "retrieval": "table3_retrieval",
          "copy_detection": "table4_copy_detection", "davis": "table5_davis", "voc": "voc_attention_jaccard"}
PART_FOLDERS = {"classification": ("classification", "imagenet"), "retrieval": ("retrieval", "revisitop"),
                "copydays": ("copydays",), "davis": ("davis", "DAVIS"), "voc": ("voc", "VOCdevkit", "VOC2012")}
KNN_KS = (10, 20, 100, 200)
KNN_TABLE_K = 20
DAVIS_METRICS = ("J&F_mean", "J_mean", "F_mean", "J_recall", "J_decay", "F_recall", "F_decay")
# Real retrieval datasets: (thumbnail size, multiscale) as the official README runs them.
RETRIEVAL_PAPER = {"roxford5k": (224, False), "rparis6k": (512, True)}
# The suite's linear probe: cached features make an epoch cost milliseconds, so the base lr is swept as
# the paper sweeps it per model (the best val top-1 is kept); the batch is scaled to the suite's 3,000
# training images (lr = base lr * batch / 256). Real data: the official default lr, one run.
SUITE_LINEAR = {"epochs": EPOCHS, "batch_size": 256, "base_lrs": [1e-3, 1e-2, 1e-1]}


@dataclass(frozen=True)
class EvalOptions:
    """Overrides of the planned settings. ``only``: evaluator kinds to run (None: all).
    ``linear_epochs`` / ``linear_cached``: the probe's epochs and path (None: per the data)."""
    only: tuple[str, ...] | None = None
    linear_epochs: int | None = None
    linear_cached: bool | None = None

    def __post_init__(self):
        unknown = [kind for kind in self.only or () if kind not in KINDS]
        if unknown:
            raise UserError(f"unknown evaluator(s) {', '.join(unknown)}: choose among {', '.join(KINDS)}")
        if self.linear_epochs is not None and self.linear_epochs < 1:
            raise UserError(f"linear epochs must be at least 1, got {self.linear_epochs}")


@dataclass(frozen=True)
class ModelInfo:
    """What the plan needs to know of the model: patch, embedding width, training crop, training data."""
    arch: str
    patch: int | None
    embed_dim: int
    crop_size: int | None = None
    train_data: str = ""


@dataclass(frozen=True)
class Evaluation:
    """One evaluator run: ``name`` is unique in a plan (``retrieval:<dataset>`` for retrieval)."""
    kind: str
    name: str
    data: str
    suite: dict | None
    settings: dict
    descriptors: dict = field(default_factory=dict)
    metrics: tuple[str, ...] = ()

    @property
    def table(self) -> str:
        return TABLES[self.kind]

    def identity(self) -> dict:
        """What makes a recorded result reusable: data folder, suite parameters, settings."""
        suite = hashlib.sha256(json.dumps(self.suite, sort_keys=True).encode()).hexdigest()[:16] \
            if self.suite else None
        return {"data": os.path.abspath(self.data), "suite": suite, "settings": self.settings}

    def describe(self) -> str:
        """One line: where the settings come from and their values."""
        values = ", ".join(f"{key} {value}" for key, value in self.settings.items()
                           if key not in ("distractors", "whitening"))
        return f"{'suite-scaled' if self.suite else 'paper'} settings: {values}"


def read_suite(folder: Path) -> dict | None:
    """The part's SUITE.json (it was written by data.suite), or None for real data."""
    path = folder / "SUITE.json"
    if not path.is_file():
        return None
    try:
        parameters = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"'{path}' is not readable JSON ({error}): regenerate the suite "
                        "(python -m data.suite --force)") from None
    if not isinstance(parameters, dict):
        raise UserError(f"'{path}' does not hold a JSON object: regenerate the suite (python -m data.suite --force)")
    return parameters


def suite_size(suite: dict, key: str = "image_size") -> tuple[int, int]:
    """(width, height) of a suite part's images (a square side for the classification part)."""
    size = suite.get(key)
    if isinstance(size, int):
        return size, size
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(side, int) for side in size)):
        raise UserError(f"SUITE.json has no valid '{key}' ({size!r}): "
                        "regenerate the suite (python -m data.suite --force)")
    return size[0], size[1]


def floor_to_patch(side: int, patch: int | None) -> int:
    """``side`` floored to a multiple of the patch, at least one patch."""
    patch = patch or 1
    return max(patch, side // patch * patch)


def plan_classification(folder: Path, suite, model: ModelInfo, options: EvalOptions) -> list[Evaluation]:
    size = (model.crop_size or suite_size(suite)[0]) if suite else 224
    knn = Evaluation("knn", "knn", str(folder), suite,
                     {"image_size": size, "ks": list(KNN_KS), "temperature": 0.07},
                     metrics=("knn_top1", "knn_top5"))
    cached = options.linear_cached if options.linear_cached is not None else bool(suite)
    epochs = options.linear_epochs or (SUITE_LINEAR["epochs"] if suite else EPOCHS)
    batch = SUITE_LINEAR["batch_size"] if suite else BATCH_SIZE
    base_lrs = SUITE_LINEAR["base_lrs"] if suite else [BASE_LR]
    linear = Evaluation("linear", "linear", str(folder), suite,
                        {"image_size": size, "epochs": epochs, "batch_size": batch, "base_lrs": base_lrs,
                         "cached_features": cached}, metrics=("linear_top1", "linear_top5"))
    return [knn, linear]


def plan_retrieval(folder: Path, suite, model: ModelInfo, options: EvalOptions) -> list[Evaluation]:
    evaluations = []
    for dataset in find_datasets(folder):
        imsize, multiscale = (max(suite_size(suite)), False) if suite else RETRIEVAL_PAPER.get(dataset, (224, False))
        evaluations.append(Evaluation("retrieval", f"retrieval:{dataset}", str(folder), suite,
                                      {"dataset": dataset, "imsize": imsize, "multiscale": multiscale},
                                      {"train_data": model.train_data},
                                      (f"{dataset}_mAP_medium", f"{dataset}_mAP_hard")))
    return evaluations


def plan_copy_detection(folder: Path, suite, model: ModelInfo, options: EvalOptions) -> list[Evaluation]:
    imsize = floor_to_patch(min(suite_size(suite)), model.patch) if suite else (320 if model.patch == 8 else 224)
    extras = {}
    for name in ("distractors", "whitening"):
        candidates = [folder / name, folder.parent / name]
        extras[name] = next((str(path) for path in candidates if path.is_dir()), None)
    return [Evaluation("copy_detection", "copy_detection", str(folder), suite, {"imsize": imsize, **extras},
                       {"dim": 2 * model.embed_dim, "resolution": f"{imsize}x{imsize}"}, ("copydays_strong_mAP",))]


def plan_davis(folder: Path, suite, model: ModelInfo, options: EvalOptions) -> list[Evaluation]:
    if suite:
        settings = {"frame_height": floor_to_patch(min(suite_size(suite, "frame_size")), model.patch),
                    "side_multiple": model.patch or 1}
    else:
        settings = {"frame_height": 480, "side_multiple": 64}
    return [Evaluation("davis", "davis", str(folder), suite, settings, {"train_data": model.train_data},
                       DAVIS_METRICS)]


def plan_voc(folder: Path, suite, model: ModelInfo, options: EvalOptions) -> list[Evaluation]:
    size = floor_to_patch(min(suite_size(suite)), model.patch) if suite else 480
    return [Evaluation("voc", "voc", str(folder), suite,
                       {"image_size": size, "resize": "square", "masks": "class", "mass": 0.6},
                       {"mass": "0.6"}, ("voc12_jaccard",))]


PLANNERS = {"classification": plan_classification, "retrieval": plan_retrieval, "copydays": plan_copy_detection,
            "davis": plan_davis, "voc": plan_voc}
PART_KINDS = {"classification": ("knn", "linear"), "retrieval": ("retrieval",), "copydays": ("copy_detection",),
              "davis": ("davis",), "voc": ("voc",)}


def find_part(root: Path, part: str) -> Path | None:
    """The part's folder under ``root``; for retrieval also ``root`` itself when it holds gnd pickles."""
    for name in PART_FOLDERS[part]:
        if (root / name).is_dir():
            return root / name
    if part == "retrieval" and any((entry / f"gnd_{entry.name}.pkl").is_file()
                                   for entry in root.iterdir() if entry.is_dir()):
        return root
    return None


def plan(data_root, model: ModelInfo, options: EvalOptions = EvalOptions()):
    """(evaluations, failures) for the parts under ``data_root``; a failure is (part, one-line reason).

    Raises UserError when ``data_root`` is missing or holds none of the parts.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise UserError(f"data root '{root}' is not a folder: pass DATA_ROOT=<folder holding classification/, "
                        "retrieval/, copydays/, davis/, voc/> (make data writes data/suite)")
    evaluations, failures = [], []
    for part, planner in PLANNERS.items():
        wanted = [kind for kind in PART_KINDS[part] if options.only is None or kind in options.only]
        folder = find_part(root, part) if wanted else None
        if folder is None:
            continue
        try:
            evaluations += [evaluation for evaluation in planner(folder, read_suite(folder), model, options)
                            if evaluation.kind in wanted]
        except UserError as error:
            failures.append((part, one_line_message(error)))
    if not evaluations and not failures:
        looked_for = ", ".join("|".join(names) + "/" for names in PART_FOLDERS.values())
        raise UserError(f"data root '{root}' holds none of the evaluation parts ({looked_for}): "
                        "run 'make data' for the embedded suite or pass DATA_ROOT=<folder with them>")
    return evaluations, failures

