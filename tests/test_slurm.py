"""pretrain.slurm: the local executor end to end (2-process DDP, pre-emption + requeue + resume),
the sbatch script it writes for a cluster (fake sbatch), the SLURM -> torch.distributed variables,
one-line errors."""
import json
import os
import pickle
import re
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from tiny_runs import REPO, TINY, cli_args  # noqa: E402

from common.errors import run_cli  # noqa: E402
from pretrain import slurm  # noqa: E402
from pretrain.checkpoint import safe_load  # noqa: E402
from pretrain.distributed import init_distributed  # noqa: E402

# 120 tiny-suite images: 15 steps of 8 in one process, 15 steps of 4 per process in two
TINY_RUN = {**TINY, "epochs": 1, "saveckp_freq": 0}


def train_args(data: Path, out: Path, **overrides) -> list[str]:
    return ["--preset", "vanilla", *cli_args({**TINY_RUN, **overrides, "data": data, "output_dir": out})]


@pytest.fixture
def job_processes(monkeypatch):
    """Tasks inherit this environment: one thread each (two tasks share two cores), the repo importable."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)
    jobs = []
    yield jobs
    for job in jobs:  # a failed test leaves no job running
        if job.state == "RUNNING":
            job.cancel()


def wait(job, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while job.state == "RUNNING":
        assert time.monotonic() < deadline, f"job still running after {timeout_s} s: {job.stderr()}"
        time.sleep(0.1)


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def test_local_executor_runs_two_process_pretraining(tiny_suite, tmp_path, monkeypatch, capsys, job_processes):
    out = tmp_path / "run"
    submit = slurm.submit

    def submit_and_keep(*args):
        job_processes.append(submit(*args))
        return job_processes[-1]

    monkeypatch.setattr(slurm, "submit", submit_and_keep)
    argv = ["--executor", "local", "--nodes", "1", "--gpus-per-node", "2", "--timeout-min", "10", "--",
            *train_args(tiny_suite / "train", out, batch_size_per_gpu=4)]
    assert run_cli(slurm.main, argv) == 0
    job = job_processes[0]
    printed = capsys.readouterr().out
    assert f"submitted job {job.job_id} (local, 1 node(s) x 2 GPU(s))" in printed
    assert f"logs: {out / 'slurm'}/{job.job_id}_<task>_log.out|.err" in printed
    assert "without --save-every-steps" in printed
    wait(job)
    assert job.results() == [0, 0]
    # 15 steps of 4 images per process cover the 120 images once only with a world of 2
    summary, = records(out, "summary")
    assert summary["iterations"] == 15 and not summary["resumed"]
    assert safe_load(out / "checkpoint.pth")["epoch"] == 1
    assert "global_rank=1(2)" in (out / "slurm" / f"{job.job_id}_1_log.out").read_text()


def test_preempted_job_is_requeued_and_resumes(tiny_suite, tmp_path, job_processes):
    out, every = tmp_path / "run", 3
    argv = ["--executor", "local", "--nodes", "1", "--gpus-per-node", "1", "--timeout-min", "60", "--",
            *train_args(tiny_suite / "train", out, save_every_steps=every)]
    job = slurm.submit(*slurm.parse(argv))
    job_processes.append(job)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pth").exists():
        assert job.state == "RUNNING" and time.monotonic() < deadline, job.stderr()
        time.sleep(0.05)
    saved_step = safe_load(out / "checkpoint.pth")["step"]
    # what SLURM does ahead of a pre-emption: USR2 to the task (submitit's LocalJob._interrupt signals the
    # local controller process instead, which does not handle it)
    controller = job._process.pid
    task, = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    os.kill(int(task), signal.SIGUSR2)
    wait(job)
    assert job.result() == 0
    log = job.stdout()
    assert "this job is preempted" in log and f"Requeued job {job.job_id}" in log
    assert log.count("Starting with JobEnvironment") == 2
    assert job.submission().function == slurm.PretrainJob(tuple(argv[argv.index("--") + 1:]))
    # the second run started from a step checkpoint at least as recent as the one seen before the signal
    summary, = records(out, "summary")  # the interrupted run never wrote one
    assert summary["resumed"] and summary["iterations"] == 15
    assert saved_step <= summary["start_iteration"] < 15 and summary["start_iteration"] % every == 0
    assert safe_load(out / "checkpoint.pth")["epoch"] == 1


def test_checkpoint_resubmits_an_equal_job():
    job = slurm.PretrainJob(("--data", "d", "--output-dir", "o"))
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function == job and delayed.function is not job
    assert delayed.args == () and delayed.kwargs == {}
    assert pickle.loads(pickle.dumps(delayed.function)) == job


def fake_slurm(tmp_path: Path, sbatch_body: str) -> Path:
    """A bin/ with an srun (to be found) and an sbatch running ``sbatch_body``; the script is kept as job.sh."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", f'cp "$1" {tmp_path}/job.sh\n{sbatch_body}')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def test_sbatch_script_for_two_nodes_of_eight_gpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path, 'echo Submitted batch job 4242')}:{os.environ['PATH']}")
    out = tmp_path / "run"
    args = train_args(tmp_path / "data", out, save_every_steps=500)
    argv = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "learnlab", "--account", "dino",
            "--constraint", "volta32gb", "--mem-gb", "480", "--timeout-min", "2880", "--", *args]
    assert run_cli(slurm.main, argv) == 0
    assert "submitted job 4242 (slurm, 2 node(s) x 8 GPU(s))" in capsys.readouterr().out
    script = (tmp_path / "job.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--partition=learnlab", "--account=dino", "--constraint=volta32gb", "--mem=480GB",
                 "--time=2880", "--signal=USR2@90", "--job-name=dino-run"):
        assert f"#SBATCH {line}\n" in script, line
    assert f"-m submitit.core._submit {out / 'slurm'}" in script
    delayed = submitit.helpers.DelayedSubmission.load(out / "slurm" / "4242_submitted.pkl")
    assert delayed.function == slurm.PretrainJob(tuple(args))


