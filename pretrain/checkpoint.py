"""Checkpoint I/O: atomic saves, safe loads, and ``load_backbone``.

Training checkpoints follow the official layout (PROTOCOLS A9) so either
tool reads the other's files: ``student`` (keys ``module.backbone.*`` /
``module.head.*``), ``teacher`` (``backbone.*`` / ``head.*``), ``optimizer``,
``epoch`` (epochs completed), ``args``, ``dino_loss`` (the center) and
``fp16_scaler``; we add what exact resume needs (``step``, ``rng``).

Every file is read with ``torch.load(weights_only=True)`` and a short
allow-list, so a user's pickle can never run code.
"""
from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from data.atomic import atomic_write, atomic_write_text  # noqa: F401 (re-exported)
from data.errors import UserError

from .backbones import CONVNETS, CUSTOM_VIT, VIT_PATCHES, VIT_SPECS, build_backbone

def _numpy_scalar_globals() -> list:
    """numpy scalars (official optimizer states hold numpy float64 learning rates)."""
    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray.scalar, np.dtype] + [
        getattr(np.dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType")
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name)]


# Objects official DINO checkpoints hold besides tensors and containers: an
# argparse Namespace (``args``) and numpy scalars. Nothing here runs code.
SAFE_GLOBALS = [argparse.Namespace] + _numpy_scalar_globals()
# Keys that are not part of a backbone: DINO projection head, timm/torchvision classifier.
NON_BACKBONE_PREFIXES = ("head.", "fc.", "head_drop.", "fc_norm.")
WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename
    (`data.atomic.atomic_write`): a crash mid-write leaves the previous file intact."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_load(path: str | os.PathLike):
    """Load a checkpoint without executing pickled code (tensors, containers,
    numbers, strings and ``argparse.Namespace`` only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist: pass the path of a .pth file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
        first = lines[0].split(" was not")[0] if lines else "unsafe object"
        raise UserError(f"checkpoint '{path}' holds objects that are not weights and was not loaded "
                        f"({first[:160]}): re-save it as a plain state dict") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as error:
        # a few bytes of text reach the legacy unpickler, which fails with IndexError / KeyError
        raise UserError(f"checkpoint '{path}' is truncated or not a PyTorch file ({type(error).__name__}): "
                        "re-download or re-save it") from None


def strip_prefixes(state_dict: dict, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict:
    """Remove leading wrapper prefixes (default: ``module.``, ``backbone.``,
    ``_orig_mod.``) from every key, repeatedly."""
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


def extract_backbone_state(checkpoint, key: str = "teacher") -> tuple[dict, dict | None]:
    """Find the backbone weights in any supported file.

    Returns (state dict with bare backbone keys, our architecture record or
    None). Supports our and official training checkpoints (``key`` selects
    teacher/student), bare state dicts (official released backbones, timm),
    and files wrapping one under ``state_dict`` or ``model``.
    """
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    record = None
    args = checkpoint.get("args")
    if isinstance(args, dict) and isinstance(args.get("backbone"), dict):
        record = args["backbone"]
    if key in checkpoint and isinstance(checkpoint[key], dict):
        state = checkpoint[key]
    elif any(k in checkpoint for k in ("teacher", "student")):
        raise UserError(f"checkpoint has no '{key}' entry (it has {sorted(checkpoint)}): use key 'teacher' or 'student'")
    else:
        state = next((checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict)), checkpoint)
    state = strip_prefixes(state)
    state = {k: v for k, v in state.items()
             if isinstance(v, torch.Tensor) and not k.startswith(NON_BACKBONE_PREFIXES)}
    if not state:
        raise UserError("checkpoint holds no backbone weights (no tensors outside head/classifier)")
    return state, record


def infer_architecture(state: dict) -> dict:
    """Architecture arguments for ``build_backbone`` from tensor shapes alone."""
    if "patch_embed.proj.weight" in state and "pos_embed" in state:
        embed_dim, _, patch, _ = state["patch_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        num_patches = state["pos_embed"].shape[1] - 1
        grid = int(round(num_patches ** 0.5))
        img_size = grid * patch
        for name, spec in VIT_SPECS.items():
            if (spec.embed_dim, spec.depth) == (embed_dim, depth) and patch in VIT_PATCHES and img_size == 224:
                return {"arch": name, "patch": patch}
        return {"arch": CUSTOM_VIT, "patch": patch, "embed_dim": embed_dim, "depth": depth,
                "num_heads": max(embed_dim // 64, 1), "img_size": img_size}
    if "conv1.weight" in state and any(k.startswith("layer4.") for k in state):
        return {"arch": "resnet50", "patch": None}
    sample = ", ".join(sorted(state)[:4])
    raise UserError(f"cannot recognise the architecture of these weights (keys: {sample}, ...): "
                    "pass ARCH/--arch for a supported backbone")


def describe_arch(spec: dict) -> str:
    if spec["arch"] in CONVNETS:
        return spec["arch"]
    if spec["arch"] == CUSTOM_VIT:
        return f"vit(dim {spec['embed_dim']}, depth {spec['depth']})/{spec['patch']}"
    return f"{spec['arch']}/{spec['patch']}"


def read_backbone_file(path, key: str = "teacher") -> tuple[dict, dict, dict | None]:
    """(bare backbone state dict, architecture spec, training args or None) of a file."""
    checkpoint = safe_load(path)
    state, record = extract_backbone_state(checkpoint, key)
    spec = dict(record) if record else infer_architecture(state)
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else None
    return state, spec, args


def build_from_spec(spec: dict) -> nn.Module:
    kwargs = {k: spec[k] for k in ("embed_dim", "depth", "num_heads", "img_size") if k in spec}
    return build_backbone(spec["arch"], spec["patch"], **kwargs)


def load_backbone(path_or_none, arch: str | None = None, patch: int | None = None,
                  key: str = "teacher", random_weights: bool = False) -> nn.Module:
    """Build a backbone and load any checkpoint a user holds into it, exactly.

    See ``load_backbone_with_args``; this returns the model alone.
    """
    return load_backbone_with_args(path_or_none, arch, patch, key, random_weights)[0]


def load_backbone_with_args(path_or_none, arch: str | None = None, patch: int | None = None,
                            key: str = "teacher", random_weights: bool = False) -> tuple[nn.Module, dict | None]:
    """Build a backbone and load any checkpoint a user holds into it, exactly.

    ``path_or_none`` None or ``"random"`` gives a random initialisation of
    ``arch``/``patch``. Otherwise arch and patch are inferred from the file
    (our record, else tensor shapes); given values must agree. Every backbone
    parameter must be present with the right shape, or a ``UserError`` names
    the keys. ``random_weights`` builds the file's architecture but keeps the
    random initialisation (the baseline of a trained model). Returns the model
    in eval mode and the file's training ``args`` (ours) or None.
    """
    if path_or_none is None or str(path_or_none) == "random":
        if arch is None:
            raise UserError("a random initialisation needs an arch: pass --arch (e.g. vit_small)")
        model = build_backbone(arch, patch if patch is not None else (None if arch in CONVNETS else 16))
        return model.eval(), None
    state, spec, args = read_backbone_file(path_or_none, key)
    if arch is not None and arch != spec["arch"] or patch is not None and spec["patch"] is not None and patch != spec["patch"]:
        wanted = f"{arch}/{patch}" if patch is not None else str(arch)
        raise UserError(f"checkpoint '{path_or_none}' holds {describe_arch(spec)} weights, not {wanted}: "
                        "drop the arch/patch arguments or pass the matching ones")
    model = build_from_spec(spec)
    if random_weights:
        return model.eval(), args
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})")
        raise UserError(f"checkpoint '{path_or_none}' does not fit {describe_arch(spec)}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model.eval(), args
