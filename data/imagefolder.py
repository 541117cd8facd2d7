"""Reader for the ImageFolder layout ``root/<class>/<image>`` (ImageNet, CIFAR dumps, the suite).

Pretraining reads it with the labels ignored; kNN and linear evaluation read
``<root>/train`` and ``<root>/val`` with the labels used. Labels follow
torchvision's convention (index of the class folder in sorted order), so a
checkpoint's linear head and a torchvision pipeline agree on class indices.

Every mistake a user can make with a folder (missing path, wrong layout, no
images, a corrupt or truncated file) raises `UserError` with one line naming
the path and the fix. Truncated images are errors, never silently padded:
this module does not set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``.
"""

import os

import PIL.Image
import torch.utils.data

from data.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

EXPECTED_LAYOUT_HINT = "pass --data <folder with one sub-folder per class> or run 'make data'"
SPLIT_LAYOUT_HINT = "pass the folder that holds train/<class>/... and val/<class>/... or run 'make data'"


def is_image_file(name: str) -> bool:
    """True when ``name`` has one of `IMAGE_EXTENSIONS` (any case) and is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path) -> PIL.Image.Image:
    """Decode the image at ``path`` fully and return it as RGB.

    The one place images are decoded. ``img.load()`` forces the whole file to
    be read now, so a truncated or corrupt image fails here with the file's
    name instead of later deep inside a DataLoader worker.
    """
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError,
            PIL.Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"cannot decode image '{path}' ({reason}): delete or replace it") from None


def _check_directory(path, what: str, hint: str) -> None:
    """Raise a `UserError` (ending with ``hint``) unless ``path`` is an existing directory."""
    if not os.path.exists(path):
        raise UserError(f"{what} '{path}' does not exist: {hint}")
    if not os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a file, not a directory: {hint}")


def _visible_subdirectories(root: str) -> list:
    """Sorted names of the non-hidden sub-folders of ``root``."""
    return sorted(entry.name for entry in os.scandir(root)
                  if entry.is_dir() and not entry.name.startswith("."))


def images_directly_in(folder: str) -> list:
    """Sorted paths of the image files directly inside ``folder`` (not recursive)."""
    return sorted(entry.path for entry in os.scandir(folder)
                  if entry.is_file() and is_image_file(entry.name))


def _images_under(folder: str) -> list:
    """Sorted paths of all image files under ``folder``, recursively, skipping hidden entries."""
    paths = []
    for directory, subdirectories, file_names in os.walk(folder, followlinks=True):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        paths.extend(os.path.join(directory, name) for name in file_names if is_image_file(name))
    return sorted(paths)


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root/<class>/...`` with label = index of the class in sorted order.

    Attributes: ``root``; ``classes`` (sorted class-folder names); ``samples``
    (list of ``(path, label)`` sorted by class then path); ``targets`` (the labels).
    With ``allow_flat=True`` a root holding images but no sub-folders is read
    as a single class (label 0) named after the folder, which is how a user
    points pretraining at a plain folder of unlabelled images.
    ``dataset[i]`` is ``(transform(image) or image, label)`` with an RGB PIL image.
    """

    def __init__(self, root, transform=None, allow_flat=False):
        self.root = os.fspath(root)
        self.transform = transform
        _check_directory(self.root, "data directory", EXPECTED_LAYOUT_HINT)
        self.classes, self.samples = self._find_samples(allow_flat)
        self.targets = [label for _, label in self.samples]

    def _find_samples(self, allow_flat: bool):
        class_names = _visible_subdirectories(self.root)
        if not class_names:
            flat_images = images_directly_in(self.root)
            if flat_images and allow_flat:
                return [os.path.basename(os.path.abspath(self.root))], [(path, 0) for path in flat_images]
            found = f"found {len(flat_images)} images but no class sub-folders" if flat_images \
                else "it has no class sub-folders"
            raise UserError(f"data directory '{self.root}' has the wrong layout ({found}): "
                            f"expected {self.root}/<class>/<image>; {EXPECTED_LAYOUT_HINT}")
        samples = []
        for label, class_name in enumerate(class_names):
            samples.extend((path, label) for path in _images_under(os.path.join(self.root, class_name)))
        if not samples:
            raise UserError(f"no image files under '{self.root}' (accepted extensions: "
                            f"{' '.join(IMAGE_EXTENSIONS)}, any case): expected "
                            f"{self.root}/<class>/<image>; {EXPECTED_LAYOUT_HINT}")
        return class_names, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return f"ImageFolder(root={self.root!r}, classes={len(self.classes)}, images={len(self.samples)})"


def split_root(root) -> tuple:
    """Return the paths of ``<root>/train`` and ``<root>/val`` for kNN / linear evaluation.

    Only checks that both folders exist; `ImageFolder` checks what is inside them.
    """
    root = os.fspath(root)
    _check_directory(root, "evaluation data directory", SPLIT_LAYOUT_HINT)
    split_paths = (os.path.join(root, "train"), os.path.join(root, "val"))
    missing = [path for path in split_paths if not os.path.isdir(path)]
    if missing:
        raise UserError(f"evaluation data directory '{root}' lacks {' and '.join(repr(p) for p in missing)}: "
                        f"expected {root}/train/<class>/... and {root}/val/<class>/...; {SPLIT_LAYOUT_HINT}")
    return split_paths
