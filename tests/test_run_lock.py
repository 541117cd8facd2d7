"""One writer per run folder (common/run_lock.py): refusals, stale and killed holders, SLURM requeues, races."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from tiny_runs import REPO, TINY, cli_args, step_records, subprocess_env, train_command

from common.errors import UserError, run_cli
from common.run_lock import LOCK_NAME, Holder, RunLock, process_start_ticks
from pretrain.train import main as train_main

HOST = socket.gethostname()


def write_lock(folder: Path, age_s: float = 0.0, **fields) -> Holder:
    """A lock file as another process would have left it, last written ``age_s`` seconds ago."""
    holder = replace(Holder.me("pretrain"), **fields)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps(asdict(holder)))
    if age_s:
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))
    return holder


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with RunLock.acquire(out, "pretrain", heartbeat_s=0) as lock:
        with pytest.raises(UserError) as refused:
            RunLock.acquire(out, "eval-all", heartbeat_s=0)
        message = str(refused.value)
        assert f"in use by pretrain on host {HOST}, pid {os.getpid()}, started {lock.holder.started}" in message
        assert "wait for it to finish, or choose another output folder" in message and "\n" not in message
        assert json.loads((out / LOCK_NAME).read_text())["token"] == lock.holder.token
    assert not (out / LOCK_NAME).exists()


def test_release_removes_the_lock_and_the_folders_it_created_if_still_empty(tmp_path):
    RunLock.acquire(tmp_path / "a" / "b", "pretrain", heartbeat_s=0).release()
    assert not (tmp_path / "a").exists()
    lock = RunLock.acquire(tmp_path / "c" / "d", "pretrain", heartbeat_s=0)
    (tmp_path / "c" / "d" / "log.jsonl").write_text("{}\n")
    lock.release()
    assert (tmp_path / "c" / "d" / "log.jsonl").exists() and not (tmp_path / "c" / "d" / LOCK_NAME).exists()


def test_a_dead_or_reused_pid_on_this_host_is_taken_over(tmp_path):
    warnings = []
    write_lock(tmp_path, pid=dead_pid())
    RunLock.acquire(tmp_path, "pretrain", heartbeat_s=0, warn=warnings.append).release()
    assert len(warnings) == 1 and "no longer runs on this host" in warnings[0]
    # the parent process runs, but the lock's start time is not its own: the pid was reused
    write_lock(tmp_path, pid=os.getppid(), pid_start=(process_start_ticks(os.getppid()) or 0) + 1)
    RunLock.acquire(tmp_path, "pretrain", heartbeat_s=0, warn=warnings.append).release()
    assert len(warnings) == 2
    write_lock(tmp_path, pid=os.getppid(), pid_start=process_start_ticks(os.getppid()))
    with pytest.raises(UserError, match=f"pid {os.getppid()}"):
        RunLock.acquire(tmp_path, "pretrain", heartbeat_s=0)


def test_another_hosts_lock_is_kept_while_its_heartbeat_is_fresh(tmp_path):
    write_lock(tmp_path, host="node-17", pid=4242, age_s=120)
    with pytest.raises(UserError, match="in use by pretrain on host node-17, pid 4242"):
        RunLock.acquire(tmp_path, "pretrain", stale_after_s=600, heartbeat_s=0)
    warnings = []
    write_lock(tmp_path, host="node-17", pid=4242, age_s=3600)
    lock = RunLock.acquire(tmp_path, "pretrain", stale_after_s=600, heartbeat_s=0, warn=warnings.append)
    assert len(warnings) == 1 and "no heartbeat for 60.0 minutes (limit 10)" in warnings[0]
    assert "node-17, pid 4242" in warnings[0]
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    write_lock(tmp_path, host="node-3", pid=99, slurm_job="776")
    with pytest.raises(UserError, match="SLURM job 776"):
        RunLock.acquire(tmp_path, "pretrain", heartbeat_s=0)
    warnings = []
    write_lock(tmp_path, host="node-3", pid=99, slurm_job="777")  # fresh heartbeat, another node: requeued
    RunLock.acquire(tmp_path, "pretrain", heartbeat_s=0, warn=warnings.append).release()
    assert len(warnings) == 1 and "SLURM job 777 was requeued" in warnings[0]
    # the previous instance of the job still runs on this host: not a requeue to take over from
    write_lock(tmp_path, pid=os.getppid(), pid_start=process_start_ticks(os.getppid()), slurm_job="777")
    with pytest.raises(UserError, match="SLURM job 777"):
        RunLock.acquire(tmp_path, "pretrain", heartbeat_s=0)


def test_the_heartbeat_refreshes_the_lock_and_a_taken_lock_is_noticed(tmp_path):
    lock = RunLock.acquire(tmp_path, "pretrain", heartbeat_s=0.05)
    path = tmp_path / LOCK_NAME
    stamp = time.time() - 3600
    os.utime(path, (stamp, stamp))
    time.sleep(0.3)
    assert path.stat().st_mtime > stamp + 3000  # rewritten by the heartbeat
    lock.assert_held()
    write_lock(tmp_path, host="node-9", pid=5)  # another process took it over
    time.sleep(0.3)
    assert lock.lost_to is not None and lock.lost_to.host == "node-9"
    with pytest.raises(UserError, match="taken over by pretrain on host node-9, pid 5"):
        lock.assert_held()
    lock.release()
    assert json.loads(path.read_text())["host"] == "node-9"  # not ours to remove


def _take(folder: str, start: float, results) -> None:
    time.sleep(max(0.0, start - time.time()))
    try:
        lock = RunLock.acquire(folder, "pretrain", heartbeat_s=0, warn=lambda line: None)
    except UserError:
        results.put("refused")
        return
    results.put("taken")
    time.sleep(1.5)  # hold it while the others try
    lock.release()


def test_racing_takeovers_of_one_stale_lock_leave_one_holder(tmp_path):
    write_lock(tmp_path, pid=dead_pid())
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start = time.time() + 0.5
    workers = [context.Process(target=_take, args=(str(tmp_path), start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes == ["refused", "refused", "refused", "taken"]


def test_pretrain_and_eval_all_refuse_a_held_folder_before_writing(tiny_suite, tmp_path, capsys):
    from evaluate.eval_all import main as eval_main
    out = tmp_path / "run"
    with RunLock.acquire(out, "pretrain", heartbeat_s=0):
        args = cli_args({**TINY, "data": tiny_suite / "train", "output_dir": out})
        assert run_cli(train_main, ["--preset", "vanilla", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"run folder '{out}' is in use by pretrain on host {HOST}" in err
        assert run_cli(eval_main, ["--ckpt", "random", "--arch", "vit_tiny", "--data-root", str(tiny_suite.parent),
                                   "--out", str(out)]) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written beside the lock


def test_two_runs_on_one_folder_then_a_killed_holder(tiny_suite, tmp_path):
    """The first run trains; a second on the same folder stops at once without writing; the first is then
    SIGKILLed, and a third run takes its lock over and resumes from its checkpoint."""
    out = tmp_path / "run"
    settings = dict(TINY, epochs=50, save_every_steps=5, saveckp_freq=0, data=tiny_suite / "train", output_dir=out)
    first = subprocess.Popen(train_command(settings), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(step_records(out / "log.jsonl")) < 6 if (out / "log.jsonl").exists() else True:
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.05)
        second = subprocess.run(train_command(settings), cwd=REPO, env=subprocess_env(), capture_output=True,
                                text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second started: make it longer"
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1
        assert f"in use by pretrain on host {HOST}, pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines(keepends=True)
               if line.endswith("\n")]
    iterations = [r["iteration"] for r in records if r["kind"] == "step"]
    assert iterations == list(range(1, len(iterations) + 1))  # one writer: every step once, in order
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # the killed holder's lock stays
    third = subprocess.run(train_command({**settings, "epochs": 1}), cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"taking over the lock of '{out}' from pretrain on host {HOST}, pid {first.pid}" in third.stderr
    assert "no longer runs on this host" in third.stderr
    assert not (out / LOCK_NAME).exists()


def test_under_torchrun_rank_zero_names_the_holder_and_every_rank_stops(tiny_suite, tmp_path):
    out = tmp_path / "ddp"
    with RunLock.acquire(out, "pretrain", heartbeat_s=0):
        settings = dict(TINY, batch_size_per_gpu=4, data=tiny_suite / "train", output_dir=out)
        done = subprocess.run(train_command(settings, 2), cwd=REPO, env=subprocess_env(), capture_output=True,
                              text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count(f"error: run folder '{out}' is in use by pretrain on host {HOST}, pid {os.getpid()}") == 1
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr  # no crash
    assert not out.exists()


def test_an_output_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, tiny_suite, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot write in the output folder '.*a-file/run' \(Not a directory\)"):
        RunLock.acquire(blocker / "run", "pretrain", heartbeat_s=0)
    args = cli_args({**TINY, "data": tiny_suite / "train", "output_dir": blocker / "run"})
    assert run_cli(train_main, ["--preset", "vanilla", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot write in the output folder")
