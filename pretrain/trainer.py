"""The DINO training loop (PROTOCOLS A4-A9).

Per iteration ``it = epoch * iters_per_epoch + step``:
set lr (both groups) and wd (regularised group) from their schedules ->
teacher(global crops), student(all crops) under autocast -> DINO loss
(updates the center) -> backward -> per-parameter gradient clipping ->
drop last-layer grads during the first ``freeze_last_layer`` epochs ->
optimizer step -> EMA teacher update with momentum m(it).

Student and teacher are ``MultiCropWrapper(backbone, DINOHead)``; the
teacher starts as a copy of the student, gets no gradient, has no
drop-path, and stays in train mode (matters only for BatchNorm nets).
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
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.errors import UserError
from data.imagefolder import ImageFolder, check_bad_fraction
from common.run_lock import RunLock

from .augment import MultiCropAugmentation
from .backbones import build_backbone, describe
from .batch_augment import crop_pipeline, resolve_pipeline
from common.atomic import atomic_write_text

from .checkpoint import atomic_save, strip_prefixes
from .checkpoint_files import load_training_checkpoint, save_training_checkpoint
from .config import TrainConfig, to_dict
from .distributed import DistInfo, all_reduce_max, all_reduce_mean, barrier
from .head import DINOHead, MultiCropWrapper
from .loss import DINOLoss
from .presets import start_notes
from .run_log import CollapseWatch, RunLog
from .sampler import ShardedSampler
from common.scaling import scaled_lr

from .schedules import cosine_schedule


def build_student_teacher(cfg: TrainConfig, freeze: bool = True) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (the teacher a copy of the student, no drop-path). ``freeze=False`` leaves the
    teacher's parameters trainable, for a caller that must wrap it in DDP first (`freeze_teacher` after)."""
    sizes = dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, img_size=cfg.img_size)
    sizes = {k: v for k, v in sizes.items() if v is not None} if cfg.arch == "vit" else {}
    if cfg.arch != "resnet50":
        sizes.setdefault("img_size", cfg.img_size)
    patch = cfg.patch_size if cfg.arch != "resnet50" else None
    student_backbone = build_backbone(cfg.arch, patch, drop_path_rate=cfg.drop_path_rate, **sizes)
    teacher_backbone = build_backbone(cfg.arch, patch, drop_path_rate=0.0, **sizes)
    head_args = dict(out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                     use_bn=cfg.use_bn_in_head)
    student = MultiCropWrapper(student_backbone, DINOHead(student_backbone.embed_dim, norm_last_layer=cfg.norm_last_layer, **head_args))
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(teacher_backbone.embed_dim, **head_args))
    teacher.load_state_dict(student.state_dict())
    if freeze:
        freeze_teacher(teacher)
    return student, teacher


