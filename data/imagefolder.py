"""Reader for the ImageFolder layout ``root/<class>/<image>`` (ImageNet, CIFAR dumps, the suite).

Pretraining reads it with the labels ignored; kNN and linear evaluation read
``<root>/train`` and ``<root>/val`` with the labels used. Labels follow
torchvision's convention (index of the class folder in sorted order), so a
checkpoint's linear head and a torchvision pipeline agree on class indices.

Every mistake a user can make with a folder (missing path, wrong layout, no
images, a corrupt or truncated file) raises `UserError` with one line naming
the path and the fix. Truncated images are errors, never silently padded
(``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` stays off). Bad data: `to_rgb` makes
every mode PIL reads correct RGB; `load_rgb` refuses images over ``max_pixels``
rather than decode them reduced (a silently smaller image would change what
evaluators measure); `ImageFolder` lists unreadable files apart and, for
training only (``skip_bad``), substitutes and logs the files that do not decode.
"""

import os
import stat
import threading
from typing import NamedTuple

import numpy as np
import PIL.Image
import torch
import torch.utils.data

from common.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# what those files may hold, told apart by content (a PNG named .jpg is fine; JPEG includes cameras'
# MPO); only formats with a signature, so random bytes are never "decoded" as, say, a TGA
DECODED_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")

EXPECTED_LAYOUT_HINT = "pass --data <folder with one sub-folder per class> or run 'make data'"
SPLIT_LAYOUT_HINT = "pass the folder that holds train/<class>/... and val/<class>/... or run 'make data'"

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: 1/4 GiB of 3-byte pixels
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels show white, as on a web page
MAX_SUBSTITUTE_ATTEMPTS = 100  # bad files in a row that one index may skip before the run stops
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 16-bit PNG/PGM in Pillow's int32 mode
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")

_PIL_LIMIT_LOCK = threading.Lock()  # a new one in a forked child: the parent's may be held by another thread
os.register_at_fork(after_in_child=lambda: globals().update(_PIL_LIMIT_LOCK=threading.Lock()))


