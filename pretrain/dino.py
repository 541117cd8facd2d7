"""The DINO model: student, teacher, head, loss, EMA, and one optimisation step (docs/protocols.md,
"Optimisation and schedules").

`DINO` owns what one step touches: the two networks, the optimizer, the loss (with its center), the
schedules indexed by the global iteration ``it``, and the precision. The training loop
(`pretrain.trainer.Trainer`) owns the data, the checkpoints, the logs and the distributed set-up, and calls
``DINO.step(crops, epoch, it)`` once per batch.

One step, with crops ``[g1, g2, l1, ..., lN]`` already on the device ((B, 3, S, S) each):

    lr (both parameter groups) <- lr_schedule[it];  weight decay (weights only) <- wd_schedule[it]
    t = teacher([g1, g2])           no gradient;         s = student([g1, g2, l1, ..., lN])
    L = DINOLoss(s, t, epoch)       (updates the center)
    backward(L) -> per-parameter clip of each gradient's norm to ``clip_grad``
    -> no update of the head's last layer while epoch < ``freeze_last_layer``
    -> optimizer step -> theta_t <- m theta_t + (1 - m) theta_s with m = momentum_schedule[it]

Student and teacher are ``MultiCropWrapper(backbone, DINOHead)``; the teacher starts as a copy of the
student, gets no gradient, has no drop-path, and stays in train mode (this matters only for BatchNorm).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from common.progress import write
from common.scaling import scaled_lr

from .backbones import build_backbone
from .checkpoint import strip_prefixes
from .config import TrainConfig
from .distributed import DistInfo
from .head import DINOHead, MultiCropWrapper
from .loss import DINOLoss
from .schedules import cosine_schedule


@dataclass
class StepOutput:
    """What one step returns: the loss (0-d tensor, detached, on the device: reading it syncs the host) and
    the collapse monitors (0-d tensors; empty unless asked for)."""

    loss: torch.Tensor
    monitors: dict[str, torch.Tensor] = field(default_factory=dict)


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
    student = MultiCropWrapper(student_backbone,
                               DINOHead(student_backbone.embed_dim, norm_last_layer=cfg.norm_last_layer, **head_args))
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
    """The forward passes' autocast dtype: ``--precision`` with auto made concrete (bf16 on CUDA, none on
    the CPU, where bf16 matmuls are two orders of magnitude slower than fp32)."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def make_optimizer(cfg: TrainConfig, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW (fused: one kernel for all parameters, about 4x the foreach loop's speed) or SGD with momentum
    0.9; lr and weight decay are set by the schedules at every step."""
    groups = param_groups(student)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **({"fused": True} if cfg.fused_optimizer else {"foreach": True}))
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9)


class DINO:
    """Student, teacher, loss, optimizer and schedules of one run (one process); `step` trains them."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, ncrops: int, iters_per_epoch: int):
        """Builds the networks (draws the initial weights from torch's RNG as it is), the optimizer, the loss
        and the per-iteration schedules over ``cfg.epochs * iters_per_epoch`` steps."""
        self.cfg, self.dist, self.device = cfg, dist_info, dist_info.device
        self.student, self.teacher, self.student_run, self.teacher_run = self.build_models()
        if cfg.compile == "on":  # forward only: state dicts and EMA keep using the plain modules
            self.student_run, self.teacher_run = torch.compile(self.student_run), torch.compile(self.teacher_run)
        self.optimizer = make_optimizer(cfg, self.student)
        self.loss_fn = DINOLoss(cfg.out_dim, ncrops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                cfg.warmup_teacher_temp_epochs, cfg.epochs, cfg.student_temp,
                                cfg.center_momentum).to(self.device)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.global_batch = cfg.batch_size_per_gpu * dist_info.world_size
        self.peak_lr = scaled_lr(cfg.lr, self.global_batch)
        self.lr_schedule = cosine_schedule(self.peak_lr, cfg.min_lr, cfg.epochs, iters_per_epoch, cfg.warmup_epochs)
        self.wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, iters_per_epoch)
        self.momentum_schedule = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs,
                                                 iters_per_epoch)
        # first iteration whose loss was not finite (-1: none); read by the loop at log steps and saves
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
                write("note: BatchNorm is per process on the CPU (SyncBatchNorm needs CUDA): each process "
                      "normalises with its own batch statistics", file=sys.stderr)
            ids = [self.device.index] if self.device.type == "cuda" else None
            student_run = DistributedDataParallel(student, device_ids=ids)
            teacher_run = DistributedDataParallel(teacher, device_ids=ids) if self.has_bn else teacher
        freeze_teacher(teacher)
        return student, teacher, student_run, teacher_run

    # ---------------------------------------------------------------- the step
    def step(self, crops: list[torch.Tensor], epoch: int, it: int, monitors: bool = False) -> StepOutput:
        """One optimisation step on ``crops`` (on the device), with no host synchronisation. ``monitors``:
        also the `DINOLoss` collapse monitors. A non-finite loss is recorded in ``first_nonfinite``."""
        cfg = self.cfg
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[it])
            if index == 0:
                group["weight_decay"] = float(self.wd_schedule[it])
        collapse: dict[str, torch.Tensor] = {}
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            with torch.no_grad():
                teacher_output = self.teacher_run(crops[:2])
            student_output = self.student_run(crops)
            if monitors:
                loss, collapse = self.loss_fn.with_monitors(student_output, teacher_output, epoch)
            else:
                loss = self.loss_fn(student_output, teacher_output, epoch)
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
        return StepOutput(loss.detach(), collapse)

    def first_nonfinite_iteration(self) -> int | None:
        """The first iteration whose loss was NaN or infinite, or None (a host sync: not every step)."""
        iteration = int(self.first_nonfinite.item())
        return iteration if iteration >= 0 else None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The model's part of a training checkpoint, in the official key layout: ``student`` with the
        ``module.`` prefix of a DDP module, ``teacher`` with it when the teacher runs under DDP (BatchNorm),
        ``optimizer``, ``dino_loss`` (the center), and ``fp16_scaler`` with fp16."""
        teacher_ddp = self.has_bn and self.dist.enabled
        state = {"student": {"module." + k: v for k, v in self.student.state_dict().items()},
                 "teacher": ({"module." + k: v for k, v in self.teacher.state_dict().items()} if teacher_ddp
                             else self.teacher.state_dict()),
                 "optimizer": self.optimizer.state_dict(),
                 "dino_loss": self.loss_fn.state_dict()}
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load `state_dict`'s entries (any ``module.`` prefix); KeyError/RuntimeError/ValueError when they do
        not fit this model."""
        self.student.load_state_dict(strip_prefixes(state["student"], ("module.",)))
        self.teacher.load_state_dict(strip_prefixes(state["teacher"], ("module.",)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_fn.load_state_dict(state["dino_loss"])
        if self.scaler is not None and "fp16_scaler" in state:
            self.scaler.load_state_dict(state["fp16_scaler"])

    def describe(self) -> dict:
        """What the model is made of (part of the log's ``setup`` record)."""
        def is_ddp(module) -> bool:
            return isinstance(module, DistributedDataParallel) or \
                isinstance(getattr(module, "_orig_mod", None), DistributedDataParallel)
        return {"ddp_student": is_ddp(self.student_run), "ddp_teacher": is_ddp(self.teacher_run),
                "batchnorm": self.has_bn,
                "sync_batchnorm_layers": sum(isinstance(m, nn.SyncBatchNorm) for m in self.student.modules()),
                "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
                "compile": self.cfg.compile, "global_batch": self.global_batch}
