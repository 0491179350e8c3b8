"""Image folder discovery, robust decoding, and the bundled demo dataset."""
import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastdino.data import IMAGE_EXTENSIONS, DatasetError, ImageFolderDataset, find_images
from fastdino.data.demo_dataset import demo_attention_images, materialize_demo_dataset

REPO = Path(__file__).resolve().parents[1]


def _write_image(path: Path, color=(200, 30, 60), size=(12, 10), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def test_class_folders_follow_imagefolder_semantics(tmp_path):
    for name in ["b/x2.png", "b/x1.jpg", "a/y.JPEG", "a/deep/er/z.webp", "c/q.tif", "c/r.bmp"]:
        _write_image(tmp_path / name)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "x3.jpg.bak").write_bytes(b"")
    _write_image(tmp_path / "loose.jpg")  # ignored in class layout, as in torchvision's ImageFolder
    _write_image(tmp_path / ".hidden" / "h.jpg")

    samples, classes = find_images(tmp_path)

    assert classes == ["a", "b", "c"]
    expected = sorted(str(p) for p in (tmp_path / "a").rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    assert [path for path, label in samples if label == 0] == expected
    assert [Path(path).name for path, label in samples if label == 1] == ["x1.jpg", "x2.png"]
    assert [Path(path).name for path, label in samples if label == 2] == ["q.tif", "r.bmp"]
    assert len(samples) == 6


def test_flat_folder_has_unknown_labels(tmp_path):
    for name in ["2.png", "1.jpg", "3.TIFF"]:
        _write_image(tmp_path / name)
    (tmp_path / "readme.md").write_text("x")
    samples, classes = find_images(tmp_path)
    assert classes == []
    assert [(Path(p).name, label) for p, label in samples] == [("1.jpg", -1), ("2.png", -1), ("3.TIFF", -1)]


def test_missing_and_empty_folders_raise_helpful_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="empty.*no image files.*\\.jpg.*\\.png"):
        find_images(tmp_path / "empty")
    _write_image(tmp_path / "classes" / "cat" / "1.jpg")
    (tmp_path / "classes" / "dog").mkdir()
    with pytest.raises(DatasetError, match="dog"):
        find_images(tmp_path / "classes")
    assert issubclass(DatasetError, ValueError)


