"""Checkpoint I/O: atomic saves, safe loads, and ``load_backbone``.

Training checkpoints follow the official layout (docs/protocols.md, "Checkpoint format") so either
tool reads the other's files: ``student`` (keys ``module.backbone.*`` /
``module.head.*``), ``teacher`` (``backbone.*`` / ``head.*``), ``optimizer``,
``epoch`` (epochs completed), ``args``, ``dino_loss`` (the center) and
``fp16_scaler``; we add what exact resume needs (``step``, ``rng``). The
rotation of training checkpoints and the fall-back on a corrupt one live in
`pretrain.checkpoint_files`.

Every file is read with ``torch.load(weights_only=True)`` and a short
allow-list (`SAFE_GLOBALS`), so a user's pickle can never run code: besides
tensors and containers it may hold an ``argparse.Namespace`` (the official
``args``) and numpy scalars (official optimizer states hold numpy float64
learning rates). numpy's own reconstructors are not on that list: a forged
file can make ``numpy.dtype.__setstate__`` declare an object dtype and
``multiarray.scalar`` read its bytes as pointers. The names resolve instead to
stand-ins (`_NumberDtype`, `_number_scalar`) that accept a plain bool / int /
uint / float / complex dtype and exactly its item size in bytes, and build the
scalar with ``numpy.frombuffer``; anything else ends the load with a one-line
`UnreadableCheckpoint` before anything it names is called.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common.atomic import atomic_write
from common.errors import UserError

# the gnd reader's numpy stand-ins: they never hand numpy the file's dtype state
from data.safe_pickle import DtypeRecipe, materialize

from .backbones import CONVNETS, CUSTOM_VIT, VIT_PATCHES, VIT_SPECS, build_backbone

NUMBER_KINDS = "biufc"  # bool, int, uint, float, complex: no object, void (structured), bytes, str, datetime


@contextmanager
def _refusing(what: str):
    """Turn any failure inside a stand-in into the UnpicklingError that `safe_load` reports."""
    try:
        yield
    except pickle.UnpicklingError:
        raise
    except Exception as error:  # the file's values reached numpy or data.safe_pickle and were refused
        raise pickle.UnpicklingError(f"refused {what} ({' '.join(str(error).split())[:80]})") from None


class _NumberDtype(DtypeRecipe):
    """What ``numpy.dtype`` resolves to: a recipe for a plain number dtype, checked again at every use."""

    def __init__(self, code, align=False, copy=True):
        with _refusing("dtype"):
            super().__init__(code, align, copy)
        self.to_numpy()

    def __setstate__(self, state):
        with _refusing("dtype state"):
            super().__setstate__(state)
            flags = state[7]
        if type(flags) is not int or flags != self.to_numpy().flags:  # numpy writes its own; others claim objects
            raise pickle.UnpicklingError(f"refused numpy dtype {self.code} with flags {flags!r}")

    def to_numpy(self) -> np.dtype:
        with _refusing("dtype"):  # a forged object can reach here without __init__ (NEWOBJ)
            dtype = super().to_numpy()
        if dtype.kind not in NUMBER_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise pickle.UnpicklingError(f"refused numpy dtype {dtype.str}: not a plain number type")
        return dtype


def _number_scalar(dtype, raw):
    """What ``numpy.core.multiarray.scalar`` resolves to: one number from exactly its item size in bytes."""
    if not isinstance(dtype, _NumberDtype):
        raise pickle.UnpicklingError(f"refused numpy scalar of a {type(dtype).__name__}, not a plain dtype")
    dtype = dtype.to_numpy()
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != dtype.itemsize:
        given = f"{len(raw)} bytes" if isinstance(raw, (bytes, bytearray)) else f"a {type(raw).__name__}"
        raise pickle.UnpicklingError(f"refused numpy {dtype} scalar from {given} (needs {dtype.itemsize} bytes)")
    return np.frombuffer(bytes(raw), dtype=dtype)[0]


# Objects official DINO checkpoints hold besides tensors and containers: an
# argparse Namespace (``args``) and numpy scalars (through the stand-ins).
SAFE_GLOBALS = [argparse.Namespace, (_NumberDtype, "numpy.dtype"),
                (_number_scalar, "numpy.core.multiarray.scalar"), (_number_scalar, "numpy._core.multiarray.scalar")]
# Keys that are not part of a backbone: DINO projection head, timm/torchvision classifier.
NON_BACKBONE_PREFIXES = ("head.", "fc.", "head_drop.", "fc_norm.")
WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename
    (`common.atomic.atomic_write`): a crash mid-write leaves the previous file intact."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


class UnreadableCheckpoint(UserError):
    """A checkpoint that does not load: ``reason`` says why (missing, truncated, not weights), one line."""

    def __init__(self, path: Path, reason: str, fix: str):
        super().__init__(f"checkpoint '{path}' {reason}: {fix}")
        self.path, self.reason = path, reason


def safe_load(path: str | os.PathLike):
    """Load a checkpoint without executing pickled code (tensors, containers,
    numbers, strings, ``argparse.Namespace`` and plain numpy scalars only).

    Raises `UnreadableCheckpoint` (a `UserError`) for a missing, damaged or refused file.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableCheckpoint(path, "does not exist", "pass the path of a .pth file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        return materialize(loaded, {})  # a dtype stored for itself (not in a scalar) becomes a real one
    except pickle.UnpicklingError as error:
        refused = _refusal(str(error))
        if refused is None:  # an opcode the weights-only unpickler does not know: bytes that are no checkpoint
            raise UnreadableCheckpoint(path, "is truncated or not a PyTorch file (unreadable pickle)",
                                       "re-download or re-save it") from None
        raise UnreadableCheckpoint(path, f"holds objects that are not weights and was not loaded ({refused[:160]})",
                                   "re-save it as a plain state dict") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as error:
        # a few bytes of text reach the legacy unpickler, which fails with IndexError / KeyError
        raise UnreadableCheckpoint(path, f"is truncated or not a PyTorch file ({type(error).__name__})",
                                   "re-download or re-save it") from None


def _refusal(message: str) -> str | None:
    """What torch's multi-line weights-only error says was refused: the global the file names, the call
    or object it asked for, or a stand-in's ``refused ...``; None for a damaged pickle."""
    named = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    if named:
        return f"it names {named.group(1)}"
    refused = re.search(r"(refused .*|Trying to call reduce.*|Can only (?:create|build|append).*)", message)
    return refused.group(1).strip() if refused else None


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
        raise UserError(f"checkpoint has no '{key}' entry (it has {sorted(checkpoint)}): "
                        "use key 'teacher' or 'student'")
    else:
        state = next((checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict)),
                     checkpoint)
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
    if arch is not None and arch != spec["arch"] \
            or patch is not None and spec["patch"] is not None and patch != spec["patch"]:
        wanted = f"{arch}/{patch}" if patch is not None else str(arch)
        raise UserError(f"checkpoint '{path_or_none}' holds {describe_arch(spec)} weights, not {wanted}: "
                        "drop the arch/patch arguments or pass the matching ones")
    model = build_from_spec(spec)
    if random_weights:
        return model.eval(), args
    expected = model.state_dict()
    # a BatchNorm's step counter is no weight (files saved before PyTorch 0.4.1 lack it); it stays 0
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})")
        raise UserError(f"checkpoint '{path_or_none}' does not fit {describe_arch(spec)}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=not any(k not in state for k in expected))
    return model.eval(), args
