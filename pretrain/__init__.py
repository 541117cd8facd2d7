"""DINO pretraining core: backbones, head, loss, multi-crop, schedules, trainer.

Public API (see docs/design.md, "Public API"):

    build_backbone(arch, patch, **kw) -> nn.Module
    load_backbone(path_or_None, arch=None, patch=None, key="teacher") -> nn.Module
    DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp,
             warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9)
"""
from .backbones import ARCHS, build_backbone
from .checkpoint import load_backbone
from .head import DINOHead, MultiCropWrapper
from .loss import DINOLoss

__all__ = ["ARCHS", "build_backbone", "load_backbone", "DINOHead", "MultiCropWrapper", "DINOLoss"]
