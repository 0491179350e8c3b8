"""Small real datasets shipped inside installed packages, so the demo trains and evaluates with no download.

`materialize_demo_dataset` writes one of them as JPEG image folders (train/ and val/, one sub-folder per class), the
layout every loader in fastdino reads. Sources are a registry (`DEMO_SOURCES`) so another bundled dataset can be
added by writing one function that returns its images and labels.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from fastdino.data.datasets import DatasetError

_MARKER = ".fastdino_demo.json"
_FORMAT_VERSION = 1
_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


class LabelledImages(NamedTuple):
    """A bundled dataset: images uint8 [N, H, W] (gray) or [N, H, W, 3] (RGB), labels int [N], class names [C]."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


def _digits() -> LabelledImages:
    """scikit-learn's handwritten digits (UCI optdigits test set): 1,797 real 8x8 scans, 10 classes, 17 grey levels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return LabelledImages(images, digits.target.astype(np.int64), [f"digit_{k}" for k in range(10)])


DEMO_SOURCES: dict[str, Callable[[], LabelledImages]] = {"digits": _digits}


def _split(labels: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: indices (train, val) with `val_fraction` of every class held out."""
    rng = np.random.default_rng(0)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held_out = int(round(len(members) * val_fraction))
        val.extend(members[:held_out])
        train.extend(members[held_out:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def _write_split(folder: Path, data: LabelledImages, indices: np.ndarray, image_size: int | None,
                 resample: Image.Resampling, jpeg_quality: int) -> None:
    for index in indices:
        image = Image.fromarray(data.images[index]).convert("RGB")
        if image_size is not None:
            image = image.resize((image_size, image_size), resample)
        class_folder = folder / data.class_names[data.labels[index]]
        class_folder.mkdir(parents=True, exist_ok=True)
        image.save(class_folder / f"{index:06d}.jpg", quality=jpeg_quality)


def _read_marker(marker: Path) -> dict | None:
    """The marker's content; {} for a damaged marker (still ours, so the folders may be rebuilt); None if absent."""
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


def _count_jpegs(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*/*.jpg")) if folder.is_dir() else 0


def materialize_demo_dataset(root: str | Path, source: str = "digits", image_size: int | None = 32,
                             val_fraction: float = 1 / 3, interpolation: str = "bicubic",
                             jpeg_quality: int = 95) -> tuple[Path, Path]:
    """Write bundled dataset `source` as JPEG folders root/train/<class>/*.jpg and root/val/<class>/*.jpg.

    Images are resized to image_size x image_size (None keeps the native size) with `interpolation`; `val_fraction`
    of each class is held out (fixed seed). Idempotent: a marker file records what was written, and a later call with
    the same settings returns at once when the files are all there. Call it from one process (rank 0) only.
    Returns (train_dir, val_dir).
    """
    if source not in DEMO_SOURCES:
        raise ValueError(f"unknown demo dataset source {source!r}; available: {', '.join(sorted(DEMO_SOURCES))}")
    if interpolation not in _RESAMPLING:
        raise ValueError(f"unknown interpolation {interpolation!r}; available: {', '.join(_RESAMPLING)}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be a positive number of pixels or None, got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(root).expanduser()
    train_dir, val_dir, marker = root / "train", root / "val", root / _MARKER
    settings = {"version": _FORMAT_VERSION, "source": source, "image_size": image_size,
                "val_fraction": val_fraction, "interpolation": interpolation, "jpeg_quality": jpeg_quality}

    previous = _read_marker(marker)
    if previous is not None and previous.get("settings") == settings and previous.get("complete") and \
            _count_jpegs(train_dir) == previous["train"] and _count_jpegs(val_dir) == previous["val"]:
        return train_dir, val_dir
    if previous is None and (train_dir.exists() or val_dir.exists()):
        # Without our marker these folders may be the user's own data: never delete them.
        raise DatasetError(f"{str(root)!r} already holds train/ or val/ folders that were not written by "
                           "materialize_demo_dataset; choose an empty folder for the demo dataset")

    data = DEMO_SOURCES[source]()
    train_indices, val_indices = _split(data.labels, val_fraction)
    root.mkdir(parents=True, exist_ok=True)
    # The marker goes first, marked incomplete, so an interrupted run is recognized as ours and redone next time.
    marker.write_text(json.dumps({"settings": settings, "complete": False}))
    for folder, indices in ((train_dir, train_indices), (val_dir, val_indices)):
        shutil.rmtree(folder, ignore_errors=True)
        _write_split(folder, data, indices, image_size, _RESAMPLING[interpolation], jpeg_quality)
    marker.write_text(json.dumps({"settings": settings, "complete": True,
                                  "train": len(train_indices), "val": len(val_indices)}))
    return train_dir, val_dir


_ATTENTION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def demo_attention_images() -> list[tuple[str, Image.Image]]:
    """A few real RGB photos bundled with scikit-image (no download): [(name, PIL image)] for attention-map pictures."""
    try:
        from skimage import data as skimage_data
    except ImportError as error:
        raise ImportError("demo_attention_images needs scikit-image: pip install scikit-image") from error
    return [(name, Image.fromarray(getattr(skimage_data, name)()).convert("RGB")) for name in _ATTENTION_PHOTOS]


def main(argv: list[str] | None = None) -> None:
    """`python -m fastdino.data.demo_dataset DIR`: write the demo dataset under DIR (what `make demo` runs)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", help="folder to write train/ and val/ into")
    parser.add_argument("--source", default="digits", choices=sorted(DEMO_SOURCES))
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    train_dir, val_dir = materialize_demo_dataset(args.root, source=args.source, image_size=args.image_size)
    print(f"demo dataset: {train_dir} and {val_dir}")


if __name__ == "__main__":
    main()
