"""Atomic file writes: a reader sees the old file or the new one, never a mix.

Every checkpoint, feature cache, CSV, JSON and report of the project goes
through `atomic_write`: the content is written to a temp file in the same
folder (same file system, so the rename is atomic), flushed and fsynced, then
renamed over the target with ``os.replace``, and the folder is fsynced so the
rename itself survives a power cut. An exception at any point (a full disk, a
Ctrl-C) removes the temp file and leaves the previous target untouched.

It lives in ``common`` (the bottom package, below ``data``, ``pretrain``,
``evaluate`` and ``analysis``) so every layer can use the same one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a binary temp file beside ``path``, then move it into place.

    The file gets mode 0644 (``mkstemp``'s 0600 would hide results from
    other users of a shared machine). Returns ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def fsync_folder(folder: str | os.PathLike) -> None:
    """fsync ``folder`` itself, so a rename or link made in it survives a power cut."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | os.PathLike, content: bytes) -> Path:
    """Write ``content`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(content))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))
