"""The demo preset learns: a short seeded run on a slice of the suite beats its random twin on 20-NN.

The run is the ``demo`` preset (its model, head, crops, jitter, lr), shortened
to ``EPOCHS`` epochs of a 1,500-image slice of the suite (460 steps, about
55 s of training on 2 cores), with the teacher momentum held at ``MOMENTUM``
so that the teacher follows its student within so short a run, and without
the preset's inversion of local crops (``local_invert_p`` 0): the inversion
pays off over the demo's 2,944 steps but slows the first few hundred; in
this 460-step run the teacher ended below its twin with it (margins -3.0,
-0.67, -0.67 for seeds 0, 1, 2; momentum 0.95 or lr 0.008 instead: -5.0,
-10.67). Its trained
teacher and its random twin (the same architecture with the seed's initial
weights, as ``make demo`` scores it) are scored by the same weighted 20-NN
on the slice's val split. The
margin asserted is a fixed number set below the margin measured on this
kind of machine (see ``MEASURED_MARGIN``): a recipe that stops learning, or a
change that breaks the trainer's arithmetic, falls under it.
"""
from __future__ import annotations

import torch

from data.suite_classification import write_classification
from evaluate.knn import run_knn
from evaluate.model_source import load_model_source
from pretrain.config import resolve
from pretrain.distributed import DistInfo
from pretrain.trainer import Trainer

TRAIN_PER_CLASS, VAL_PER_CLASS = 150, 30
EPOCHS = 20
# a 460-step run: the teacher must follow the student within it (the preset's 0.995 averages ~200 steps)
MOMENTUM = 0.98
# 20-NN top-1 points of the teacher over its random twin, measured on 2 cores: 15.67 (teacher 33.00, twin
# 17.33) with seed 0 and 2 threads; the same run with 1 thread 8.33, seeds 1 and 2 16.67 and 10.00 (a short
# run's outcome moves with the rounding), so the bar sits below all of them and far above no learning (~0)
MEASURED_MARGIN = 15.67
REQUIRED_MARGIN = 6.0


def test_demo_preset_teacher_beats_its_random_twin_on_knn(tmp_path):
    # the run's arithmetic depends on the thread count: conftest sets min(2, cores) and restores it after
    # every test (keep_torch_threads), so an earlier test cannot leave another one here
    write_classification(tmp_path / "suite", n_train_per_class=TRAIN_PER_CLASS, n_val_per_class=VAL_PER_CLASS,
                         seed=0, progress=False)
    data = tmp_path / "suite" / "classification"
    cfg = resolve("demo", data=str(data / "train"), output_dir=str(tmp_path / "run"), epochs=EPOCHS, knn_every=0,
                  momentum_teacher=MOMENTUM, momentum_teacher_end=MOMENTUM, local_invert_p=0.0, num_workers=0,
                  seed=0)
    Trainer(cfg, DistInfo()).fit()
    checkpoint = tmp_path / "run" / "checkpoint.pth"

    top1 = {}
    for name, ckpt, random_like in (("teacher", checkpoint, None), ("random twin", None, checkpoint)):
        subject = load_model_source(ckpt, random_like=random_like, seed=0)
        scores = run_knn(subject.model, str(data), image_size=cfg.global_crops_size, ks=(20,), num_workers=0,
                         device=torch.device("cpu"))
        top1[name] = scores[20][0]
    margin = top1["teacher"] - top1["random twin"]
    print(f"20-NN top-1 on the slice: {top1}, margin {margin:.2f}")  # shown with pytest -s
    assert margin >= REQUIRED_MARGIN, f"20-NN top-1: {top1} (margin {margin:.2f} < {REQUIRED_MARGIN})"
