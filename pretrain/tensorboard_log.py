"""TensorBoard event files beside ``log.jsonl``: the run's curves for ``tensorboard --logdir runs/``.

`TensorBoardLog` writes every numeric field of a log record as a scalar with
``torch.utils.tensorboard.SummaryWriter`` into the run folder (``events.out.tfevents.*`` files beside
``log.jsonl``). ``log.jsonl`` stays the record of the run; the event files are a view of it, so they
must never stop a run: when the ``tensorboard`` package is not importable, or the folder cannot be
written (at the start or later, e.g. a full disk), one line goes to stderr::

    warning: TensorBoard event files are off: <reason>; the run goes on (log.jsonl has every record)

and the writer does nothing from then on. Only the main process writes (``enabled``); elsewhere
every method is a no-op and no file is made.

Tags (`tag_for`), by the trainer's record kinds:

    kind "step"   loss, lr, wd, teacher_momentum, teacher_temp, epoch   -> train/<key>
                  teacher_entropy, teacher_student_kl,
                  teacher_batch_entropy                                 -> collapse/<key>
                  bad_images                                            -> data/bad_images
                  any other number                                      -> train/<key>
    kind "epoch"  knn_top1_k20, knn_top5_k20, student_knn_top1_k20, ... -> knn/<key> (any key holding "knn")
                  train_loss, train_lr, train_wd, teacher_temp, epoch   -> epoch/<key>
    other kinds   <key>                                                 -> <kind>/<key>

``kind`` and ``iteration`` (the step itself) are not written, nor are strings, booleans or
``None``. The step is given by the caller: pass the global iteration for every record (for an
epoch record, the iteration count at the end of the epoch) so step and epoch curves share one axis.
"""
from __future__ import annotations

import sys
from numbers import Real
from pathlib import Path

COLLAPSE_KEYS = frozenset({"teacher_entropy", "teacher_student_kl", "teacher_batch_entropy"})
NOT_WRITTEN = frozenset({"kind", "iteration"})
WARNING = "warning: TensorBoard event files are off: {reason}; the run goes on (log.jsonl has every record)"


def tag_for(kind: str, key: str) -> str | None:
    """The TensorBoard tag of field ``key`` of a record of kind ``kind``; None for fields not written."""
    if key in NOT_WRITTEN:
        return None
    if "knn" in key:
        return f"knn/{key}"
    if key in COLLAPSE_KEYS:
        return f"collapse/{key}"
    if kind == "step":
        return "data/bad_images" if key == "bad_images" else f"train/{key}"
    return f"{kind or 'record'}/{key}"


def numeric_fields(record: dict) -> dict[str, float]:
    """{tag: value} for every real-number field of ``record`` that has a tag (booleans left out)."""
    kind = str(record.get("kind", "record"))
    fields = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, Real):
            continue
        tag = tag_for(kind, str(key))
        if tag is not None:
            fields[tag] = float(value)
    return fields


class TensorBoardLog:
    """Scalars of log records into TensorBoard event files in ``folder`` (main process only).

    ``scalars(record, step)`` writes `numeric_fields` of ``record`` at ``step``; ``flush()`` pushes
    them to disk; ``close()`` ends the file (also as a context manager). ``purge_step``: on a resumed
    run, the iteration it resumes from, so TensorBoard hides the events of the interrupted run from
    that step on (as ``RunLog.trim_for_resume`` does for log.jsonl). ``active`` tells whether event
    files are being written. No method ever raises: a failure prints `WARNING` once and turns the
    writer off.
    """

    def __init__(self, folder: str | Path, enabled: bool = True, purge_step: int | None = None,
                 flush_secs: int = 30):
        self.folder = Path(folder)
        self.writer = None
        self.warned = False
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as error:  # ImportError, or a broken install failing otherwise
            self._off(f"the tensorboard package cannot be imported ({type(error).__name__}: {error}); "
                      "pip install tensorboard")
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge_step, flush_secs=flush_secs)
        except Exception as error:
            self._off(f"cannot write event files in '{self.folder}' ({type(error).__name__}: {error})")

    @property
    def active(self) -> bool:
        return self.writer is not None

    def _off(self, reason: str) -> None:
        """Print the one warning line, drop the writer (closing it quietly)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        if not self.warned:
            self.warned = True
            try:
                print(WARNING.format(reason=reason), file=sys.stderr, flush=True)
            except Exception:  # stderr itself gone: still never stop the run
                pass

    def scalars(self, record: dict, step: int) -> None:
        """Write every numeric field of ``record`` (tags: `tag_for`) at global step ``step``."""
        if self.writer is None:
            return
        try:
            for tag, value in numeric_fields(record).items():
                self.writer.add_scalar(tag, value, global_step=int(step))
        except Exception as error:
            self._off(f"writing to '{self.folder}' failed ({type(error).__name__}: {error})")

    def flush(self) -> None:
        """Push the events written so far to the file."""
        if self.writer is None:
            return
        try:
            self.writer.flush()
        except Exception as error:
            self._off(f"writing to '{self.folder}' failed ({type(error).__name__}: {error})")

    def close(self) -> None:
        """Flush and close the event file; later calls do nothing."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as error:
            self._off(f"writing to '{self.folder}' failed ({type(error).__name__}: {error})")

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
