"""Per-iteration schedules of the DINO recipe (docs/protocols.md, "Optimisation and schedules").

``cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs, start)``
returns an array of ``epochs * iters_per_epoch`` values: a linear warm-up
``linspace(start, base, warmup_epochs * iters_per_epoch)`` (both ends
included, so the first value is exactly ``start``), then for the remaining
n iterations i = 0..n-1:

    value_i = final + 0.5 * (base - final) * (1 + cos(pi * i / n))

The learning rate uses it with ``base = lr_ref * global_batch / 256`` (linear
scaling rule), weight decay rises 0.04 -> 0.4 with it (no warm-up), and the
teacher momentum rises 0.996 -> 1 (or to ``momentum_teacher_end``; the demo preset holds it).
"""
from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, start: float = 0.0) -> np.ndarray:
    warmup_iters = warmup_epochs * iters_per_epoch
    total = epochs * iters_per_epoch
    warmup = np.linspace(start, base, warmup_iters) if warmup_iters > 0 else np.array([])
    remaining = np.arange(total - warmup_iters)
    n = max(len(remaining), 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * remaining / n))
    schedule = np.concatenate((warmup, cosine))
    if len(schedule) != total:
        raise ValueError(f"warm-up ({warmup_epochs} epochs) longer than the run ({epochs} epochs)")
    return schedule
