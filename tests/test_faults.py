"""Faults during pretraining: SIGKILL at a random step, a killed rank, collapse, divergence; nothing is lost."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from tiny_runs import REPO, TINY, step_records, subprocess_env, tiny_cfg, train_command

from common.errors import UserError
from pretrain.checkpoint import safe_load
from pretrain.checkpoint_files import load_training_checkpoint
from pretrain.distributed import DistInfo
from pretrain.run_log import CollapseWatch, RunLog
from pretrain.trainer import Trainer

# 2 epochs of 15 steps, a checkpoint after every step, drop-path on (so the RNG state matters on resume)
KILL_RUN = dict(TINY, drop_path_rate=0.1, save_every_steps=1, saveckp_freq=0)


def run(settings: dict, processes: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(train_command(settings, processes), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start_and_kill(settings: dict, after_steps: int, processes: int = 1, victim=None) -> subprocess.CompletedProcess:
    """Start a run, wait until its log has ``after_steps`` step records, SIGKILL ``victim(process)`` (default:
    the run itself), and return the finished process (stdout/stderr captured)."""
    log = Path(settings["output_dir"]) / "log.jsonl"
    process = subprocess.Popen(train_command(settings, processes), cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(step_records(log)) >= after_steps):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached the step to kill it at"
        time.sleep(0.02)
    os.kill(victim(process) if victim else process.pid, signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tiny_suite, tmp_path):
    total = 2 * (120 // TINY["batch_size_per_gpu"])
    kill_after = random.Random().randint(2, total - 3)
    data = tiny_suite / "train"
    reference = tmp_path / "reference"
    run({**KILL_RUN, "data": data, "output_dir": reference})

    killed = tmp_path / "killed"
    settings = {**KILL_RUN, "data": data, "output_dir": killed}
    start_and_kill(settings, kill_after)
    # the checkpoint a resume starts from: the newest rotated file (the kill may fall between writing it and
    # pointing checkpoint.pth at it, so checkpoint.pth can still be the one before)
    saved, _, _ = load_training_checkpoint(killed)
    resumed_at = saved["epoch"] * (total // 2) + saved["step"]
    assert resumed_at >= kill_after - 1, f"killed after step {kill_after}, checkpoint at {resumed_at}"
    # resume with another worker count: the crops depend only on (seed, epoch, image), so still bit-identical
    run({**settings, "num_workers": 1})

    want, got = step_records(reference / "log.jsonl"), step_records(killed / "log.jsonl")
    assert sorted(got) == list(range(1, total + 1)), f"killed after step {kill_after}"
    for iteration in want:
        for key in ("loss", "teacher_entropy", "teacher_student_kl", "lr", "wd", "teacher_momentum"):
            assert got[iteration][key] == want[iteration][key], (kill_after, iteration, key)
    records = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["iteration"] == resumed_at
    # the log reads like an uninterrupted run's: each iteration once, in order
    iterations = [r["iteration"] for r in records if r["kind"] == "step"]
    assert iterations == sorted(set(iterations))
    a, b = safe_load(reference / "checkpoint.pth"), safe_load(killed / "checkpoint.pth")
    for key in ("student", "teacher"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])


def child_pids(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found]


def a_training_rank(torchrun: subprocess.Popen) -> int:
    """The pid of one of torchrun's worker processes (its children running pretrain.train)."""
    for _ in range(200):
        children = child_pids(torchrun.pid)
        if len(children) >= 2:
            return children[-1]
        time.sleep(0.05)
    raise AssertionError("torchrun has no worker processes")


def test_killed_rank_ends_the_job_and_the_run_resumes(tiny_suite, tmp_path):
    out = tmp_path / "ddp"
    settings = {**KILL_RUN, "drop_path_rate": 0.0, "batch_size_per_gpu": 4, "save_every_steps": 2,
                "data": tiny_suite / "train", "output_dir": out}
    done = start_and_kill(settings, after_steps=5, processes=2, victim=a_training_rank)
    assert done.returncode != 0
    assert "SIGKILL" in done.stderr or "Signal 9" in done.stderr, done.stderr[-2000:]
    saved = safe_load(out / "checkpoint.pth")
    assert saved["global_batch"] == 8 and saved["epoch"] * 15 + saved["step"] >= 4
    # resume on one process with the same global batch: continues from that checkpoint to the end
    resumed = run({**settings, "batch_size_per_gpu": 8})
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed"] and summary["start_iteration"] == saved["epoch"] * 15 + saved["step"]
    assert summary["iterations"] == 30


def test_resume_with_another_global_batch_keeps_the_position_in_the_epoch(tiny_suite, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(tiny_cfg(tiny_suite / "train", out, max_steps=6, save_every_steps=1), DistInfo()).fit()  # 48 images
    trainer = Trainer(tiny_cfg(tiny_suite / "train", out, batch_size_per_gpu=12), DistInfo())
    summary = trainer.fit()
    assert summary["start_iteration"] == 4  # image 48 of epoch 0 = step 4 of 12-image batches
    assert summary["iterations"] == 2 * (120 // 12)
    assert "no longer bit-identical" in capsys.readouterr().err


def test_log_is_trimmed_on_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"kind": "step", "epoch": 0, "iteration": i, "loss": 1.0} for i in (1, 2, 3)]
    lines.append({"kind": "epoch", "epoch": 0})
    lines += [{"kind": "step", "epoch": 1, "iteration": i, "loss": 1.0} for i in (4, 5)]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"kind": "step", "itera')
    dropped = RunLog(log).trim_for_resume(epoch=1, iteration=4)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert dropped == 2  # iteration 5 and the truncated line
    assert [r.get("iteration") for r in records if r["kind"] == "step"] == [1, 2, 3, 4]
    assert records[-1] == {"kind": "resume", "epoch": 1, "iteration": 4, "dropped_records": 2}


