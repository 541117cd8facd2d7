"""Launch pretraining on SLURM through submitit: one task per GPU, requeued on pre-emption.

Example, 2 nodes x 8 GPUs on partition ``learnlab`` (16 processes, global batch 16 x 64)::

    python -m pretrain.slurm --nodes 2 --gpus-per-node 8 --partition learnlab --timeout-min 2880 \\
        -- --preset paper --data /data/imagenet/train --output-dir runs/paper-vits16 --save-every-steps 500

Everything after ``--`` is passed to ``python -m pretrain.train`` unchanged
(checked here first, so that a typo fails now and not after a wait in the
queue). The job runs ``pretrain.train.main`` in every task, with the
variables `pretrain.distributed.init_distributed` reads set from the SLURM
allocation (`distributed_env`). Logs go to ``<folder>/<job id>_<task>_log.out``
and ``.err`` (``--folder``, default ``<output-dir>/slurm``).

Requeue and resume: SLURM sends the job USR2 90 s before its time limit,
and on pre-emption where the cluster is set to (slurm.conf
``PreemptParameters=send_user_signal``). submitit then calls
`PretrainJob.checkpoint`, which hands back the same job with the same
arguments, and requeues it (``scontrol requeue``, same job id). The requeued
job finds ``<output-dir>/checkpoint.pth`` and the trainer resumes from it by
itself; since the job holds no state of its own, a job that SLURM requeues by
itself (``PreemptMode=REQUEUE``) resumes the same way. Nothing is saved on
the signal: what is lost is the work since the last checkpoint, at most N
steps with ``--save-every-steps N`` (else the epoch in progress). Time-outs
are requeued ``--max-timeouts`` times; pre-emptions without limit.

``--executor local`` runs the same job object with submitit's local executor
(one node, the tasks as processes on this machine): a dry run on a
workstation, and what the tests use.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError, run_cli

from . import config as config_module
from .train import add_train_arguments, config_from_args

# MASTER_PORT = PORT_BASE + job id % PORT_RANGE: below Linux's ephemeral range (32768-60999),
# different for consecutive jobs sharing a node, the same in every task of one job
PORT_BASE, PORT_RANGE = 10000, 20000


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a `UserError` (one line, exit 2 through `run_cli`), not usage + message."""

    def __init__(self, *args, help_command: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.help_command = help_command

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.help_command})")


def launcher_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="pretrain.slurm", help_command="python -m pretrain.slurm --help",
                            description=__doc__.split("\n\n")[0],
                            usage="python -m pretrain.slurm --nodes N --gpus-per-node G [options] "
                                  "-- <pretrain.train arguments>")
    parser.add_argument("--nodes", type=int, default=1, help="(default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="one task (process) per GPU (default: 8)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--constraint", default=None, help="node features, e.g. volta32gb")
    parser.add_argument("--timeout-min", type=int, default=2880, help="time limit of one allocation in minutes "
                        "(default: 2880, 48 h; the partition's limit may be lower)")
    parser.add_argument("--max-timeouts", type=int, default=20,
                        help="how many times a timed-out job is requeued (default: 20; pre-emptions: no limit)")
    parser.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: the cluster's)")
    parser.add_argument("--cpus-per-task", type=int, default=10, help="cores per GPU, for data loading (default: 10)")
    parser.add_argument("--folder", default=None, help="submitit logs and pickles (default: <output-dir>/slurm)")
    parser.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                        help="slurm (sbatch), or local: the tasks as processes on this machine (default: slurm)")
    return parser


def train_parser() -> argparse.ArgumentParser:
    """The ``pretrain.train`` command line (same flags), to check the arguments before submitting."""
    parser = _OneLineParser(prog="training arguments after '--'", help_command="python -m pretrain.train --help")
    add_train_arguments(parser)
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, pretrain.train arguments), split at the first ``--``."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def check_train_args(train_args: list[str]) -> config_module.TrainConfig:
    """The resolved config of ``train_args``; a `UserError` for what would only fail on the cluster."""
    args = train_parser().parse_args(train_args)
    cfg = config_from_args(args)
    if not cfg.data:
        raise UserError("no training data given: pass --data <image folder> after '--'")
    if args.output_dir is None:
        raise UserError("no --output-dir after '--': a requeued job resumes from <output-dir>/checkpoint.pth, "
                        "so name the run folder explicitly (e.g. --output-dir runs/<name>)")
    return cfg


def distributed_env(job_env) -> dict[str, str]:
    """The variables `pretrain.distributed.init_distributed` reads, from a submitit ``JobEnvironment``.

    RANK / WORLD_SIZE / LOCAL_RANK take precedence there over SLURM_PROCID /
    SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR is the job's first node (the
    loopback address on a single node, which needs no name resolution).
    """
    digits = re.sub(r"\D", "", str(job_env.job_id)) or "0"
    return {
        "MASTER_ADDR": job_env.hostnames[0] if job_env.num_nodes > 1 else "127.0.0.1",
        "MASTER_PORT": str(PORT_BASE + int(digits) % PORT_RANGE),
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
    }


