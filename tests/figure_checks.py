"""Checks that a written figure shows something (shared by the analysis and report tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image


def pixel_std(path: str | Path) -> float:
    """Standard deviation of all RGB values of a PNG (0 for a blank image)."""
    with PIL.Image.open(path) as image:
        return float(np.asarray(image.convert("RGB"), dtype=np.float32).std())


def assert_not_blank(path: str | Path, min_std: float = 5.0) -> None:
    """The PNG at ``path`` exists, decodes, and its pixels vary (a blank or single-colour figure fails)."""
    assert Path(path).is_file(), f"{path} was not written"
    std = pixel_std(path)
    assert std >= min_std, f"{path} looks blank (pixel std {std:.2f} < {min_std})"
