"""Split files: text files listing one name a line (DAVIS ``ImageSets/2017/val.txt``,
VOC ``ImageSets/Segmentation/val.txt``).

Only the first whitespace-separated token of a line counts (VOC's
classification lists add a label column), blank lines are skipped and a name
listed twice is kept once, at its first position.
"""

import os

from common.errors import UserError


def available_splits(folder) -> list:
    """Names (without ``.txt``) of the split files in ``folder``; empty if it does not exist."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    return sorted(name[:-4] for name in os.listdir(folder) if name.endswith(".txt") and not name.startswith("."))


def read_split_file(path, what: str, hint: str) -> list:
    """The names listed in the split file at ``path``, in file order.

    ``what`` ("DAVIS", "VOC") and ``hint`` (the expected layout) go into the
    `UserError` raised for a missing or empty file; a missing file's message
    lists the splits that do exist beside it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        available = available_splits(os.path.dirname(path))
        found = f"splits there: {', '.join(available)}" if available else "no split files there"
        raise UserError(f"{what} split file '{path}' does not exist ({found}): pass one of those "
                        f"splits or fix the dataset root; {hint}")
    with open(path, encoding="utf-8") as handle:
        names = [line.split()[0] for line in handle if line.strip()]
    if not names:
        raise UserError(f"{what} split file '{path}' lists nothing: write one name a line")
    return list(dict.fromkeys(names))