@dataclass(frozen=True)
class PretrainJob:
    """What every task of the job runs: ``pretrain.train.main(train_args)`` in the job's process group.

    Pickled by submitit (by reference: the job imports this module, so it
    runs from the repository root, like every entry point of this project).
    """

    train_args: tuple[str, ...]

    def __call__(self) -> int:
        import submitit

        from .train import main as train_main

        os.environ.update(distributed_env(submitit.JobEnvironment()))
        status = run_cli(train_main, list(self.train_args))
        if status:  # a user error was printed on one line in the task's .err log; the job fails with it
            raise SystemExit(status)
        return status

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on pre-emption or time-out: requeue the same command; it resumes by itself."""
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.train_args))


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("submitit is not installed: pip install submitit (it is in pyproject.toml; "
                        "'make venv' installs it)") from None
    return submitit


def build_executor(options: argparse.Namespace, folder: Path, job_name: str):
    """A submitit executor for ``options.nodes`` x ``options.gpus_per_node`` tasks."""
    submitit = import_submitit()
    if options.executor == "slurm" and shutil.which("srun") is None:
        raise UserError("cannot submit to SLURM here: no 'srun' on PATH; run this on a login node of the cluster, "
                        "or pass --executor local for a dry run on this machine")
    executor = submitit.AutoExecutor(folder, cluster=options.executor,
                                     **{f"{options.executor}_max_num_timeout": options.max_timeouts})
    executor.update_parameters(name=job_name, nodes=options.nodes, tasks_per_node=options.gpus_per_node,
                               gpus_per_node=options.gpus_per_node, cpus_per_task=options.cpus_per_task,
                               timeout_min=options.timeout_min, mem_gb=options.mem_gb)
    slurm_only = {"slurm_partition": options.partition, "slurm_account": options.account,
                  "slurm_constraint": options.constraint}
    if options.executor == "slurm":
        executor.update_parameters(**{k: v for k, v in slurm_only.items() if v is not None})
    return executor


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], config_module.TrainConfig]:
    """(launcher options, pretrain.train arguments, their resolved config); a `UserError` if any is wrong."""
    launcher_args, train_args = split_argv(list(argv))
    options = launcher_parser().parse_args(launcher_args)
    counts = {"--nodes": options.nodes, "--gpus-per-node": options.gpus_per_node,
              "--timeout-min": options.timeout_min, "--cpus-per-task": options.cpus_per_task}
    below_one = [f"{flag} {value}" for flag, value in counts.items() if value < 1]
    if below_one:
        raise UserError(f"{', '.join(below_one)}: must be at least 1")
    if options.executor == "local" and options.nodes != 1:
        raise UserError(f"the local executor runs on this machine only: use --nodes 1 (not {options.nodes})")
    if not train_args:
        raise UserError("no training arguments: put them after '--', e.g. python -m pretrain.slurm --nodes 1 "
                        "--gpus-per-node 8 -- --data <image folder> --output-dir runs/<name>")
    return options, train_args, check_train_args(train_args)


def submit(options: argparse.Namespace, train_args: list[str], cfg: config_module.TrainConfig):
    """Submit `PretrainJob` (``train_args``) as ``options`` say; returns the submitit job."""
    folder = Path(options.folder or Path(cfg.output_dir) / "slurm")
    executor = build_executor(options, folder, f"dino-{Path(cfg.output_dir).name}")
    submitit = import_submitit()
    captured = io.StringIO()  # submitit echoes sbatch's stderr before raising; it is reported on one line
    try:
        with contextlib.redirect_stderr(captured):
            return executor.submit(PretrainJob(tuple(train_args)))
    except submitit.core.utils.FailedJobError as error:
        lines = [line for line in (str(error) or captured.getvalue()).splitlines() if line.strip()]
        raise UserError(f"sbatch refused the job: {lines[-1] if lines else 'no message'} "
                        "(check --partition, --account and --timeout-min against the cluster's limits)") from None


def main(argv=None) -> int:
    options, train_args, cfg = parse(sys.argv[1:] if argv is None else argv)
    job = submit(options, train_args, cfg)
    print(f"submitted job {job.job_id} ({options.executor}, {options.nodes} node(s) x {options.gpus_per_node} "
          f"GPU(s)); logs: {job.paths.folder}/{job.job_id}_<task>_log.out|.err; run folder: {cfg.output_dir} "
          "(a requeued job resumes from its checkpoint.pth)")
    if not Path(cfg.data).exists():
        print(f"note: --data '{cfg.data}' does not exist on this machine; the job fails unless its nodes see it")
    if not cfg.save_every_steps:
        print("note: without --save-every-steps a pre-empted job redoes the epoch it was in; "
              "--save-every-steps N bounds the loss to N steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
