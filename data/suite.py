"""Command line of the embedded default suite: ``python -m data.suite --out data/suite`` (``make data``).

No dataset can be downloaded on a fresh machine, so this writes a small
seeded synthetic suite, one folder per protocol, each in the layout of the
real dataset it stands in for, so that the evaluators read it through the same
code path as the real data (docs/design.md, "The embedded default suite"):

* ``<out>/classification/``: ImageFolder, ``{train,val}/<class>/<index>.png``
  (data/suite_classification.py);
* ``<out>/retrieval/``: revisitop, ``rsynth/jpg/*.jpg`` and
  ``rsynth/gnd_rsynth.pkl`` (data/suite_retrieval.py);
* ``<out>/copydays/``: INRIA Copydays, ``original/``, ``strong/``,
  ``jpegqual/<q>/``, ``crops/<c>/``, ``distractors/``, ``whitening/``
  (data/suite_copydays.py);
* ``<out>/davis/``: DAVIS 2017, ``JPEGImages/480p/<seq>/``,
  ``Annotations/480p/<seq>/``, ``ImageSets/2017/`` (data/suite_davis.py);
* ``<out>/voc/``: PASCAL VOC 2012, ``VOC2012/{JPEGImages,
  SegmentationClass,SegmentationObject,ImageSets/Segmentation}/``
  (data/suite_voc.py).

Each part folder also holds ``SUITE.json``, its parameters; a part whose
SUITE.json matches is left alone (unless ``--force``), so a second run is
quick. ``--parts`` picks some parts; every part's parameters are checked
before anything is written. Parts other than classification are written at
their default sizes; ``--seed`` applies to every part.
"""

import argparse
import os
import time

from common.errors import UserError, run_cli
from data import suite_classification, suite_copydays, suite_davis, suite_retrieval, suite_voc
from data.suite_common import is_up_to_date

PART_NAMES = ("classification", "retrieval", "copydays", "davis", "voc")


def _parse_parts(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(PART_NAMES)
    if not names or any(name not in PART_NAMES for name in names):
        raise UserError(f"invalid --parts {text!r}: pass a comma-separated list of {', '.join(PART_NAMES)}, "
                        f"or all")
    return [name for name in PART_NAMES if name in names]


def _part_plans(args, parts: list) -> list:
    """(name, parameters, write(progress, force), describe) per part, all checked before anything is written."""
    scene_parts = {  # name: (parameters(seed=...), write(root, seed=..., progress=..., force=...), describe)
        "retrieval": (suite_retrieval.retrieval_parameters, suite_retrieval.write_retrieval, suite_retrieval.describe),
        "copydays": (suite_copydays.copydays_parameters, suite_copydays.write_copydays, suite_copydays.describe),
        "davis": (suite_davis.davis_parameters, suite_davis.write_davis, suite_davis.describe),
        "voc": (suite_voc.voc_parameters, suite_voc.write_voc, suite_voc.describe)}
    plans = []
    for name in parts:
        if name == "classification":
            sizes = (args.train_per_class, args.val_per_class, args.image_size, args.seed)
            write_classification = suite_classification.write_classification
            plans.append((name, suite_classification.classification_parameters(*sizes),
                          lambda progress, force, sizes=sizes: write_classification(args.out, *sizes,
                                                                                    progress=progress, force=force),
                          suite_classification.describe))
        else:
            parameters, write, describe = scene_parts[name]
            plans.append((name, parameters(seed=args.seed),
                          lambda progress, force, write=write: write(args.out, seed=args.seed, progress=progress,
                                                                     force=force),
                          describe))
    return plans


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.suite",
                                     description="Write the embedded default suite (every part by default).")
    parser.add_argument("--out", default=os.path.join("data", "suite"), help="suite root folder")
    parser.add_argument("--parts", default="all",
                        help=f"comma-separated parts to write, of {', '.join(PART_NAMES)}; or all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=300, help="classification part")
    parser.add_argument("--val-per-class", type=int, default=100, help="classification part")
    parser.add_argument("--image-size", type=int, default=32, help="classification part")
    parser.add_argument("--force", action="store_true", help="regenerate even when SUITE.json matches")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    for name, parameters, write, describe in _part_plans(args, _parse_parts(args.parts)):
        started = time.perf_counter()
        folder = os.path.join(args.out, name)
        already_there = not args.force and is_up_to_date(folder, parameters)
        write(progress=not args.no_progress, force=args.force)
        action = f"{name} suite already up to date" if already_there else f"wrote {name} suite"
        print(f"{action}: {folder} ({describe(parameters)}) in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
