"""The DINO training loop: data, checkpoints, logs, resumption (the model and its step: `pretrain.dino`).

`Trainer` lists the images (skipping undecodable ones), builds the multi-crop pipeline and the sampler
sharded over the processes, and runs ``DINO.step`` on each batch, iteration ``it = epoch * iters_per_epoch
+ step``. Around the steps it writes ``log.jsonl`` (a ``setup`` record at each start, ``step`` records every
``log_every_steps`` with the schedules and the collapse monitors, ``epoch`` records with the k-NN monitor),
TensorBoard events beside it, and checkpoints (atomic, rotated; the official key layout), and resumes from
the newest loadable one.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from common.atomic import atomic_write_text
from common.errors import UserError
from common.progress import ProgressBar, progress_bar, write
from common.run_lock import RunLock
from data.imagefolder import ImageFolder, check_bad_fraction

from .augment import MultiCropAugmentation
from .backbones import describe
from .batch_augment import crop_pipeline, resolve_pipeline
from .checkpoint import atomic_save
from .checkpoint_files import load_training_checkpoint, save_training_checkpoint
from .config import TrainConfig, to_dict
from .dino import DINO, StepOutput
from .distributed import DistInfo, all_reduce_max, all_reduce_mean, barrier
from .presets import start_notes
from .run_log import CollapseWatch, RunLog
from .sampler import ShardedSampler
from .tensorboard_log import TensorBoardLog


class Trainer:
    """The loop of one run (one process): data, the `DINO` model, checkpoints, logs."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, monitor: Callable[[nn.Module], dict] | None = None,
                 lock: RunLock | None = None):
        """``lock``: the run folder's lock (rank 0, `pretrain.distributed.main_process_lock`), checked before
        every checkpoint and log step so that a process whose lock was taken over stops writing."""
        self.cfg, self.dist, self.monitor, self.lock = cfg, dist_info, monitor, lock
        self.device = dist_info.device
        self.output_dir = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)

        base = ImageFolder(cfg.data, allow_flat=True, skip_bad=True, bad_log=self.output_dir / "bad_images.tsv",
                           max_pixels=cfg.max_image_pixels)
        self.images, self.listed_images = base, len(base.samples) + len(base.skipped)
        self.reported_bad: set[str] = set()
        check_bad_fraction(len(base.skipped), self.listed_images, cfg.max_bad_fraction, [p for p, _ in base.skipped])
        self.augmentation = MultiCropAugmentation.from_config(cfg)
        self.augment_on, self.decode_on = resolve_pipeline(cfg.augment_on, cfg.decode_on, self.device)
        self.dataset, self.collate_fn, self.crops_on = crop_pipeline(self.augment_on, base, self.augmentation,
                                                                     cfg.seed, self.decode_on)
        self.sampler = ShardedSampler(len(self.dataset), dist_info.world_size, dist_info.rank, seed=cfg.seed)
        self.iters_per_epoch = self.sampler.per_rank // cfg.batch_size_per_gpu
        if self.iters_per_epoch == 0:
            raise UserError(f"{len(base)} images in '{cfg.data}' are fewer than one batch of "
                            f"{cfg.batch_size_per_gpu} x {dist_info.world_size} processes: lower --batch-size-per-gpu")

        self.model = DINO(cfg, dist_info, self.augmentation.ncrops, self.iters_per_epoch)
        self.start_notes = start_notes(cfg.preset, self.model.global_batch, cfg.lr, self.model.peak_lr, cfg.epochs,
                                       cfg.warmup_teacher_temp_epochs, self.model.loss_fn.teacher_temp(cfg.epochs - 1),
                                       cfg.teacher_temp)
        self.start_epoch, self.start_step = 0, 0
        self.log_path = self.output_dir / "log.jsonl"
        self.run_log = RunLog(self.log_path, dist_info.is_main)
        self.collapse_watch = CollapseWatch(cfg.out_dim)
        self.tensorboard: TensorBoardLog | None = None  # opened by `fit`, once the resume point is known

    def setup_record(self) -> dict:
        """What this run is made of (the log's ``setup`` record, written at each start): processes, DDP,
        SyncBatchNorm, precision, where the crops are made, compile."""
        return {"kind": "setup", "device": str(self.device), "world_size": self.dist.world_size,
                "distributed": self.dist.enabled, **self.model.describe(),
                "augment_on": self.augment_on, "decode_on": self.decode_on}

    # ---------------------------------------------------------------- state
    def checkpoint_state(self, epoch_done: int, step: int) -> dict:
        """The whole training state: the model's (`DINO.state_dict`), where the run is, its arguments (with
        the backbone's description, for loaders) and the RNG states."""
        args = to_dict(self.cfg)
        args["backbone"] = describe(self.model.teacher.backbone)
        return {**self.model.state_dict(), "epoch": epoch_done, "step": step,
                "global_batch": self.model.global_batch, "args": args,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def save(self, epoch_done: int, step: int) -> None:
        self.check_finite()  # never replace a good checkpoint with a diverged state
        if not self.dist.is_main:
            return
        if self.lock is not None:
            self.lock.assert_held()
        state = self.checkpoint_state(epoch_done, step)
        save_training_checkpoint(state, self.output_dir, epoch_done * self.iters_per_epoch + step,
                                 keep=self.cfg.keep_checkpoints)
        freq = self.cfg.saveckp_freq
        if step == 0 and freq and (epoch_done - 1) % freq == 0:
            atomic_save(state, self.output_dir / f"checkpoint{epoch_done - 1:04d}.pth")

    def maybe_resume(self) -> bool:
        """Load the newest loadable checkpoint of the run folder (a corrupt newest one: the previous, with a
        warning); False when there is none."""
        state, path, warnings = load_training_checkpoint(self.output_dir)
        self.resume_warnings = warnings
        for warning in warnings:
            if self.dist.is_main:
                write(f"warning: {warning}", file=sys.stderr)
        if state is None:
            return False
        try:
            self.model.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as error:
            message = " ".join(str(error).split())[:240]
            raise UserError(f"cannot resume from '{path}' ({message}): it was written for another arch or "
                            "config; choose a new --output-dir") from None
        self.start_epoch, self.start_step = int(state["epoch"]), int(state.get("step", 0))
        global_batch = self.model.global_batch
        saved_batch = int(state.get("global_batch", global_batch))
        if saved_batch != global_batch:  # other process count or batch: resume at the same sample of the epoch
            self.start_step = min(self.start_step * saved_batch // global_batch, self.iters_per_epoch)
            self.batch_changed = (saved_batch, global_batch)
        rng = state.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if torch.cuda.is_available() and rng["cuda"]:
                torch.cuda.set_rng_state_all(rng["cuda"])
        return True

    def log(self, record: dict) -> None:
        """A record into log.jsonl and, for step and epoch records, into the TensorBoard events."""
        self.run_log.write(record)
        if record.get("kind") in ("step", "epoch") and self.tensorboard is not None:
            self.tensorboard.scalars(record, step=record.get("iteration", self.iteration))

    def check_finite(self) -> None:
        """Stop (UserError) if a loss since the start was NaN or infinite; a host sync, so not every step."""
        iteration = self.model.first_nonfinite_iteration()
        if iteration is not None:
            raise UserError(f"loss is not finite (NaN or inf) at iteration {iteration}: training diverged; lower "
                            f"--lr, use --precision fp32, or check the data (the last checkpoint in "
                            f"'{self.output_dir}' was saved before it and is intact; run again to resume from it)")

    # ---------------------------------------------------------------- steps
    def train_step(self, crops: list[torch.Tensor], epoch: int, it: int, monitors: bool = False) -> StepOutput:
        """The batch's crops onto the device (made there when the crops are batched on the device), then
        one `DINO.step`; no host synchronisation."""
        return self.model.step(self.crops_on(crops, self.device), epoch, it, monitors)

    def make_loader(self) -> torch.utils.data.DataLoader:
        """One loader for the run; the sampler (in this process) is re-aimed each epoch."""
        workers = self.cfg.num_workers
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg.batch_size_per_gpu, sampler=self.sampler,
                                           num_workers=workers, pin_memory=self.device.type == "cuda",
                                           collate_fn=self.collate_fn,
                                           # its own generator: worker seeds must not draw from the global RNG,
                                           # or a resumed run's dropout/drop-path draws would shift
                                           generator=torch.Generator().manual_seed(self.cfg.seed),
                                           drop_last=True, persistent_workers=workers > 0,
                                           prefetch_factor=4 if workers else None)

    def max_steps_reached(self) -> bool:
        return bool(self.cfg.max_steps) and self.steps_done >= self.cfg.max_steps

    def train_epoch(self, loader, epoch: int, first_step: int, bar: ProgressBar) -> list[torch.Tensor]:
        """Steps ``first_step``.. of ``epoch`` (fewer if ``max_steps`` is reached)."""
        cfg = self.cfg
        self.sampler.set_epoch(epoch, first_step, cfg.batch_size_per_gpu)
        losses = []
        for step, crops in enumerate(loader, start=first_step):
            it = self.iteration
            log_step = (it + 1) % max(cfg.log_every_steps, 1) == 0
            output = self.train_step(crops, epoch, it, monitors=log_step)
            losses.append(output.loss)
            self.iteration, self.steps_done = it + 1, self.steps_done + 1
            bar.update(1)
            if log_step:
                self.log_step(epoch, it, output, bar)
            if self.max_steps_reached():
                break
            if cfg.save_every_steps and self.iteration % cfg.save_every_steps == 0 and step + 1 < self.iters_per_epoch:
                self.save(epoch, step + 1)
        return losses

    def log_step(self, epoch: int, it: int, output: StepOutput, bar: ProgressBar) -> None:
        """The step record (schedules, loss, collapse monitors); collapse warnings; the non-finite check."""
        self.check_finite()
        if self.lock is not None:
            self.lock.assert_held()
        bad_images = self.check_bad_images()
        monitors = {name: value.item() for name, value in output.monitors.items()}
        loss = output.loss.item()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.model.lr_schedule[it]:.2e}")
        self.log({"kind": "step", "epoch": epoch, "iteration": it + 1, "loss": loss,
                  "lr": float(self.model.lr_schedule[it]), "wd": float(self.model.wd_schedule[it]),
                  "teacher_momentum": float(self.model.momentum_schedule[it]),
                  "teacher_temp": self.model.loss_fn.teacher_temp(epoch), "bad_images": bad_images, **monitors})
        for warning in self.collapse_watch.update(monitors, it + 1):
            self.log({"kind": "warning", "iteration": it + 1, "message": warning})
            if self.dist.is_main:
                write(f"warning: {warning}", file=sys.stderr)

    def check_bad_images(self) -> int:
        """Log the images found undecodable since the last call (any process, any worker); stop when more
        than ``max_bad_fraction`` of the listed images are bad (decided alike on every rank). Returns the count."""
        bad = self.images.bad_files()
        for path in sorted(set(bad) - self.reported_bad):
            self.log({"kind": "bad_image", "path": path, "reason": bad[path]})
        self.reported_bad |= set(bad)
        worst = int(all_reduce_max(len(bad), self.dist))
        check_bad_fraction(worst, self.listed_images, self.cfg.max_bad_fraction, sorted(bad))
        return len(bad)

    def end_epoch(self, epoch: int, losses: list[torch.Tensor]) -> None:
        """Epoch record (means, teacher temperature, kNN monitor of the teacher and of the student) and checkpoint."""
        cfg, it = self.cfg, self.iteration - 1
        record = {"kind": "epoch", "epoch": epoch,
                  "train_loss": all_reduce_mean(torch.stack(losses).mean().item() if losses else 0.0, self.dist),
                  "train_lr": float(self.model.lr_schedule[it]), "train_wd": float(self.model.wd_schedule[it]),
                  "teacher_temp": self.model.loss_fn.teacher_temp(epoch)}
        if self.monitor is not None and cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            if self.dist.is_main:  # the paper's observation: the teacher leads the student
                record.update(self.monitor(self.model.teacher.backbone))
                record.update({f"student_{name}": value
                               for name, value in self.monitor(self.model.student.backbone).items()})
            barrier(self.dist)
        self.log(record)
        if self.tensorboard is not None:
            self.tensorboard.flush()
        self.save(epoch + 1, 0)

    def fit(self) -> dict:
        """Train from the last checkpoint (if any) to the end; returns a summary."""
        cfg = self.cfg
        self.batch_changed = None
        resumed = self.maybe_resume()
        self.iteration = self.start_epoch * self.iters_per_epoch + self.start_step
        if self.dist.is_main:
            for note in self.start_notes:
                write(note, file=sys.stderr)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
            # TensorBoard: rank 0; a resumed run hides the interrupted run's events after the resume point
            self.tensorboard = TensorBoardLog(self.output_dir, enabled=cfg.tensorboard,
                                              purge_step=self.iteration if resumed else None)
            if resumed:
                self.run_log.trim_for_resume(self.start_epoch, self.iteration)
                for warning in self.resume_warnings:
                    self.log({"kind": "warning", "iteration": self.iteration, "message": warning})
            if self.batch_changed:
                saved, now = self.batch_changed
                write(f"note: the checkpoint was written with a global batch of {saved}, this run has {now}: "
                      f"resuming at the same image of epoch {self.start_epoch} (iteration {self.iteration}); "
                      "the run is no longer bit-identical to an uninterrupted one", file=sys.stderr)
            self.log({**self.setup_record(), "iteration": self.iteration})
        barrier(self.dist)
        self.steps_done = 0
        summary = {"resumed": resumed, "start_iteration": self.iteration}
        loader = self.make_loader()
        t_start = time.perf_counter()
        try:
            with progress_bar(total=cfg.epochs * self.iters_per_epoch, initial=self.iteration,
                              disable=not self.dist.is_main, desc="pretrain", unit="it", dynamic_ncols=True) as bar:
                for epoch in range(self.start_epoch, cfg.epochs):
                    first_step = self.start_step if epoch == self.start_epoch else 0
                    losses = self.train_epoch(loader, epoch, first_step, bar)
                    if first_step + len(losses) < self.iters_per_epoch:  # stopped mid-epoch by max_steps
                        self.save(epoch, first_step + len(losses))
                        break
                    self.end_epoch(epoch, losses)
                    if self.max_steps_reached():
                        break
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
        elapsed = time.perf_counter() - t_start
        images = self.steps_done * self.model.global_batch
        summary.update(iterations=self.iteration, seconds=elapsed,
                       images_per_second=images / elapsed if elapsed > 0 else 0.0,
                       peak_memory_gb=peak_memory_gb(self.device))
        if self.dist.is_main:
            self.log({"kind": "summary", **summary})
        return summary


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
