"""Data for the DINO suite: readers of the real on-disk layouts and the embedded-suite generator.

``data.imagefolder`` reads ``root/<class>/<image>``; ``python -m data.suite``
writes the seeded synthetic suite in the real layouts, one part per
``data.suite_<part>`` module (shared helpers in ``data.suite_common``).
(One-line errors, atomic writes and the other helpers every layer shares live
in ``common``.)

The names below are re-exported lazily (PEP 562) so that ``import data`` stays
light and ``python -m data.suite`` does not find its own module already
imported by the package (which makes runpy warn).
"""

import importlib

_LAZY_EXPORTS = {
    "IMAGE_EXTENSIONS": "data.imagefolder",
    "ImageFolder": "data.imagefolder",
    "load_rgb": "data.imagefolder",
    "split_root": "data.imagefolder",
    "CLASS_NAMES": "data.suite_classification",
    "render_object_image": "data.suite_classification",
    "write_classification": "data.suite_classification",
}

__all__ = [*_LAZY_EXPORTS]


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