def freeze_teacher(teacher: nn.Module) -> None:
    """The teacher learns only by EMA: no parameter of it takes a gradient."""
    for param in teacher.parameters():
        param.requires_grad = False


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weights (ndim > 1, incl. pos_embed/cls_token); none on biases and norms."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or param.ndim <= 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_parameter(model: nn.Module, clip: float) -> None:
    """Scale each parameter's gradient so its own L2 norm is at most ``clip``."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(clip / (norm + 1e-6), max=1.0) for norm in norms]
    torch._foreach_mul_(grads, coefs)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for every parameter (pairs in order)."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"unknown precision '{cfg.precision}': use auto, bf16, fp16 or fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


class Trainer:
    """Owns models, optimizer, schedules and data for one run (one process)."""

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

        self.student, self.teacher, self.student_ddp, self.teacher_ddp = self.build_models()

        if cfg.compile == "on":  # forward only: state dicts and EMA keep using the plain modules
            self.student_ddp, self.teacher_ddp = torch.compile(self.student_ddp), torch.compile(self.teacher_ddp)
        elif cfg.compile != "off":
            raise UserError(f"unknown --compile '{cfg.compile}': use on or off")

        groups = param_groups(self.student)
        if cfg.optimizer == "adamw":  # fused: one kernel for all parameters (about 4x the foreach loop's speed)
            self.optimizer = torch.optim.AdamW(groups, **({"fused": True} if cfg.fused_optimizer else {"foreach": True}))
        elif cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
        else:
            raise UserError(f"unknown optimizer '{cfg.optimizer}': use adamw or sgd")
        self.loss_fn = DINOLoss(cfg.out_dim, self.augmentation.ncrops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                cfg.warmup_teacher_temp_epochs, cfg.epochs, cfg.student_temp,
                                cfg.center_momentum).to(self.device)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

        if cfg.warmup_epochs > cfg.epochs:
            raise UserError(f"--warmup-epochs {cfg.warmup_epochs} is longer than the run (--epochs {cfg.epochs}): "
                            "lower --warmup-epochs")
        for flag, momentum in (("--momentum-teacher", cfg.momentum_teacher),
                               ("--momentum-teacher-end", cfg.momentum_teacher_end)):
            if not 0.0 <= momentum <= 1.0:
                raise UserError(f"{flag} {momentum} is not a momentum: pass a value in [0, 1] (1 freezes the teacher)")
        global_batch = cfg.batch_size_per_gpu * dist_info.world_size
        ipe = self.iters_per_epoch
        self.lr_schedule = cosine_schedule(scaled_lr(cfg.lr, global_batch), cfg.min_lr, cfg.epochs, ipe, cfg.warmup_epochs)
        self.wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, ipe)
        self.momentum_schedule = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, ipe)
        self.start_notes = start_notes(cfg.preset, global_batch, cfg.lr, scaled_lr(cfg.lr, global_batch), cfg.epochs,
                                       cfg.warmup_teacher_temp_epochs, self.loss_fn.teacher_temp(cfg.epochs - 1),
                                       cfg.teacher_temp)
        self.start_epoch, self.start_step = 0, 0
        self.log_path = self.output_dir / "log.jsonl"
        self.run_log = RunLog(self.log_path, dist_info.is_main)
        self.collapse_watch = CollapseWatch(cfg.out_dim)
        # first iteration whose loss was not finite (-1: none); checked at log steps and before every save
        self.first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)

    def build_models(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """(student, teacher, student as run, teacher as run): the plain modules (state dicts, EMA) and
        what the steps call (DDP-wrapped under a process group).

        With BatchNorm (a BN head, ResNet-50) under DDP the BatchNorm layers are synchronised over the
        processes (SyncBatchNorm, CUDA only: on the CPU they stay per process, with a note) and the teacher
        is wrapped in DDP too, as the official code does, so that its BatchNorm buffers follow rank 0. DDP
        refuses a module with no trainable parameter, so the teacher is frozen after it is wrapped."""
        cfg, info = self.cfg, self.dist
        student, teacher = build_student_teacher(cfg, freeze=False)
        student, teacher = student.to(self.device), teacher.to(self.device)
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
        student_run, teacher_run = student, teacher
        if info.enabled:
            if self.has_bn and self.device.type == "cuda":
                student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
                teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
            elif self.has_bn and info.is_main:
                tqdm.write("note: BatchNorm is per process on the CPU (SyncBatchNorm needs CUDA): each process "
                           "normalises with its own batch statistics", file=sys.stderr)
            ids = [self.device.index] if self.device.type == "cuda" else None
            student_run = DistributedDataParallel(student, device_ids=ids)
            teacher_run = DistributedDataParallel(teacher, device_ids=ids) if self.has_bn else teacher
        freeze_teacher(teacher)
        return student, teacher, student_run, teacher_run

    def setup_record(self) -> dict:
        """What this run is made of (the log's ``setup`` record, written at each start): processes, DDP,
        SyncBatchNorm, precision, where the crops are made, compile."""
        sync_bn = sum(isinstance(m, nn.SyncBatchNorm) for m in self.student.modules())
        return {"kind": "setup", "device": str(self.device),
                "world_size": self.dist.world_size, "distributed": self.dist.enabled,
                "ddp_student": isinstance(self.student_ddp, DistributedDataParallel) or
                isinstance(getattr(self.student_ddp, "_orig_mod", None), DistributedDataParallel),
                "ddp_teacher": isinstance(self.teacher_ddp, DistributedDataParallel) or
                isinstance(getattr(self.teacher_ddp, "_orig_mod", None), DistributedDataParallel),
                "batchnorm": self.has_bn, "sync_batchnorm_layers": sync_bn,
                "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
                "augment_on": self.augment_on, "decode_on": self.decode_on, "compile": self.cfg.compile,
                "global_batch": self.cfg.batch_size_per_gpu * self.dist.world_size}

    # ---------------------------------------------------------------- state
    def checkpoint_state(self, epoch_done: int, step: int) -> dict:
        args = to_dict(self.cfg)
        args["backbone"] = describe(self.teacher.backbone)
        state = {
            "student": {"module." + k: v for k, v in self.student.state_dict().items()},
            "teacher": ({"module." + k: v for k, v in self.teacher.state_dict().items()}
                        if self.has_bn and self.dist.enabled else self.teacher.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch_done,
            "step": step,
            "global_batch": self.cfg.batch_size_per_gpu * self.dist.world_size,
            "args": args,
            "dino_loss": self.loss_fn.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        return state

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
                tqdm.write(f"warning: {warning}", file=sys.stderr)
        if state is None:
            return False
        try:
            self.student.load_state_dict(strip_prefixes(state["student"], ("module.",)))
            self.teacher.load_state_dict(strip_prefixes(state["teacher"], ("module.",)))
            self.optimizer.load_state_dict(state["optimizer"])
            self.loss_fn.load_state_dict(state["dino_loss"])
        except (KeyError, RuntimeError, ValueError) as error:
            message = " ".join(str(error).split())[:240]
            raise UserError(f"cannot resume from '{path}' ({message}): it was written for another arch or "
                            "config; choose a new --output-dir") from None
        if self.scaler is not None and "fp16_scaler" in state:
            self.scaler.load_state_dict(state["fp16_scaler"])
        self.start_epoch, self.start_step = int(state["epoch"]), int(state.get("step", 0))
        global_batch = self.cfg.batch_size_per_gpu * self.dist.world_size
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
        self.run_log.write(record)

    def check_finite(self) -> None:
        """Stop (UserError) if a loss since the start was NaN or infinite; a host sync, so not every step."""
        iteration = int(self.first_nonfinite.item())
        if iteration >= 0:
            raise UserError(f"loss is not finite (NaN or inf) at iteration {iteration}: training diverged; lower "
                            f"--lr, use --precision fp32, or check the data (the last checkpoint in "
                            f"'{self.output_dir}' was saved before it and is intact; run again to resume from it)")

    # ---------------------------------------------------------------- steps
    def train_step(self, crops: list[torch.Tensor], epoch: int, it: int, monitors: bool = False):
        """One optimisation step, with no host synchronisation; returns the loss (0-d tensor), or with
        ``monitors`` (loss, the `DINOLoss` collapse monitors as 0-d tensors). A non-finite loss is
        recorded in ``first_nonfinite`` and raised by `check_finite` at the next log step or save."""
        cfg = self.cfg
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[it])
            if index == 0:
                group["weight_decay"] = float(self.wd_schedule[it])
        crops = self.crops_on(crops, self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            with torch.no_grad():
                teacher_output = self.teacher_ddp(crops[:2])
            student_output = self.student_ddp(crops)
            loss = self.loss_fn(student_output, teacher_output, epoch, monitors=monitors)
            if monitors:
                loss, collapse = loss
        first = self.first_nonfinite
        self.first_nonfinite = torch.where((first < 0) & ~torch.isfinite(loss.detach()), it, first)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if cfg.clip_grad:
            clip_gradients_per_parameter(self.student, cfg.clip_grad)
        if epoch < cfg.freeze_last_layer:
            for name, param in self.student.named_parameters():
                if "last_layer" in name:
                    param.grad = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update(self.teacher, self.student, float(self.momentum_schedule[it]))
        return (loss.detach(), collapse) if monitors else loss.detach()

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

    def train_epoch(self, loader, epoch: int, first_step: int, bar: tqdm) -> list[torch.Tensor]:
        """Steps ``first_step``.. of ``epoch`` (fewer if ``max_steps`` is reached)."""
        cfg = self.cfg
        self.sampler.set_epoch(epoch, first_step, cfg.batch_size_per_gpu)
        losses = []
        for step, crops in enumerate(loader, start=first_step):
            it = self.iteration
            log_step = (it + 1) % max(cfg.log_every_steps, 1) == 0
            loss, collapse = self.train_step(crops, epoch, it, monitors=True) if log_step \
                else (self.train_step(crops, epoch, it), None)
            losses.append(loss)
            self.iteration, self.steps_done = it + 1, self.steps_done + 1
            bar.update(1)
            if log_step:
                self.log_step(epoch, it, loss, collapse, bar)
            if self.max_steps_reached():
                break
            if cfg.save_every_steps and self.iteration % cfg.save_every_steps == 0 and step + 1 < self.iters_per_epoch:
                self.save(epoch, step + 1)
        return losses

    def log_step(self, epoch: int, it: int, loss: torch.Tensor, collapse: dict, bar: tqdm) -> None:
        """The step record (schedules, loss, collapse monitors); collapse warnings; the non-finite check."""
        self.check_finite()
        if self.lock is not None:
            self.lock.assert_held()
        bad_images = self.check_bad_images()
        monitors = {name: value.item() for name, value in collapse.items()}
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.lr_schedule[it]:.2e}")
        self.log({"kind": "step", "epoch": epoch, "iteration": it + 1, "loss": loss.item(),
                  "lr": float(self.lr_schedule[it]), "wd": float(self.wd_schedule[it]),
                  "teacher_momentum": float(self.momentum_schedule[it]),
                  "teacher_temp": self.loss_fn.teacher_temp(epoch), "bad_images": bad_images, **monitors})
        for warning in self.collapse_watch.update(monitors, it + 1):
            self.log({"kind": "warning", "iteration": it + 1, "message": warning})
            if self.dist.is_main:
                tqdm.write(f"warning: {warning}", file=sys.stderr)

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
                  "train_lr": float(self.lr_schedule[it]), "train_wd": float(self.wd_schedule[it]),
                  "teacher_temp": self.loss_fn.teacher_temp(epoch)}
        if self.monitor is not None and cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            if self.dist.is_main:  # the paper's observation: the teacher leads the student
                record.update(self.monitor(self.teacher.backbone))
                record.update({f"student_{name}": value for name, value in self.monitor(self.student.backbone).items()})
            barrier(self.dist)
        self.log(record)
        self.save(epoch + 1, 0)

    def fit(self) -> dict:
        """Train from the last checkpoint (if any) to the end; returns a summary."""
        cfg = self.cfg
        self.batch_changed = None
        resumed = self.maybe_resume()
        self.iteration = self.start_epoch * self.iters_per_epoch + self.start_step
        if self.dist.is_main:
            for note in self.start_notes:
                tqdm.write(note, file=sys.stderr)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
            if resumed:
                self.run_log.trim_for_resume(self.start_epoch, self.iteration)
                for warning in self.resume_warnings:
                    self.log({"kind": "warning", "iteration": self.iteration, "message": warning})
            if self.batch_changed:
                saved, now = self.batch_changed
                tqdm.write(f"note: the checkpoint was written with a global batch of {saved}, this run has {now}: "
                           f"resuming at the same image of epoch {self.start_epoch} (iteration {self.iteration}); "
                           "the run is no longer bit-identical to an uninterrupted one", file=sys.stderr)
            self.log({**self.setup_record(), "iteration": self.iteration})
        barrier(self.dist)
        self.steps_done = 0
        summary = {"resumed": resumed, "start_iteration": self.iteration}
        loader = self.make_loader()
        t_start = time.perf_counter()
        with tqdm(total=cfg.epochs * self.iters_per_epoch, initial=self.iteration, disable=not self.dist.is_main,
                  desc="pretrain", unit="it", dynamic_ncols=True) as bar:
            for epoch in range(self.start_epoch, cfg.epochs):
                first_step = self.start_step if epoch == self.start_epoch else 0
                losses = self.train_epoch(loader, epoch, first_step, bar)
                if first_step + len(losses) < self.iters_per_epoch:  # stopped mid-epoch by max_steps
                    self.save(epoch, first_step + len(losses))
                    break
                self.end_epoch(epoch, losses)
                if self.max_steps_reached():
                    break
        elapsed = time.perf_counter() - t_start
        images = self.steps_done * cfg.batch_size_per_gpu * self.dist.world_size
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
