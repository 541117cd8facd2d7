"""The named recipes: their settings against their sources, arch checks, start-of-run notes, README table."""

import numpy as np
import pytest
import torch
from tiny_runs import REPO, tiny_cfg

from common.errors import UserError, run_cli
from common.scaling import scaled_lr
from pretrain import load_backbone
from pretrain.config import TrainConfig, resolve
from pretrain.distributed import DistInfo
from pretrain.presets import RECIPES, presets_table, start_notes
from pretrain.train import main as train_main
from pretrain.trainer import Trainer


def test_paper_preset_is_the_released_vit_s_recipe():
    cfg = resolve("paper")
    assert (cfg.arch, cfg.patch_size, cfg.epochs, cfg.batch_size_per_gpu) == ("vit_small", 16, 800, 64)
    assert RECIPES["paper"].global_batch == 1024  # 16 GPUs x 64
    assert cfg.norm_last_layer is False and cfg.clip_grad == 0.0 and cfg.min_lr == 1e-5
    assert (cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert cfg.global_crops_scale == (0.25, 1.0) and cfg.local_crops_scale == (0.05, 0.25)
    assert cfg.local_crops_number == 10 and cfg.local_crops_size == 96 and cfg.global_crops_size == 224
    # the rest are the code defaults the paper states: lr 5e-4 x batch / 256 over 10 warm-up epochs,
    # wd 0.04 -> 0.4, momentum 0.996 -> 1, K = 65536, last layer frozen during the first epoch
    assert (cfg.lr, cfg.warmup_epochs, cfg.weight_decay, cfg.weight_decay_end) == (5e-4, 10, 0.04, 0.4)
    assert (cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.out_dim, cfg.freeze_last_layer) == \
        (0.996, 1.0, 65536, 1)
    assert resolve("paper", patch_size=8).patch_size == 8  # ViT-S/8: the same recipe


def test_boost_vanilla_and_rn50_presets_are_the_official_readme_commands():
    boost, vanilla = resolve("boost"), resolve("vanilla")
    assert vanilla == TrainConfig(preset="vanilla")  # the code defaults, nothing changed
    changed = {k for k, v in vars(boost).items() if v != getattr(vanilla, k)} - {"preset"}
    assert changed == {"epochs", "teacher_temp", "warmup_teacher_temp_epochs", "norm_last_layer"}
    assert (boost.epochs, boost.teacher_temp, boost.warmup_teacher_temp_epochs, boost.norm_last_layer) == \
        (300, 0.07, 30, False)
    rn50 = resolve("rn50")
    assert (rn50.arch, rn50.optimizer, rn50.lr, rn50.weight_decay, rn50.weight_decay_end) == \
        ("resnet50", "sgd", 0.03, 1e-4, 1e-4)
    assert rn50.global_crops_scale == (0.14, 1.0) and rn50.local_crops_scale == (0.05, 0.14)
    assert RECIPES["rn50"].global_batch == 512 and RECIPES["boost"].global_batch == 1024


@pytest.mark.parametrize("preset, arch, fits", [("rn50", "vit_small", "vanilla"), ("paper", "resnet50", "rn50"),
                                                ("boost", "vit_base", "vanilla"), ("demo", "vit_small", "paper")])
def test_a_preset_with_an_arch_it_does_not_describe_says_which_it_is_for(preset, arch, fits):
    with pytest.raises(UserError, match=rf"preset '{preset}' is a recipe for --arch .*not {arch}: .*{fits}"):
        resolve(preset, arch=arch)
    assert resolve(preset, arch=RECIPES[preset].archs[0]).arch == RECIPES[preset].archs[0]


def test_unknown_preset_lists_the_known_ones(tmp_path, capsys):
    assert run_cli(train_main, ["--preset", "papr", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown preset 'papr': choose one of vanilla, paper, boost, rn50, demo"
    with pytest.raises(UserError, match="unknown preset 'papr': choose one of vanilla, paper, boost, rn50, demo"):
        resolve("papr")


def test_start_notes_name_the_batch_the_lr_and_the_temperature_reached():
    cfg = resolve("paper", epochs=20)
    teacher_temps = np.linspace(0.04, 0.07, 30)  # the warm-up, per epoch; the run stops after epoch 19
    notes = start_notes("paper", 64, cfg.lr, scaled_lr(cfg.lr, 64), cfg.epochs, cfg.warmup_teacher_temp_epochs,
                        float(teacher_temps[19]), cfg.teacher_temp)
    assert len(notes) == 2
    assert "global batch of 1024; this run's is 64" in notes[0]
    assert "0.0005 x 64/256 = 0.000125" in notes[0] and "the recipe's: 0.002" in notes[0]
    assert f"it ends at {teacher_temps[19]:.4g}, not 0.07" in notes[1] \
        and "over 30 epochs but the run has 20" in notes[1]
    assert start_notes("paper", 1024, cfg.lr, scaled_lr(cfg.lr, 1024), 800, 30, 0.07, 0.07) == []
    assert start_notes("vanilla", 8, 5e-4, 1.6e-5, 100, 0, 0.04, 0.04) == []  # the code defaults: no recipe batch


def test_the_trainer_prints_its_start_notes(tiny_suite, tmp_path, capsys):
    cfg = tiny_cfg(tiny_suite / "train", tmp_path / "run", epochs=1, max_steps=1, warmup_teacher_temp_epochs=3,
                   warmup_teacher_temp=0.04, teacher_temp=0.07)
    Trainer(cfg, DistInfo()).fit()
    assert "warms up over 3 epochs but the run has 1: it ends at 0.04, not 0.07" in capsys.readouterr().err


def test_rn50_preset_trains_torchvision_resnet50_and_its_checkpoint_loads(tiny_suite, tmp_path):
    out = tmp_path / "rn50"
    cfg = resolve("rn50", data=str(tiny_suite / "train"), output_dir=str(out), global_crops_size=32,
                  local_crops_size=16, local_crops_number=2, batch_size_per_gpu=4, out_dim=128, hidden_dim=64,
                  bottleneck_dim=32, num_workers=0, epochs=1, max_steps=2, warmup_epochs=0)
    Trainer(cfg, DistInfo()).fit()
    model = load_backbone(out / "checkpoint.pth")
    assert model.embed_dim == 2048 and type(model).__module__.startswith("torchvision")
    torch.manual_seed(0)
    reference = load_backbone(None, arch="resnet50")
    assert not torch.equal(model.conv1.weight, reference.conv1.weight)  # SGD moved the weights


def test_readme_presets_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    assert presets_table() in readme
    assert "python -m pretrain.presets" in readme
