"""Training checkpoints on disk: keep the newest few, resume from the newest one that loads.

A run folder (``output_dir``) holds::

    checkpoint-it00001200.pth   rotating checkpoints, named by the global iteration they were
    checkpoint-it00001500.pth   taken at; the newest ``keep`` are kept
    checkpoint.pth              the official name (official tooling, ``load_backbone``): the same
                                file as the newest rotating one, a hard link
    checkpoint0003.pth          the trainer's epoch snapshots (``saveckp_freq``): never touched here

`save_training_checkpoint` writes the rotating file atomically (temp file, fsync, rename:
`pretrain.checkpoint.atomic_save`), then points ``checkpoint.pth`` at it without writing the bytes
twice: a hard link made under a temp name is renamed over ``checkpoint.pth`` (an atomic copy where the
file system has no hard links), so a reader of ``checkpoint.pth`` sees the previous checkpoint or the
new one, whole. Then rotating files beyond the newest ``keep`` are deleted. A save that fails for a
reason of the disk (full, quota, I/O error) leaves the folder as it was before the call, with no temp
file, and raises a one-line `UserError` naming the checkpoint that is intact.

`load_training_checkpoint` tries the newest rotating file, then ``checkpoint.pth`` unless it is the same
file, then the older rotating files: a crash between the two steps of a save leaves ``checkpoint.pth``
one checkpoint behind the newest rotating file. A truncated, corrupt or refused file is skipped with a
warning naming it and why.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

from common.atomic import atomic_write, fsync_folder
from common.errors import UserError

from .checkpoint import UnreadableCheckpoint, atomic_save, safe_load

LATEST = "checkpoint.pth"
ROTATING = re.compile(r"checkpoint-it(\d{8,})\.pth")
# os.link errors that mean "no hard links on this file system (or for this file)": copy instead
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def rotating_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(output_dir) / f"checkpoint-it{iteration:08d}.pth"


def rotating_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of every rotating checkpoint in ``output_dir``, highest iteration first."""
    found = [(int(match.group(1)), path) for path in Path(output_dir).glob("checkpoint-it*.pth")
             if (match := ROTATING.fullmatch(path.name))]
    return sorted(found, reverse=True)


def resume_order(output_dir: str | os.PathLike) -> list[Path]:
    """The files `load_training_checkpoint` tries, in order (see the module docstring)."""
    order = [path for _, path in rotating_checkpoints(output_dir)]
    latest = Path(output_dir) / LATEST
    if latest.is_file() and not any(_same_file(latest, path) for path in order):
        order.insert(min(1, len(order)), latest)
    return order


def save_training_checkpoint(state: dict, output_dir: str | os.PathLike, iteration: int, keep: int = 2) -> Path:
    """Write ``state`` as ``checkpoint-it{iteration:08d}.pth``, make ``checkpoint.pth`` the same file, and
    delete rotating files beyond the newest ``keep`` (>= 1, counting this one). Returns the rotating path.

    ``iteration`` grows along a run; files numbered above it were left by a run that went further and
    was resumed from an older checkpoint (its newer ones did not load): they are deleted too, so the
    highest number is always the newest state.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    output_dir = Path(output_dir)
    path = rotating_path(output_dir, iteration)
    intact = next((candidate for candidate in [output_dir / LATEST, *resume_order(output_dir)]
                   if candidate != path and candidate.is_file()), None)
    with _disk_errors_reported(f"writing checkpoint '{path}'", intact):
        atomic_save(state, path)
    with _disk_errors_reported(f"pointing '{output_dir / LATEST}' at '{path.name}'", intact,
                               undo=lambda: path.unlink(missing_ok=True)):
        _point_latest_at(path)
    _remove_superseded(output_dir, iteration, keep)
    return path


def load_training_checkpoint(output_dir: str | os.PathLike) -> tuple[dict | None, Path | None, list[str]]:
    """(state, the path it came from, warnings) of the newest training checkpoint that loads.

    Each file skipped on the way (truncated, corrupt, refused, not a dict) adds a warning line naming it
    and why. (None, None, []) when ``output_dir`` holds no training checkpoint; a `UserError` naming every
    file tried when there are some and none loads.
    """
    output_dir = Path(output_dir)
    warnings, failures = [], []
    for path in resume_order(output_dir):
        try:
            state = safe_load(path)
            if not isinstance(state, dict):
                raise UnreadableCheckpoint(path, f"holds a {type(state).__name__}, not a training checkpoint",
                                           "resume from a file the trainer wrote")
            return state, path, warnings
        except UnreadableCheckpoint as error:
            failures.append(f"{path.name} {error.reason}")
            warnings.append(f"checkpoint '{path}' {error.reason}: skipped, resuming from an older one")
    if failures:
        raise UserError(f"no checkpoint in '{output_dir}' loads ({'; '.join(failures)}): restore one from a "
                        "backup, or pass a new --output-dir to start over")
    return None, None, warnings


def _point_latest_at(path: Path) -> None:
    """Replace ``checkpoint.pth`` beside ``path`` by a hard link to it (an atomic copy when links fail)."""
    latest = path.with_name(LATEST)
    temp = path.with_name(f".{LATEST}.{secrets.token_hex(4)}.tmp")  # atomic_write's temp pattern
    try:
        os.link(path, temp)
    except OSError as error:
        if error.errno not in NO_HARD_LINKS:
            raise
        with open(path, "rb") as source:
            atomic_write(latest, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))
        return
    try:
        os.replace(temp, latest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(latest.parent)


def _remove_superseded(output_dir: Path, iteration: int, keep: int) -> None:
    """Delete the rotating files numbered above ``iteration``, and those below it beyond the newest ``keep``."""
    others = [(number, path) for number, path in rotating_checkpoints(output_dir) if number != iteration]
    abandoned = [path for number, path in others if number > iteration]
    older = [path for number, path in others if number < iteration]
    for path in abandoned + older[keep - 1:]:
        with suppress(OSError):  # the new checkpoint is safe; a file left behind goes at the next save
            path.unlink()


@contextmanager
def _disk_errors_reported(action: str, intact: Path | None, undo=lambda: None):
    """Turn a failure of the disk inside the block into a one-line `UserError` (after ``undo()``).

    torch.save reports a write error of its file handle as a RuntimeError whose context is the
    OSError; errors with no OSError behind them are bugs and propagate unchanged.
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        cause = _os_error_behind(error)
        if cause is None:
            raise
        undo()
        previous = f"the previous checkpoint '{intact}' is intact" if intact else "no earlier checkpoint exists"
        raise UserError(f"{action} failed ({cause.strerror or cause}); {previous}: free space or check the disk "
                        "(df -h, quota, dmesg), then run the same command again to resume") from None


def _os_error_behind(error: BaseException | None) -> OSError | None:
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False
