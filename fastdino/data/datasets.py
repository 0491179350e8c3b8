"""Image folders on disk: finding the files, and decoding them robustly.

One corrupt JPEG among a million must not end a multi-day run, so unreadable files are skipped (with a warning that
names them) and replaced by the next readable sample instead of raising inside a data-loader worker.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fastdino.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

logger = logging.getLogger("fastdino.data")

# What PIL raises on a truncated, corrupt, unsupported or unreadable file (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)

# Gray modes with more than 8 bits per pixel: PIL's convert("RGB") would clip them, load_rgb scales them instead.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class DatasetError(UsageError, ValueError):
    """The dataset on disk cannot be used: missing folder, no images, or no readable image at all."""


def is_image_file(path: str | Path) -> bool:
    """True when the file name ends with one of IMAGE_EXTENSIONS (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[str]:
    """All image files below `folder` (recursive, symlinks followed), sorted so that every process sees one order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        found.extend(os.path.join(dirpath, name) for name in filenames if is_image_file(name))
    return sorted(found)


def find_images(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """List the images of a dataset folder and their labels.

    Two layouts are accepted:
    - class folders (torchvision ImageFolder): `root/<class>/**/<image>`; class names sorted give labels 0..C-1,
      files are searched recursively inside each class folder and sorted; loose files directly in `root` are ignored.
    - a flat folder: `root/<image>` with no sub-folder; every label is -1 and `classes` is empty.
    Hidden folders (name starting with '.') are ignored. Returns (samples [(path, label)], classes).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset path {str(root)!r} is not a folder; "
                           "expected a folder of images or of class folders")
    extensions = " ".join(IMAGE_EXTENSIONS)
    class_dirs = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not class_dirs:
        files = sorted(str(root / entry.name) for entry in os.scandir(root)
                       if entry.is_file() and is_image_file(entry.name))
        if not files:
            raise DatasetError(f"dataset folder {str(root)!r} holds no image files (accepted extensions: {extensions}) "
                               "and no class sub-folders")
        return [(path, -1) for path in files], []
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(class_dirs):
        files = _images_under(root / name)
        if not files:
            # An empty class would shift every later label, and train/val label maps would disagree silently.
            raise DatasetError(f"class folder {str(root / name)!r} holds no image files (accepted extensions: "
                               f"{extensions}); remove it or add images")
        samples.extend((path, label) for path in files)
    return samples, class_dirs


def ignored_loose_images(root: str | Path) -> list[str]:
    """Images directly in `root` beside class folders: `find_images` leaves them out (as torchvision's ImageFolder
    does), which a user who mixed the two layouts should hear about."""
    entries = list(os.scandir(root))
    if not any(entry.is_dir() and not entry.name.startswith(".") for entry in entries):
        return []
    return sorted(entry.name for entry in entries if entry.is_file() and is_image_file(entry.name))


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully (so truncation is detected here) and convert it to 8-bit RGB.

    The one mode rule of the PIL paths (torchvision-loader workers, the GPU-decode loader's CPU decoding, the eval
    datasets; DALI decodes on its own):
    - L, 1 (0 -> 0, 1 -> 255), RGB, CMYK, YCbCr: PIL's convert("RGB"); for CMYK that is
      R = round((255 - C) * (255 - K) / 255), and the same for G (M) and B (Y).
    - Alpha is dropped, not composited, as torchvision's pil_loader does (RGBA, LA, PA); a palette image with
      transparency gives its palette colours.
    - 16-bit gray (I;16, I;16L, I;16B, I;16N), and 32-bit I whose values all lie in 0..65535 (PIL opens 16-bit PGM,
      and older versions 16-bit PNG, as I): round(v * 255 / 65535), as DALI's decoder reduces 16-bit PNGs. Plain
      convert("RGB") would clip at 255 and turn most of a 16-bit image white.
    - F: NaN and infinities become 0; then values within [0, 1] give round(v * 255), values within [0, 255] round(v).
    - I or F outside those ranges: the image's own min..max is stretched to 0..255 (no standard white point).
    Gray results are replicated to 3 channels. Raises the decoder's error (OSError, ValueError, ...) for unreadable
    files.
    """
    with Image.open(path) as image:
        return rgb_of(image)


def rgb_of(image: Image.Image) -> Image.Image:
    """An opened image decoded and converted by load_rgb's rule (for callers that set up the decoder first, such as
    a JPEG draft)."""
    if image.mode in _WIDE_GRAY_MODES:
        return Image.fromarray(_wide_gray_to_8bit(np.asarray(image))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return image.convert("RGB")  # convert() loads every pixel, so a truncated file fails now, not later


def _wide_gray_to_8bit(values: np.ndarray) -> np.ndarray:
    """uint8 [H, W] from the pixels of an I;16*, I or F image, by the rule in load_rgb's docstring."""
    white_points = (65535.0,) if values.dtype.kind in "iu" else (1.0, 255.0)
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    white = next((white for white in white_points if low >= 0 and high <= white), None)
    if white is None:  # no standard range holds the values: stretch the image's own
        values, white = values - low, (high - low) or 1.0
    return np.rint(values * 255 / white).astype(np.uint8)


class ImageFolderDataset(Dataset):
    """Images of a folder (see `find_images` for the layouts) as (transform(image), label) pairs.

    A file that cannot be decoded is logged once (per process) on the "fastdino.data" logger, counted in
    `num_skipped` (per process: each data-loader worker keeps its own count) and replaced by the next readable sample
    (index + 1, + 2, ... wrapping around), so the result for a given index is deterministic. A folder in which no
    file decodes at all raises DatasetError when the dataset is built.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None):
        self.root = Path(root)
        self.samples, self.classes = find_images(self.root)
        self.transform = transform
        self.num_skipped = 0
        self._unreadable: set[int] = set()
        self._require_a_readable_image()

    def _require_a_readable_image(self) -> None:
        """DatasetError now, in the process that builds the dataset, when not one file decodes: found later, in a
        data-loader worker, it would surface as a traceback after one warning per file. Usually reads one file."""
        for path, _ in self.samples:
            try:
                load_rgb(path)
                return
            except _DECODE_ERRORS:
                continue  # not marked unreadable: load() warns about it when it meets it
        raise self._nothing_readable()

    def _nothing_readable(self) -> DatasetError:
        return DatasetError(f"none of the {len(self.samples)} images under {str(self.root)!r} could be decoded")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, decode: Callable[[str], Any] = load_rgb) -> tuple[Any, int]:
        """decode(path) (the RGB image) and label of sample `index`, or of the next readable sample when that file is
        corrupt."""
        count = len(self.samples)
        if not -count <= index < count:
            raise IndexError(f"sample index {index} out of range for a dataset of {count} images")
        index %= count
        for offset in range(count):
            candidate = (index + offset) % count
            if candidate in self._unreadable:
                continue
            path, label = self.samples[candidate]
            try:
                return decode(path), label
            except _DECODE_ERRORS as error:
                self._unreadable.add(candidate)
                self.num_skipped += 1
                logger.warning("skipping unreadable image %s (%s: %s); using the next sample instead",
                               path, type(error).__name__, error)
        raise self._nothing_readable()  # every file broke after the dataset was built

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from_file = getattr(self.transform, "from_file", None)
        if from_file is not None:  # a transform that decodes the file itself (fast_augment: JPEG draft decoding)
            return self.load(index, from_file)
        image, label = self.load(index)
        return (self.transform(image) if self.transform is not None else image), label
