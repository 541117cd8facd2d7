"""Named training recipes: the settings each preset changes, what it reproduces, and where each setting
comes from.

A preset is a set of overrides on `pretrain.config.TrainConfig` (whose defaults are the official code's
``main_dino.py`` defaults), plus what the recipe was run with: the architectures it describes and the
global batch of the run behind its figure. ``docs/recipes.md`` explains each choice where the sources
disagree; ``python -m pretrain.presets`` prints the README's table of presets, with the figures each
recipe reaches read from ``results/reference/table2_linear_knn.csv`` (the paper's and the official
README's numbers, never ours).
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import run_cli

VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit")
REFERENCE_TABLE = Path(__file__).resolve().parents[1] / "results" / "reference" / "table2_linear_knn.csv"


@dataclass(frozen=True)
class Recipe:
    """One preset.

    overrides     `TrainConfig` fields the preset sets (command-line flags override them in turn)
    archs         the ``--arch`` values the recipe describes (None: any)
    global_batch  the global batch (per-GPU batch x GPUs) of the run behind its figure (None: not one run)
    reproduces    one line: which run of the paper or the official README
    reference     rows (method, arch, patch) of ``table2_linear_knn.csv`` with that run's figures
    source        where the settings come from
    """

    overrides: dict
    archs: tuple[str, ...] | None
    global_batch: int | None
    reproduces: str
    source: str
    reference: tuple[tuple[str, str, str], ...] = field(default=())


RECIPES: dict[str, Recipe] = {
    # The official code's defaults: the README's "vanilla" run used them on 8 GPUs (a global batch of 512)
    # for 100 epochs. Any backbone: these are the defaults a user starts from.
    "vanilla": Recipe(
        overrides={}, archs=None, global_batch=None,
        reproduces="the official code's defaults; the official README's vanilla ViT-S/16 run (100 epochs, "
                   "8 GPUs x 64 = 512)",
        source="main_dino.py defaults; official README, 'Vanilla DINO training'",
        reference=(("DINO 100 ep (README example run)", "vit_small", "16"),)),
    # The paper's ViT-S results (Table 2: ViT-S/16 and ViT-S/8, 800 epochs, batch 1024 over 16 GPUs), with
    # the settings of the released ViT-S/16's args.txt where the paper is silent or the code default
    # differs: norm_last_layer off, no gradient clipping, min_lr 1e-5, crop scales (0.25, 1) and
    # (0.05, 0.25), 10 local crops, teacher temperature 0.04 -> 0.07 over 30 epochs.
    "paper": Recipe(
        overrides=dict(arch="vit_small", epochs=800, batch_size_per_gpu=64, norm_last_layer=False,
                       warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                       clip_grad=0.0, min_lr=1e-5, global_crops_scale=(0.25, 1.0),
                       local_crops_scale=(0.05, 0.25), local_crops_number=10),
        archs=("vit_small",), global_batch=1024,
        reproduces="the paper's ViT-S/16 and ViT-S/8 (Table 2; 800 epochs, 16 GPUs x 64 = 1024)",
        source="paper Sec. 4 and App. A; the released ViT-S/16's args.txt; official issue #122",
        reference=(("DINO", "vit_small", "16"), ("DINO", "vit_small", "8"))),
    # The official README's "boosting DINO performance" command: the vanilla run plus 300 epochs, the
    # teacher temperature warmed up to 0.07 over 30 epochs, and norm_last_layer off ("only safe with
    # ViT-S"), on 2 nodes of 8 GPUs.
    "boost": Recipe(
        overrides=dict(arch="vit_small", epochs=300, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                       norm_last_layer=False),
        archs=("vit_small",), global_batch=1024,
        reproduces="the official README's boosted ViT-S/16 run (300 epochs, 16 GPUs x 64 = 1024)",
        source="official README, 'Boosting DINO performance'",
        reference=(("DINO 300 ep boosted (README example run)", "vit_small", "16"),)),
    # The official README's ResNet-50 command: SGD at lr 0.03 (x batch / 256), weight decay held at 1e-4,
    # crop scales (0.14, 1) and (0.05, 0.14), 100 epochs on 8 GPUs. The README gives no figure for it; the
    # paper's ResNet-50 (the released checkpoint) was trained with other settings (a larger batch).
    "rn50": Recipe(
        overrides=dict(arch="resnet50", optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
                       global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.14)),
        archs=("resnet50",), global_batch=512,
        reproduces="the official README's ResNet-50 command (100 epochs, 8 GPUs x 64 = 512); the README gives "
                   "no figure for it, and the paper's ResNet-50 was trained with other settings (a global batch "
                   "of 4080)",
        source="official README, 'ResNet-50 and other convnets trainings'; official issue #133",
        reference=(("DINO", "resnet50", ""),)),
    # A CPU demonstration on 32-px images (the generated suite, data/suite).
    # Departs from the paper on purpose, because the paper recipe scaled down
    # learns nothing in minutes on a CPU (README "The demo"; the measurements
    # behind each choice are in docs/demo.md):
    # - a 4-block ViT of width 64 (2 heads of 32) with 8-px patches (16
    #   tokens) on 32-px images and 4 local crops of 16 px: ~450 images/s on
    #   2 cores, so 64 epochs of 3,000 images (2,944 steps of 64) fit in
    #   about 7 minutes (4 heads of 16 learn the same k-NN but put half as
    #   much attention on the object; 4-px patches cost 2.5x a step for no
    #   better figure at equal time; 48 epochs end 3-7 points lower on
    #   k-NN and attention, base lr 0.005 instead of 0.004 2-3 points lower);
    # - the multi-crop batched in the training process (augment_on=device):
    #   per-image PIL work in a loader worker would take one of the two cores;
    # - a 256-way head with BatchNorm and a sharp teacher (0.02, no warm-up):
    #   a teacher temperature of 0.04 or a 1,024-way head measured 8-12
    #   20-NN points lower at 24 epochs, with attention off the objects;
    # - the teacher momentum held at 0.995 for the whole run
    #   (momentum_teacher_end): the official cosine rise to 1 freezes the
    #   teacher once 1 - m(it) is too small for the steps left (after ~70% of
    #   a 550-step run), and the teacher ended 7 points below its student;
    # - colour jitter strong enough that two crops cannot be matched by their
    #   random colours (hue 0.5, saturation 0.8, grayscale 0.5), with the hue
    #   turned in YIQ space, which keeps the luma; the paper's jitter (0.1,
    #   0.2, 0.2) lets the colours decide, and the 20-NN falls to random init;
    # - half of the local crops inverted (x -> 255 - x; local_invert_p): the
    #   suite draws whether an object is lighter or darker than its
    #   background independently of its class, no augmentation of the paper
    #   changes that sign, so two crops always agreed on it and the features
    #   learnt it (one direction with 47-71 % of their variance); inverting
    #   local crops only teaches the student to ignore it while the teacher's
    #   global views stay clean (inverting global crops too cost the
    #   attention: VOC Jaccard 7.9 in one seed of three);
    # - the Gaussian blur radius scaled by 32/224 like the images;
    # - the 20-NN monitor of teacher and student every 8 epochs (for the
    #   report's curves; about 1.5 s a time, with --knn-data).
    "demo": Recipe(
        overrides=dict(arch="vit", embed_dim=64, depth=4, num_heads=2, patch_size=8, img_size=32,
                       drop_path_rate=0.0, out_dim=256, hidden_dim=512, bottleneck_dim=128, use_bn_in_head=True,
                       epochs=64, batch_size_per_gpu=64, lr=0.004, min_lr=1e-5, warmup_epochs=1,
                       momentum_teacher=0.995, momentum_teacher_end=0.995, teacher_temp=0.02,
                       warmup_teacher_temp=0.02, global_crops_size=32, local_crops_size=16,
                       local_crops_number=4, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4),
                       jitter_hue=0.5, jitter_hue_space="yiq", jitter_saturation=0.8, grayscale_p=0.5,
                       local_invert_p=0.5, blur_radius=(0.015, 0.3), augment_on="device",
                       num_workers=1, saveckp_freq=0, knn_every=8, log_every_steps=10),
        archs=("vit",), global_batch=64,
        reproduces="nothing of the paper: a 4-block ViT of width 64 on the 32-px generated suite, on 2 CPU "
                   "cores in about 7 minutes (README 'The demo')",
        source="measured here: docs/demo.md"),
}

PRESETS: dict[str, dict] = {name: recipe.overrides for name, recipe in RECIPES.items()}


def arch_mismatch(preset: str, arch: str) -> str | None:
    """The one-line error for a preset used with an arch it does not describe, or None when it does."""
    archs = RECIPES[preset].archs
    if archs is None or arch in archs:
        return None
    fitting = [name for name, recipe in RECIPES.items() if recipe.archs is None or arch in recipe.archs]
    return (f"preset '{preset}' is a recipe for --arch {' or '.join(archs)}, not {arch}: drop ARCH/--arch, or "
            f"use a preset for {arch} ({', '.join(fitting)})")


def start_notes(preset: str, global_batch: int, base_lr: float, scaled_lr: float, epochs: int,
                warmup_teacher_temp_epochs: int, final_teacher_temp: float, teacher_temp: float) -> list[str]:
    """What a run departs from its recipe in, one line each, for the start of the run:

    - a global batch other than the recipe's (the lr follows the linear scaling rule
      lr = base_lr x global_batch / 256, so the peak lr differs from the recipe's too);
    - a teacher-temperature warm-up longer than the run (the temperature never reaches its target).
    """
    notes = []
    recipe_batch = RECIPES[preset].global_batch if preset in RECIPES else None
    if recipe_batch is not None and global_batch != recipe_batch:
        notes.append(f"note: the '{preset}' recipe ran at a global batch of {recipe_batch}; this run's is "
                     f"{global_batch}, so its peak lr is {base_lr:g} x {global_batch}/256 = {scaled_lr:.3g} "
                     f"(the recipe's: {base_lr * recipe_batch / 256:.3g}; linear scaling rule)")
    if warmup_teacher_temp_epochs > epochs:
        notes.append(f"note: the teacher temperature warms up over {warmup_teacher_temp_epochs} epochs but the run "
                     f"has {epochs}: it ends at {final_teacher_temp:.4g}, not {teacher_temp:g} (lower "
                     "--warmup-teacher-temp-epochs to reach it)")
    return notes


def reference_figures(path: Path = REFERENCE_TABLE) -> dict[tuple[str, str, str], dict[str, float]]:
    """{(method, arch, patch): {"knn_top1": ..., "linear_top1": ...}} from the reference table."""
    figures: dict[tuple[str, str, str], dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            figures.setdefault((row["method"], row["arch"], row["patch"]), {})[row["metric"]] = float(row["value"])
    return figures


def presets_table(path: Path = REFERENCE_TABLE) -> str:
    """The README's Markdown table: preset, arch, what it reproduces, the reference figures, the sources."""
    figures = reference_figures(path)
    lines = ["| preset | arch | reproduces | reference k-NN / linear (source) | settings from |",
             "|---|---|---|---|---|"]
    for name, recipe in RECIPES.items():
        cells = []
        for method, arch, patch in recipe.reference:
            values = figures.get((method, arch, patch))
            if values is None:
                raise KeyError(f"{path} has no row for ({method}, {arch}, {patch})")
            label = f"{arch}/{patch}" if patch else arch
            origin = "official README" if "README" in method else "paper"
            cells.append(f"{label}: {values['knn_top1']:.1f} / {values['linear_top1']:.1f} ({origin})")
        archs = ", ".join(f"`{arch}`" for arch in recipe.archs) if recipe.archs else "any"
        lines.append(f"| `{name}` | {archs} | {recipe.reproduces} | {'; '.join(cells) or '—'} | {recipe.source} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print the README's table of pretraining presets")
    parser.parse_args(argv)
    print(presets_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