def _jpeg_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_corrupt_files_are_skipped_counted_and_named(tmp_path, caplog):
    for i in (0, 2, 4):
        _write_image(tmp_path / f"{i}.jpg", color=(10 * i, 0, 0))
    truncated = tmp_path / "1.jpg"
    whole = _jpeg_bytes()
    truncated.write_bytes(whole[:len(whole) // 2])
    with Image.open(truncated) as lazy:  # the header is intact: only decoding the pixels reveals the damage
        assert lazy.size == (64, 64)
    garbage = tmp_path / "3.jpg"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 5

    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        first_pass = [dataset[i] for i in range(len(dataset))]
        second_pass = [dataset[i] for i in range(len(dataset))]

    assert dataset.num_skipped == 2
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert str(truncated) in warned and str(garbage) in warned
    assert len(caplog.records) == 2  # once per file, not once per access
    # Each bad sample is replaced by the next readable one, deterministically.
    reds = [image.getpixel((0, 0))[0] for image, _ in first_pass]
    assert reds == [0, 20, 20, 40, 40]
    assert [image.getpixel((0, 0)) for image, _ in second_pass] == [image.getpixel((0, 0)) for image, _ in first_pass]
    assert all(image.mode == "RGB" for image, _ in first_pass)


def _unreadable_folder(folder: Path) -> Path:
    """Three files with image names and no readable image: text, an empty file, a PNG signature with garbage."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jpg").write_bytes(b"not a jpeg")
    (folder / "b.png").write_bytes(b"")
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    return folder


def test_a_folder_without_one_readable_image_fails_when_the_dataset_is_built(tmp_path, caplog):
    folder = _unreadable_folder(tmp_path / "bad")
    with caplog.at_level(logging.WARNING, logger="fastdino.data"), \
            pytest.raises(DatasetError, match=re.escape(f"none of the 3 images under '{folder}' could be decoded")):
        ImageFolderDataset(folder)
    assert not caplog.records  # one error, not one warning per file first


def test_files_that_break_after_the_dataset_is_built_end_in_the_same_error(tmp_path, caplog):
    folder = _unreadable_folder(tmp_path / "bad")
    _write_image(folder / "d.png")
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        dataset = ImageFolderDataset(folder)
        assert not caplog.records  # files are warned about when a sample meets them, not by the check
        assert dataset[0][0].size == (12, 10) and dataset.num_skipped == 3
    (folder / "d.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=re.escape(f"none of the 4 images under '{folder}'")):
        dataset[1]


def test_command_line_names_a_folder_without_one_readable_image(tmp_path):
    folder = _unreadable_folder(tmp_path / "bad")
    run = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"data.path={folder}", f"output_dir={tmp_path / 'run'}",
         "device=cpu", "data.num_workers=2", "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8",
         "data.global_crop_size=16", "data.local_crop_size=8", "data.batch_size_per_gpu=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "skipping unreadable" not in run.stderr, run.stderr
    naming = [line for line in run.stderr.splitlines() if str(folder) in line]
    assert naming == [f"error: none of the 3 images under '{folder}' could be decoded"], run.stderr


def test_grayscale_cmyk_and_alpha_decode_to_rgb(tmp_path):
    _write_image(tmp_path / "gray.jpg", color=128, mode="L")
    _write_image(tmp_path / "cmyk.jpg", color=(0, 255, 255, 0), mode="CMYK")  # pure red in CMYK
    _write_image(tmp_path / "rgba.png", color=(0, 0, 255, 100), mode="RGBA")
    palette = Image.new("P", (12, 10), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    transform_inputs = []
    dataset = ImageFolderDataset(tmp_path, transform=lambda image: transform_inputs.append(image) or "transformed")
    assert [dataset[i][0] for i in range(len(dataset))] == ["transformed"] * 4
    by_name = {Path(path).stem: image for (path, _), image in zip(dataset.samples, transform_inputs)}
    assert all(image.mode == "RGB" and image.size == (12, 10) for image in by_name.values())
    gray = np.asarray(by_name["gray"]).astype(int)
    assert np.all(np.abs(gray - 128) <= 2)
    cmyk = np.asarray(by_name["cmyk"]).astype(int)
    assert np.all(np.abs(cmyk - [255, 0, 0]) <= 8)
    assert np.all(np.asarray(by_name["rgba"]) == [0, 0, 255])
    assert np.all(np.asarray(by_name["palette"]) == [0, 200, 0])
    assert dataset.num_skipped == 0


def test_index_out_of_range(tmp_path):
    _write_image(tmp_path / "a.jpg")
    with pytest.raises(IndexError):
        ImageFolderDataset(tmp_path)[1]


def test_demo_dataset_materializes_balanced_and_idempotent(tmp_path):
    from sklearn.datasets import load_digits

    train_dir, val_dir = materialize_demo_dataset(tmp_path, image_size=16)
    train, val = ImageFolderDataset(train_dir), ImageFolderDataset(val_dir)
    digits = load_digits()
    assert len(train) + len(val) == len(digits.target)
    assert train.classes == val.classes and len(train.classes) == 10
    train_counts = np.bincount([label for _, label in train.samples])
    val_counts = np.bincount([label for _, label in val.samples])
    assert np.all(np.abs(val_counts / (train_counts + val_counts) - 1 / 3) < 0.02)  # stratified split
    assert np.array_equal(train_counts + val_counts, np.bincount(digits.target))
    image, label = train[0]
    assert image.size == (16, 16) and image.mode == "RGB"

    # Pixels match the source digit (upscaled), and the label matches the source target.
    index = int(Path(train.samples[0][0]).stem)
    assert digits.target[index] == label
    small = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
    assert np.abs(small - digits.images[index] * 255 / 16).mean() < 20

    stamps = {p: p.stat().st_mtime_ns for p in train_dir.rglob("*.jpg")}
    assert materialize_demo_dataset(tmp_path, image_size=16) == (train_dir, val_dir)
    assert {p: p.stat().st_mtime_ns for p in train_dir.rglob("*.jpg")} == stamps  # nothing rewritten

    # A missing file or different settings trigger a rebuild.
    next(iter(stamps)).unlink()
    materialize_demo_dataset(tmp_path, image_size=16)
    assert len(ImageFolderDataset(train_dir)) == len(train)
    materialize_demo_dataset(tmp_path, image_size=12)
    assert ImageFolderDataset(val_dir)[0][0].size == (12, 12)


def test_demo_dataset_refuses_foreign_folders_and_bad_settings(tmp_path):
    _write_image(tmp_path / "train" / "mine" / "1.jpg")
    with pytest.raises(DatasetError, match="not written by materialize_demo_dataset"):
        materialize_demo_dataset(tmp_path)
    assert (tmp_path / "train" / "mine" / "1.jpg").exists()
    with pytest.raises(ValueError, match="unknown demo dataset source 'imagenet'; available: digits"):
        materialize_demo_dataset(tmp_path / "x", source="imagenet")


def test_demo_attention_images_are_real_rgb_photos():
    images = demo_attention_images()
    assert len(images) >= 3
    for name, image in images:
        assert image.mode == "RGB" and min(image.size) >= 256, name
        assert np.asarray(image).std() > 20, name  # a photo, not a flat placeholder