@pytest.mark.parametrize("case,argv_launcher,train_overrides,expected", [
    ("no output dir", ["--gpus-per-node", "1"], {"output_dir": None}, "no --output-dir after '--'"),
    ("no data", ["--gpus-per-node", "1"], {"data": None}, "no training data given"),
    ("no train args", ["--gpus-per-node", "1"], None, "no training arguments: put them after '--'"),
    ("bad train flag", ["--gpus-per-node", "1"], {"epochz": 3}, "unrecognized arguments: --epochz 3"),
    ("bad launcher flag", ["--gpu-count", "1"], {}, "unrecognized arguments: --gpu-count"),
    ("zero nodes", ["--nodes", "0", "--gpus-per-node", "8"], {}, "--nodes 0: must be at least 1"),
    ("zero gpus", ["--gpus-per-node", "0", "--timeout-min", "0"], {}, "--gpus-per-node 0, --timeout-min 0: must be"),
    ("local on 2 nodes", ["--executor", "local", "--nodes", "2"], {}, "local executor runs on this machine only"),
    ("no srun", ["--gpus-per-node", "1"], {}, "cannot submit to SLURM here: no .srun. on PATH.*--executor local"),
    ("sbatch refuses", ["--gpus-per-node", "1"], {}, "sbatch refused the job: sbatch: error: invalid partition"),
    ("no submitit", ["--gpus-per-node", "1"], {}, "submitit is not installed: pip install submitit"),
])
def test_bad_arguments_give_one_line_error(tmp_path, monkeypatch, capsys, case, argv_launcher, train_overrides,
                                           expected):
    settings = {"data": tmp_path / "data", "output_dir": tmp_path / "run", **(train_overrides or {})}
    argv = [*argv_launcher, "--", "--preset", "vanilla",
            *cli_args({k: v for k, v in settings.items() if v is not None})]
    if train_overrides is None:
        argv = argv_launcher
    no_slurm = tmp_path / "empty"  # a PATH without srun / sbatch, even on a cluster, unless faked below
    no_slurm.mkdir()
    if case == "sbatch refuses":
        no_slurm = fake_slurm(tmp_path, 'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1')
    monkeypatch.setenv("PATH", f"{no_slurm}:/usr/bin:/bin")
    if case == "no submitit":
        monkeypatch.setitem(sys.modules, "submitit", None)
    assert run_cli(slurm.main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error, = captured.err.splitlines()
    assert error.startswith("error: ") and re.search(expected, error), error
    assert not (tmp_path / "run" / "slurm").exists() or case == "sbatch refuses"


def test_slurm_allocation_becomes_what_init_distributed_reads(monkeypatch):
    import torch.distributed as dist
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # task 9 of 16: the second task on the second of nodes gpu07, gpu08, as srun describes it
    slurm_env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1234567", "SLURM_JOB_NODELIST": "gpu[07-08]",
                 "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
                 "SLURM_LOCALID": "1"}
    for name, value in slurm_env.items():
        monkeypatch.setenv(name, value)
    variables = slurm.distributed_env(submitit.JobEnvironment())
    assert variables == {"MASTER_ADDR": "gpu07", "MASTER_PORT": "24567", "RANK": "9",
                         "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    joined = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (9, 16, 1)
    assert joined["rank"] == 9 and joined["world_size"] == 16 and joined["init_method"] == "env://"
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu07", "24567")
    # one node: the loopback address (no name lookup); the local executor's job id is its controller's pid
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    assert slurm.distributed_env(submitit.JobEnvironment())["MASTER_ADDR"] == "127.0.0.1"
    local_env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "31337", "SUBMITIT_LOCAL_NTASKS": "2",
                 "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}
    for name, value in local_env.items():
        monkeypatch.setenv(name, value)
    assert slurm.distributed_env(submitit.JobEnvironment()) == {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "21337", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
