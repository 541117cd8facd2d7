"""The run's ``log.jsonl`` and the collapse watch that reads the monitors written to it.

``RunLog``: one JSON object per line, appended by the main process. A run
killed with SIGKILL can leave a truncated last line, and records written
after its last checkpoint describe steps the resumed run does again;
`RunLog.trim_for_resume` rewrites the file (atomically) without both and
adds a ``{"kind": "resume"}`` record, so the log of a resumed run reads like
an uninterrupted one.

``CollapseWatch``: the two ways DINO collapses (paper, Sec. 5.3 and Fig. 7),
read from `pretrain.loss.DINOLoss`'s monitors at each log step:

    uniform        every target spread over all K dimensions:
                   H(q) >= UNIFORM_FRACTION * ln K
    one dimension  every image's target on the same dimension:
                   H(mean_b q_b) <= ONE_DIMENSION_NATS

Either must hold for ``patience`` consecutive log steps (brief dips early in
training are normal); then one warning per kind is returned, written to the
log and printed. Training goes on: the user decides.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from common.atomic import atomic_write_text

UNIFORM_FRACTION = 0.98
ONE_DIMENSION_NATS = 0.05


class RunLog:
    """Appends records to ``path`` (only where ``enabled``: the main process)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def trim_for_resume(self, epoch: int, iteration: int) -> int:
        """Drop a truncated last line and every record after the checkpoint of (``epoch``, ``iteration``);
        returns how many lines were dropped. Records before the first later one are kept as they are."""
        if not self.enabled or not self.path.is_file():
            return 0
        lines = self.path.read_text(errors="replace").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record = json.loads(line) if line.endswith("\n") else None
            except ValueError:
                record = None
            if not isinstance(record, dict) or _after_checkpoint(record, epoch, iteration):
                break
            kept.append(line)
        dropped = len(lines) - len(kept)
        atomic_write_text(self.path, "".join(kept) + json.dumps(
            {"kind": "resume", "epoch": epoch, "iteration": iteration, "dropped_records": dropped}) + "\n")
        return dropped


def _after_checkpoint(record: dict, epoch: int, iteration: int) -> bool:
    """A record the run wrote after saving the checkpoint it resumes from."""
    if record.get("kind") == "step":
        return record.get("iteration", 0) > iteration
    if record.get("kind") == "epoch":
        return record.get("epoch", 0) >= epoch
    return record.get("kind") == "summary"


class CollapseWatch:
    """Warns once per kind when the teacher's outputs stay collapsed for ``patience`` log steps."""

    def __init__(self, out_dim: int, patience: int = 5):
        self.max_entropy, self.patience = math.log(out_dim), patience
        self.streaks = {"uniform": 0, "one dimension": 0}
        self.warned: set[str] = set()

    def update(self, monitors: dict, iteration: int) -> list[str]:
        """Feed one log step's monitors; returns the warnings that fire now."""
        collapsed = {"uniform": monitors["teacher_entropy"] >= UNIFORM_FRACTION * self.max_entropy,
                     "one dimension": monitors["teacher_batch_entropy"] <= ONE_DIMENSION_NATS}
        warnings = []
        for kind, now in collapsed.items():
            self.streaks[kind] = self.streaks[kind] + 1 if now else 0
            if self.streaks[kind] >= self.patience and kind not in self.warned:
                self.warned.add(kind)
                warnings.append(_message(kind, monitors, iteration, self.max_entropy))
        return warnings


def _message(kind: str, monitors: dict, iteration: int, max_entropy: float) -> str:
    state = (f"teacher entropy {monitors['teacher_entropy']:.3f} of ln K = {max_entropy:.3f}" if kind == "uniform"
             else f"entropy of the batch-mean teacher output {monitors['teacher_batch_entropy']:.3f} nats")
    # centering pushes towards uniform outputs, sharpening towards one dimension (paper, Sec. 5.3)
    fix = ("sharpening is too weak: lower --teacher-temp (and --warmup-teacher-temp), e.g. to 0.04"
           if kind == "uniform" else
           "centering is too weak or sharpening too strong: keep --center-momentum at 0.9 (0.999 collapses), "
           "raise --teacher-temp towards 0.04")
    return (f"collapse to {kind} at iteration {iteration}: {state}, KL(teacher || student) "
            f"{monitors['teacher_student_kl']:.4f}; {fix}")
