"""The trainer end to end on a tiny config: learning, resume, DDP, bad input."""
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import REPO, TINY, cli_args, step_records, subprocess_env, tiny_cfg, train_command

from common.errors import UserError, run_cli
from pretrain import load_backbone
from pretrain.checkpoint import safe_load, strip_prefixes
from pretrain.dino import build_student_teacher, ema_update, param_groups
from pretrain.distributed import DistInfo
from pretrain.train import main as train_main
from pretrain.trainer import Trainer


def test_param_groups_follow_the_official_rule():
    student, _ = build_student_teacher(tiny_cfg("x", "y"))
    groups = param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    not_decayed = {names[id(p)] for p in groups[1]["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.patch_embed.proj.weight"} <= decayed
    assert "backbone.blocks.0.norm1.weight" in not_decayed and "head.mlp.0.bias" in not_decayed
    assert "head.last_layer.weight_g" not in decayed | not_decayed  # frozen gain: not optimised
    assert groups[1]["weight_decay"] == 0.0


def test_end_to_end_pretrain_then_knn(tiny_suite, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_suite / "train", out, knn_every=1, knn_data=str(tiny_suite))
    from pretrain.train import knn_monitor_for
    summary = Trainer(cfg, DistInfo(), knn_monitor_for(cfg, torch.device("cpu"))).fit()
    assert summary["iterations"] == 2 * (120 // 8)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(r["teacher_temp"] == pytest.approx(0.04) for r in epochs)
    steps = [r for r in records if r["kind"] == "step"]
    assert steps[0]["lr"] == 0.0 and steps[0]["teacher_momentum"] == pytest.approx(0.99)
    # collapse monitors on every logged step: 0 <= H <= ln K, KL >= 0, and H + KL is the step's loss
    for step in steps:
        assert 0.0 <= step["teacher_entropy"] <= math.log(cfg.out_dim) + 1e-5
        assert step["teacher_student_kl"] >= -1e-5
        assert step["teacher_entropy"] + step["teacher_student_kl"] == pytest.approx(step["loss"], rel=1e-5)
        assert step["teacher_temp"] == pytest.approx(0.04)
    checkpoint = safe_load(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 2 and set(checkpoint) >= {"student", "teacher", "optimizer", "args", "dino_loss"}
    assert all(k.startswith("module.") for k in checkpoint["student"])
    assert (out / "checkpoint0000.pth").exists() and (out / "checkpoint0001.pth").exists()
    # the monitor (exact search) and the evaluator (FAISS) agree on the trained teacher
    from evaluate.knn import run_knn
    top1, top5 = run_knn(load_backbone(out / "checkpoint.pth"), str(tiny_suite), 32, ks=(20,), num_workers=0)[20]
    assert epochs[-1]["knn_top1_k20"] == pytest.approx(top1)
    assert epochs[-1]["knn_top5_k20"] == pytest.approx(top5)
    # ... and the student's monitor is the student's own 20-NN accuracy
    student_top1, _ = run_knn(load_backbone(out / "checkpoint.pth", key="student"), str(tiny_suite), 32, ks=(20,),
                              num_workers=0)[20]
    assert epochs[-1]["student_knn_top1_k20"] == pytest.approx(student_top1)
    # the first epoch trains everything but the frozen last layer: prototypes unchanged
    first = safe_load(out / "checkpoint0000.pth")["student"]
    torch.manual_seed(cfg.seed)  # the trainer draws the initial weights right after seeding
    student_init, _ = build_student_teacher(cfg)
    assert torch.equal(first["module.head.last_layer.weight_v"], student_init.state_dict()["head.last_layer.weight_v"])
    assert not torch.equal(first["module.head.mlp.0.weight"], student_init.state_dict()["head.mlp.0.weight"])


def test_resumed_run_equals_uninterrupted(tiny_suite, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    Trainer(tiny_cfg(tiny_suite / "train", full), DistInfo()).fit()
    first = Trainer(tiny_cfg(tiny_suite / "train", resumed, max_steps=7), DistInfo()).fit()
    assert first["iterations"] == 7
    assert safe_load(resumed / "checkpoint.pth")["step"] == 7  # stopped mid-epoch
    second = Trainer(tiny_cfg(tiny_suite / "train", resumed), DistInfo()).fit()
    assert second["resumed"] and second["start_iteration"] == 7
    assert_same_training_state(full, resumed)


def assert_same_training_state(run_a: Path, run_b: Path) -> None:
    """The two runs' last checkpoints hold bit-identical student, teacher and center."""
    a, b = safe_load(run_a / "checkpoint.pth"), safe_load(run_b / "checkpoint.pth")
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])


def test_two_process_ddp_equals_single_process(tiny_suite, tmp_path):
    settings = dict(TINY, epochs=1, max_steps=4, warmup_epochs=0, saveckp_freq=0)
    single = tmp_path / "single"
    Trainer(tiny_cfg(tiny_suite / "train", single, **{**settings, "batch_size_per_gpu": 8}), DistInfo()).fit()
    ddp = tmp_path / "ddp"
    cmd = train_command({**settings, "batch_size_per_gpu": 4, "data": tiny_suite / "train", "output_dir": ddp}, 2)
    env = subprocess_env()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = safe_load(single / "checkpoint.pth"), safe_load(ddp / "checkpoint.pth")
    for name, value in strip_prefixes(a["teacher"]).items():
        assert torch.allclose(value, strip_prefixes(b["teacher"])[name], atol=2e-5), name
    assert torch.allclose(a["dino_loss"]["center"], b["dino_loss"]["center"], atol=1e-5)


def test_non_finite_loss_stops_with_checkpoint_intact(tiny_suite, tmp_path, monkeypatch):
    out = tmp_path / "run"
    Trainer(tiny_cfg(tiny_suite / "train", out, epochs=2, max_steps=15), DistInfo()).fit()
    before = (out / "checkpoint.pth").read_bytes()
    trainer = Trainer(tiny_cfg(tiny_suite / "train", out, epochs=2), DistInfo())
    def nan_loss(student_output, teacher_output, epoch):  # what forward and with_monitors both use
        return student_output.sum() * float("nan"), teacher_output.float().softmax(dim=-1)
    monkeypatch.setattr(trainer.model.loss_fn, "_loss_and_targets", nan_loss)
    with pytest.raises(UserError, match="loss is not finite .* at iteration 15: training diverged"):
        trainer.fit()
    assert (out / "checkpoint.pth").read_bytes() == before


def test_teacher_momentum_follows_its_schedule_to_the_configured_end(tiny_suite, tmp_path):
    official = Trainer(tiny_cfg(tiny_suite / "train", tmp_path / "a", momentum_teacher=0.99), DistInfo())
    held = Trainer(tiny_cfg(tiny_suite / "train", tmp_path / "b", momentum_teacher=0.99, momentum_teacher_end=0.99),
                   DistInfo())
    steps = len(official.model.momentum_schedule)
    # official: m(it) = 1 - (1 - m0) (cos(pi it / T) + 1) / 2, T = the run's steps: from 0.99 up towards 1
    expected = 1 - 0.01 * (np.cos(np.pi * np.arange(steps) / steps) + 1) / 2
    assert np.allclose(official.model.momentum_schedule, expected, atol=1e-12)
    assert np.allclose(held.model.momentum_schedule, 0.99, atol=1e-12)
    # the teacher update uses it: one step of the held schedule moves the teacher by exactly 1% of the gap
    student = torch.nn.Linear(2, 2)
    teacher = torch.nn.Linear(2, 2)
    gap = [s.detach() - t.detach() for s, t in zip(student.parameters(), teacher.parameters())]
    before = [t.detach().clone() for t in teacher.parameters()]
    ema_update(teacher, student, float(held.model.momentum_schedule[0]))
    for t, b, g in zip(teacher.parameters(), before, gap):
        assert torch.allclose(t.detach() - b, 0.01 * g, atol=1e-7)


@pytest.mark.parametrize("flag,value", [("momentum_teacher", 1.2), ("momentum_teacher_end", -0.1)])
def test_momentum_outside_zero_one_is_refused(tiny_suite, tmp_path, flag, value):
    with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} {value} is not a momentum: pass a value in"):
        Trainer(tiny_cfg(tiny_suite / "train", tmp_path / "run", **{flag: value}), DistInfo())


@pytest.mark.parametrize("case,expected", [
    ("missing", "does not exist"),
    ("empty", "no class sub-folders|no image"),
    ("noimages", "no image"),
    ("corrupt", "cannot decode image"),
])
def test_bad_data_gives_one_line_error(tmp_path, capsys, case, expected):
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "noimages":
        (data / "cls").mkdir()
        (data / "cls" / "notes.txt").write_text("x")
    if case == "corrupt":
        (data / "cls").mkdir()
        for i in range(20):
            (data / "cls" / f"{i:02d}.jpg").write_bytes(b"not an image")
    args = ["--preset", "vanilla", *cli_args({**TINY, "data": data, "output_dir": tmp_path / "out", "epochs": 1})]
    assert run_cli(train_main, args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(expected, errors[0])


def test_bad_arch_patch_and_resume_from_other_arch(tiny_suite, tmp_path, capsys):
    base = {**TINY, "data": tiny_suite / "train", "output_dir": tmp_path / "out", "epochs": 1, "max_steps": 1}
    with pytest.raises(SystemExit) as refused:  # a value outside the flag's choices: refused at parse time
        run_cli(train_main, ["--preset", "vanilla", *cli_args({**base, "arch": "vit_giant"})])
    assert refused.value.code == 2
    assert "argument --arch: invalid choice: 'vit_giant' (choose from 'vit_tiny', 'vit_small', 'vit_base', " \
           "'resnet50', 'vit')" in capsys.readouterr().err
    named = {k: v for k, v in base.items() if k not in ("embed_dim", "depth", "num_heads", "img_size")}
    assert run_cli(train_main, ["--preset", "vanilla",
                                *cli_args({**named, "arch": "vit_small", "patch_size": 14})]) == 2
    assert "does not support patch 14" in capsys.readouterr().err
    assert run_cli(train_main, ["--preset", "vanilla", *cli_args(base)]) == 0
    before = (tmp_path / "out" / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    assert run_cli(train_main, ["--preset", "vanilla", *cli_args({**base, "embed_dim": 64})]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert (tmp_path / "out" / "checkpoint.pth").read_bytes() == before


def test_fused_adamw_trains_like_the_foreach_one(tiny_suite, tmp_path):
    runs = {}
    for fused in (True, False):
        out = tmp_path / f"fused-{fused}"
        trainer = Trainer(tiny_cfg(tiny_suite / "train", out, max_steps=4, fused_optimizer=fused), DistInfo())
        assert bool(trainer.model.optimizer.defaults["fused"]) is fused
        trainer.fit()
        runs[fused] = safe_load(out / "checkpoint.pth")
    for name, value in runs[True]["student"].items():
        assert torch.allclose(value, runs[False]["student"][name], atol=1e-5), name
    assert not all(torch.equal(value, runs[False]["student"][name]) for name, value in runs[True]["student"].items())


def test_compiled_models_train_like_the_plain_ones(tiny_suite, tmp_path):
    """torch.compile (inductor, on the CPU here) computes the same steps; about a minute of compiling."""
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        Trainer(tiny_cfg(tiny_suite / "train", out, max_steps=3, compile=mode), DistInfo()).fit()
        runs[mode] = safe_load(out / "checkpoint.pth")
    assert all(not name.startswith("_orig_mod") for name in runs["on"]["teacher"])  # plain keys in the checkpoint
    for key in ("student", "teacher"):
        for name, value in runs["on"][key].items():
            assert torch.allclose(value, runs["off"][key][name], atol=1e-4), (key, name)


def test_demo_preset_with_batchnorm_head_trains_and_resumes_under_two_process_ddp(tiny_suite, tmp_path):
    """The demo preset's head has BatchNorm: under DDP the teacher is wrapped before it is frozen (PyTorch
    refuses to wrap a module without a trainable parameter). On the CPU the BatchNorm stays per process
    (SyncBatchNorm needs CUDA); `make gpu-check` runs the SyncBatchNorm case."""
    out = tmp_path / "ddp_bn"
    settings = dict(data=tiny_suite / "train", output_dir=out, batch_size_per_gpu=4, num_workers=0, epochs=2,
                    max_steps=3, save_every_steps=1, knn_every=0, log_every_steps=1)
    env = subprocess_env()
    first = subprocess.run(train_command(settings, 2, preset="demo"), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "BatchNorm is per process" in first.stderr
    saved = safe_load(out / "checkpoint.pth")
    assert saved["global_batch"] == 8 and saved["step"] == 3
    # the official layout: a DDP-wrapped teacher (BatchNorm) is saved with the 'module.' prefix
    assert all(key.startswith("module.") for key in saved["teacher"])
    assert any(key.endswith("running_mean") for key in saved["teacher"])
    second = subprocess.run(train_command(settings, 2, preset="demo"), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["resumed"] and summary["start_iteration"] == 3 and summary["iterations"] == 6
    resumed = safe_load(out / "checkpoint.pth")
    assert any(not torch.equal(resumed["teacher"][k], saved["teacher"][k]) for k in saved["teacher"])


def test_tensorboard_events_hold_the_logged_curves(tiny_suite, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    Trainer(tiny_cfg(tiny_suite / "train", out, epochs=1, log_every_steps=5), DistInfo()).fit()
    events = EventAccumulator(str(out))
    events.Reload()
    steps = step_records(out / "log.jsonl")
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/teacher_momentum", "teacher_momentum"),
                     ("collapse/teacher_entropy", "teacher_entropy"), ("train/teacher_temp", "teacher_temp")):
        logged = {event.step: event.value for event in events.Scalars(tag)}
        assert sorted(logged) == sorted(steps) == [5, 10, 15], tag
        for iteration, record in steps.items():
            assert logged[iteration] == pytest.approx(record[key], rel=1e-6), (tag, iteration)
    assert [event.value for event in events.Scalars("epoch/train_loss")] == pytest.approx(
        [r["train_loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
         if r["kind"] == "epoch"])


def test_tensorboard_off_or_unwritable_never_stops_a_run(tiny_suite, tmp_path, capsys, monkeypatch):
    out = tmp_path / "off"
    Trainer(tiny_cfg(tiny_suite / "train", out, epochs=1, max_steps=2, tensorboard=False), DistInfo()).fit()
    assert not list(out.glob("events.out.tfevents.*"))
    import torch.utils.tensorboard as tensorboard

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")
    monkeypatch.setattr(tensorboard, "SummaryWriter", refuse)
    summary = Trainer(tiny_cfg(tiny_suite / "train", tmp_path / "ro", epochs=1, max_steps=2), DistInfo()).fit()
    assert summary["iterations"] == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard" in line]
    assert len(warnings) == 1 and "read-only file system" in warnings[0] and "the run goes on" in warnings[0]


def test_progress_in_a_log_file_is_clean_lines(tiny_suite, tmp_path):
    """Redirected output (a SLURM log): whole lines, no carriage returns, a start and an end line."""
    settings = {**TINY, "epochs": 1, "data": tiny_suite / "train", "output_dir": tmp_path / "run"}
    done = subprocess.run(train_command(settings), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("pretrain: ")]
    assert lines[0] == "pretrain: 0/15 it (0%), started" and lines[-1].startswith("pretrain: 15/15 it (100%)")
    assert ", done" in lines[-1] and "loss=" in lines[-1]