@pytest.mark.parametrize("kind,monitors", [
    ("uniform", {"teacher_entropy": 4.15, "teacher_batch_entropy": 4.15, "teacher_student_kl": 0.0}),
    ("one dimension", {"teacher_entropy": 0.0, "teacher_batch_entropy": 0.01, "teacher_student_kl": 0.0}),
])
def test_collapse_watch_warns_once_after_patience(kind, monitors):
    watch = CollapseWatch(out_dim=64, patience=3)  # ln 64 = 4.16
    healthy = {"teacher_entropy": 2.0, "teacher_batch_entropy": 3.5, "teacher_student_kl": 0.5}
    assert watch.update(monitors, 1) == [] and watch.update(monitors, 2) == []
    assert watch.update(healthy, 3) == []  # a dip that recovers resets the count
    assert [watch.update(monitors, i) for i in (4, 5)] == [[], []]
    warnings = watch.update(monitors, 6)
    assert len(warnings) == 1 and warnings[0].startswith(f"collapse to {kind} at iteration 6")
    assert watch.update(monitors, 7) == []  # once


@pytest.mark.parametrize("settings,kind", [
    # the paper's collapse study: teacher temperature 0.08+ without warm-up stays uniform (loss at ln K) ...
    ({"teacher_temp": 0.3, "warmup_teacher_temp": 0.3}, "uniform"),
    # ... and without centering (momentum 1: the center never moves) sharpening wins: one dimension
    ({"center_momentum": 1.0, "teacher_temp": 0.01, "warmup_teacher_temp": 0.01, "lr": 0.05, "warmup_epochs": 0,
      "freeze_last_layer": 0, "momentum_teacher": 0.9}, "one dimension"),
])
def test_forced_collapse_is_warned_in_the_log(tiny_suite, tmp_path, settings, kind, capsys):
    out = tmp_path / "run"
    Trainer(tiny_cfg(tiny_suite / "train", out, epochs=1, **settings), DistInfo()).fit()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    warnings = [r["message"] for r in records if r["kind"] == "warning"]
    assert any(message.startswith(f"collapse to {kind}") for message in warnings), (warnings, records[-3:])
    assert f"collapse to {kind}" in capsys.readouterr().err


def test_divergence_mid_epoch_keeps_the_last_good_checkpoint(tiny_suite, tmp_path, monkeypatch):
    """The loss turns NaN between two log steps: the run stops at the next check, before any save."""
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_suite / "train", out, log_every_steps=4, save_every_steps=4, saveckp_freq=0)
    trainer = Trainer(cfg, DistInfo())
    loss_and_targets = trainer.model.loss_fn._loss_and_targets  # what forward and with_monitors both use

    def diverge_at_step_6(student_output, teacher_output, epoch):
        loss, targets = loss_and_targets(student_output, teacher_output, epoch)
        return (loss * float("inf"), targets) if trainer.iteration == 5 else (loss, targets)  # the 6th step
    monkeypatch.setattr(trainer.model.loss_fn, "_loss_and_targets", diverge_at_step_6)
    with pytest.raises(UserError, match=r"not finite \(NaN or inf\) at iteration 5: .* was saved before it"):
        trainer.fit()
    saved = safe_load(out / "checkpoint.pth")
    assert saved["step"] == 4  # the step-4 checkpoint, not a diverged one
    assert all(torch.isfinite(value).all() for value in saved["teacher"].values() if value.is_floating_point())


def test_disk_full_during_a_step_checkpoint_stops_the_run_and_keeps_the_previous(tiny_suite, tmp_path, monkeypatch):
    import errno

    import pretrain.checkpoint_files as checkpoint_files
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_suite / "train", out, save_every_steps=2, saveckp_freq=0)
    trainer = Trainer(cfg, DistInfo())
    real_save = checkpoint_files.atomic_save
    saves = []

    def save_then_fill_the_disk(state, path):
        saves.append(path)
        if len(saves) == 2:  # the second step checkpoint: a partial write, then ENOSPC
            def partial(handle):
                handle.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return checkpoint_files.atomic_write(path, partial)
        return real_save(state, path)
    monkeypatch.setattr(checkpoint_files, "atomic_save", save_then_fill_the_disk)
    with pytest.raises(UserError, match=r"writing checkpoint .*it00000004.pth' failed \(No space left on device\); "
                                        r"the previous checkpoint .* is intact"):
        trainer.fit()
    state = safe_load(out / "checkpoint.pth")
    assert state["step"] == 2  # the step-2 checkpoint, whole
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pth" or ".tmp" in p.name) == \
        ["checkpoint-it00000002.pth", "checkpoint.pth"]
    # and the same command resumes from it
    monkeypatch.setattr(checkpoint_files, "atomic_save", real_save)
    summary = Trainer(cfg, DistInfo()).fit()
    assert summary["resumed"] and summary["start_iteration"] == 2