class BadImageError(UserError):
    """An image file that cannot be used (undecodable, too large...); ``path`` and ``reason`` go to the
    bad-image log. Constructible from the message alone, so DataLoader workers re-raise it as itself."""

    def __init__(self, message: str, path: str = "", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason


def _error_text(error: BaseException) -> str:
    """The error's message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def _bad(path, reason: str, problem: str = "cannot decode image", fix: str = "delete or replace it") -> BadImageError:
    path = os.fspath(path)
    return BadImageError(f"{problem} '{path}' ({reason}): {fix}", path, reason)


def is_image_file(name: str) -> bool:
    """True when ``name`` has one of `IMAGE_EXTENSIONS` (any case) and is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """A decoded image of any PIL mode as 8-bit RGB.

    RGB, L, 1, P, CMYK (PIL undoes Adobe's inverted CMYK in JPEGs), YCbCr, LAB,
    HSV: ``convert("RGB")``, as torchvision's loader. 16-bit (I;16*, and I, which
    holds 16-bit PNG/PGM values): round(v * 255 / 65535), so 32768 -> 128 where PIL
    clips to 255. F: [0, 1] (the float-image convention) times 255, clipped.
    Alpha (LA, PA, RGBA, a ``transparency`` colour): composited over
    `ALPHA_BACKGROUND`, never dropped. ValueError for a mode PIL cannot convert.
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
        levels = np.clip(np.nan_to_num(values * scale), 0, 255)
        return PIL.Image.fromarray(np.rint(levels).astype(np.uint8), "L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        background = PIL.Image.new("RGBA", image.size, ALPHA_BACKGROUND + (255,))
        return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _read(path, max_pixels: int | None, use):
    """``use(image)`` of the image file at ``path`` opened by PIL (header read,
    pixels not yet decoded), with every failure
    turned into `BadImageError`: an image of more than ``max_pixels`` pixels
    (None: no limit) is refused before it is decoded, a check that replaces
    PIL's decompression-bomb warning."""
    try:
        with _PIL_LIMIT_LOCK:  # PIL's limit is a module global: lift it for this open only
            saved_limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
            try:
                image = PIL.Image.open(path, formats=DECODED_FORMATS)
            finally:
                PIL.Image.MAX_IMAGE_PIXELS = saved_limit
        with image:
            pixels = image.width * image.height
            if max_pixels is not None and pixels > max_pixels:
                raise _bad(path, f"{pixels} pixels, over the limit of {max_pixels}", "too large an image",
                           "resize it, delete it or raise --max-image-pixels")
            return use(image)
    except (BadImageError, MemoryError):
        raise
    except PIL.UnidentifiedImageError:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise _bad(path, "empty file, 0 bytes" if empty else f"not a {'/'.join(DECODED_FORMATS)} file") from None
    except Exception as error:  # PIL's plugins raise many types on malformed bytes: all mean "bad file"
        raise _bad(path, _error_text(error)) from None


def _decode_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    image.load()
    return to_rgb(image)


def load_rgb(path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Decode the image at ``path`` fully and return it as RGB (`to_rgb`).

    The one place images are decoded: ``load()`` reads the whole file now, so a
    truncated or corrupt image fails here, naming the file. Raises
    `BadImageError` (a one-line `UserError`) for a file PIL cannot read or
    convert and, before decoding, for one of more than ``max_pixels`` pixels
    (None: no limit).
    """
    return _read(path, max_pixels, _decode_rgb)


class EncodedImage(NamedTuple):
    """An image as the loader workers hand it to a device that decodes.

    ``data``: the file's bytes, 1-D uint8, when ``is_jpeg`` (a JPEG whose
    pixels are RGB or L: any standard JPEG decoder asked for RGB gives what
    `load_rgb` gives, since PIL decodes JPEG with libjpeg and converts L to RGB
    by repeating the channel); otherwise the `load_rgb` pixels, uint8
    (3, height, width). ``path`` is the file read (after any substitution).
    Only the header of a JPEG has been read: a truncated or corrupt body
    fails later, where it is decoded.
    """
    data: torch.Tensor
    is_jpeg: bool
    width: int
    height: int
    path: str


DEVICE_DECODED_MODES = ("RGB", "L")  # JPEG modes shipped as bytes; CMYK and the rest are converted by PIL here


def read_encoded(path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> EncodedImage:
    """`EncodedImage` of the file at ``path``: its bytes when it is a JPEG in one of
    `DEVICE_DECODED_MODES` (header read and size checked only), else its `load_rgb`
    pixels. Raises `BadImageError` as `load_rgb` does."""
    def use(image: PIL.Image.Image) -> EncodedImage:
        if image.format == "JPEG" and image.mode in DEVICE_DECODED_MODES and "transparency" not in image.info:
            with open(path, "rb") as file:
                data = bytearray(file.read())
            return EncodedImage(torch.frombuffer(data, dtype=torch.uint8), True,
                                image.width, image.height, os.fspath(path))
        pixels = torch.from_numpy(np.array(_decode_rgb(image), dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return EncodedImage(pixels, False, image.width, image.height, os.fspath(path))
    return _read(path, max_pixels, use)


def _check_directory(path, what: str, hint: str) -> None:
    """Raise a `UserError` (ending with ``hint``) unless ``path`` is an existing directory."""
    if not os.path.exists(path):
        raise UserError(f"{what} '{path}' does not exist: {hint}")
    if not os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a file, not a directory: {hint}")


def _is_folder(entry: os.DirEntry) -> bool:
    """``entry.is_dir()`` (following links), False for a link loop instead of an error."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _visible_subdirectories(root: str) -> list:
    """Sorted names of the non-hidden sub-folders of ``root``."""
    return sorted(entry.name for entry in os.scandir(root)
                  if _is_folder(entry) and not entry.name.startswith("."))


def images_directly_in(folder: str) -> list:
    """Sorted paths of the image files directly inside ``folder`` (not recursive)."""
    return sorted(entry.path for entry in os.scandir(folder)
                  if entry.is_file() and is_image_file(entry.name))


def _unreadable_reason(entry: os.DirEntry) -> str | None:
    """Why the image-named ``entry`` cannot be read (broken link, empty, not a file...), or None."""
    try:
        info = entry.stat()  # follows symbolic links
    except FileNotFoundError:
        return f"broken symbolic link to '{os.readlink(entry.path)}'"
    except OSError as error:  # a link loop, no permission...
        return error.strerror or _error_text(error)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return "empty file, 0 bytes" if info.st_size == 0 else None


def _images_under(folder: str, skipped: list, repeated: list) -> list:
    """Sorted paths of the readable image files under ``folder``, skipping hidden entries.

    Links are followed, but each real folder is listed once: one reached again
    (a link loop) goes to ``repeated``; unreadable image files and unlistable
    folders go to ``skipped``, both as ``(path, reason)``.
    """
    paths, listed_as, pending = [], {}, [folder]
    while pending:
        directory = pending.pop()
        real = os.path.realpath(directory)
        if real in listed_as:
            repeated.append((directory, f"folder already listed as '{listed_as[real]}'"))
            continue
        listed_as[real] = directory
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append((directory, f"cannot list folder: {_error_text(error)}"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_folder(entry):
                subfolders.append(entry)
            elif is_image_file(entry.name):
                reason = _unreadable_reason(entry)
                if reason:
                    skipped.append((entry.path, reason))
                else:
                    paths.append(entry.path)
        subfolders.sort(key=lambda entry: (entry.is_symlink(), entry.name))  # real folders win over links
        pending.extend(entry.path for entry in reversed(subfolders))
    return sorted(paths)


def read_bad_log(path) -> dict:
    """``{image path: reason}`` from a bad-image log (lines ``path<TAB>reason``), de-duplicated;
    ``{}`` when there is no log yet."""
    if path is None or not os.path.exists(path):
        return {}
    with open(path, "rb") as log:
        lines = [os.fsdecode(line) for line in log.read().split(b"\n")]
    return dict(line.rsplit("\t", 1) for line in lines if "\t" in line)


def _append_bad_log(path, image_path: str, reason: str) -> None:
    """Append ``image_path<TAB>reason`` in one O_APPEND write, so lines of several processes never mix."""
    one_line_path = image_path.replace("\n", "\\n")  # a newline in a name would split the record
    line = os.fsencode(f"{one_line_path}\t{' '.join(reason.split())}\n")
    with open(path, "ab", buffering=0) as log:  # O_APPEND, and unbuffered: one write() call
        log.write(line)


def check_bad_fraction(bad: int, total: int, max_fraction: float, examples: list) -> None:
    """Raise a one-line `UserError` naming the first three ``examples`` (paths) when
    ``bad / total`` exceeds ``max_fraction``."""
    if total <= 0 or bad / total <= max_fraction:
        return
    named = ", ".join(f"'{path}'" for path in list(examples)[:3])
    more = f" and {bad - 3} more" if bad > 3 else ""
    raise UserError(f"{bad} of {total} images ({bad / total:.2%}) are unreadable, more than --max-bad-fraction "
                    f"{max_fraction:g}: {named}{more}; delete or replace them, or raise --max-bad-fraction")


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root/<class>/...`` with label = index of the class in sorted order.

    Attributes: ``root``; ``classes`` (sorted class-folder names); ``samples``
    (list of ``(path, label)`` sorted by class then path); ``targets`` (the labels);
    ``skipped`` / ``repeated_folders``: ``(path, reason)`` of what listing left out
    (unreadable files and folders) / listed once (folders reached twice, e.g. a link
    loop); ``bad``: ``{path: reason}`` of the files this process failed to decode.
    With ``allow_flat=True`` a root holding images but no sub-folders is read
    as a single class (label 0) named after the folder, which is how a user
    points pretraining at a plain folder of unlabelled images.
    ``dataset[i]`` is ``(transform(image) or image, label)`` with an RGB PIL image.

    ``skip_bad=False`` (evaluation): anything in ``skipped`` and any file that
    `load_rgb` refuses raises a one-line `UserError`. ``skip_bad=True``
    (training): ``dataset[i]`` of a bad file is the sample of the next index
    that decodes (wrapping around, at most `MAX_SUBSTITUTE_ATTEMPTS` files), so
    an index gives the same sample in every process and run; each bad file goes
    to ``bad`` and, once per process, to the ``bad_log`` file (`read_bad_log`).
    """

    def __init__(self, root, transform=None, allow_flat=False, skip_bad=False, bad_log=None,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.root = os.fspath(root)
        self.transform, self.skip_bad, self.max_pixels = transform, skip_bad, max_pixels
        self.bad_log = None if bad_log is None else os.fspath(bad_log)
        self.skipped, self.repeated_folders, self.bad = [], [], {}
        _check_directory(self.root, "data directory", EXPECTED_LAYOUT_HINT)
        self.classes, self.samples = self._find_samples(allow_flat)
        self.targets = [label for _, label in self.samples]
        if self.skipped and not skip_bad:
            path, reason = self.skipped[0]
            others = f" ({len(self.skipped) - 1} more such files under '{self.root}')" if len(self.skipped) > 1 else ""
            raise UserError(f"cannot read '{path}' ({reason}){others}: delete or replace it, or fix its "
                            "permissions")

    def _find_samples(self, allow_flat: bool):
        class_names = _visible_subdirectories(self.root)
        if not class_names:
            flat_images = _images_under(self.root, self.skipped, self.repeated_folders)  # no sub-folders here
            if flat_images and allow_flat:
                return [os.path.basename(os.path.abspath(self.root))], [(path, 0) for path in flat_images]
            found = f"found {len(flat_images)} images but no class sub-folders" if flat_images \
                else "it has no class sub-folders"
            raise UserError(f"data directory '{self.root}' has the wrong layout ({found}): "
                            f"expected {self.root}/<class>/<image>; {EXPECTED_LAYOUT_HINT}")
        samples = []
        for label, class_name in enumerate(class_names):
            paths = _images_under(os.path.join(self.root, class_name), self.skipped, self.repeated_folders)
            samples.extend((path, label) for path in paths)
        if not samples:
            raise UserError(f"no image files under '{self.root}' (accepted extensions: "
                            f"{' '.join(IMAGE_EXTENSIONS)}, any case): expected "
                            f"{self.root}/<class>/<image>; {EXPECTED_LAYOUT_HINT}")
        return class_names, samples

    def __len__(self) -> int:
        return len(self.samples)

    def _decoded(self, index: int):
        """(RGB image, label) of ``samples[index]``, or with ``skip_bad`` of the next sample that decodes."""
        return self._first_readable(index, load_rgb)

    def encoded(self, index: int):
        """(`EncodedImage`, label) of ``samples[index]``, substituted as ``dataset[index]`` is; a JPEG's
        body is not decoded here (see `note_bad` for one that fails where it is)."""
        return self._first_readable(index, read_encoded)

    def note_bad(self, path: str, reason: str) -> None:
        """Record a file that failed to decode: in ``bad`` (never read again by this process) and, the first
        time in this process, in the ``bad_log``."""
        if path not in self.bad:
            self.bad[path] = reason
            if self.bad_log is not None:
                _append_bad_log(self.bad_log, path, reason)

    def _first_readable(self, index: int, read):
        """(``read(path, max_pixels)``, label) of ``samples[index]`` or, with ``skip_bad``, of the first
        sample after it that reads without `BadImageError`."""
        if not self.skip_bad:
            path, label = self.samples[index]
            return read(path, self.max_pixels), label
        for attempt in range(min(len(self.samples), MAX_SUBSTITUTE_ATTEMPTS)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            if path not in self.bad:
                try:
                    return read(path, self.max_pixels), label
                except BadImageError as error:
                    self.note_bad(path, error.reason)  # never tried again in this process
        first = self.samples[index][0]
        raise UserError(f"cannot decode image '{first}' ({self.bad[first]}) nor the {attempt} files after it "
                        f"in '{self.root}': the data is damaged; delete or replace the files listed in "
                        f"{self.bad_log or 'dataset.bad'}")

    def __getitem__(self, index: int):
        image, label = self._decoded(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def bad_files(self) -> dict:
        """``{path: reason}`` of every bad file known so far: ``skipped`` when listing, ``bad`` of this
        process and the ``bad_log`` of all processes (the loader workers')."""
        return {**dict(self.skipped), **self.bad, **read_bad_log(self.bad_log)}

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
