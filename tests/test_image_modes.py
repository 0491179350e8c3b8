"""load_rgb's one rule for every PIL mode, checked against expectations computed in numpy from the pixels written.

Each case writes an array in a format that keeps its mode, checks that PIL opens it in that mode, and compares the
decoded RGB with the expected one exactly (the rules are integer or rounded arithmetic, so no tolerance is needed).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.data import ImageFolderDataset
from fastdino.data.datasets import load_rgb
from fastdino.data.gpu_decode import decode_on_cpu

HEIGHT, WIDTH = 6, 9


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1)


def _stretched(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.round((values - values.min()) * 255 / (values.max() - values.min()))


def _uint16(rng: np.random.Generator) -> np.ndarray:
    values = rng.integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)
    values.flat[:6] = [0, 128, 129, 385, 386, 65535]  # 128.5 and 385.5 (= 1.5 * 257) are where rounding turns
    return values


def _rounded_16_to_8(values: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) in integers: v * 255 = 65535 q + r rounds up when r >= 32768."""
    return (values.astype(np.int64) * 255 + 32767) // 65535


def i16_png(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = _uint16(rng)
    Image.fromarray(values).save(path.with_suffix(".png"))
    return "I;16", _gray(_rounded_16_to_8(values))


def i16b_tiff(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = _uint16(rng)
    Image.frombytes("I;16B", (WIDTH, HEIGHT), values.astype(">u2").tobytes()).save(path.with_suffix(".tif"))
    return "I;16B", _gray(_rounded_16_to_8(values))


def i_tiff_16bit_values(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = _uint16(rng).astype(np.int32)  # 32-bit I holding 16-bit data, as PIL opens 16-bit PGM files
    Image.fromarray(values).save(path.with_suffix(".tif"))
    return "I", _gray(_rounded_16_to_8(values))


def i_tiff_32bit(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = rng.integers(-100_000, 1_000_000, (HEIGHT, WIDTH), dtype=np.int32)  # beyond 16 bits: min..max
    Image.fromarray(values).save(path.with_suffix(".tif"))
    return "I", _gray(_stretched(values))


def f_tiff_unit(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = rng.uniform(0, 1, (HEIGHT, WIDTH)).astype(np.float32)
    values.flat[:3] = [0.0, 1.0, np.nan]
    Image.fromarray(values).save(path.with_suffix(".tif"))
    expected = np.round(np.nan_to_num(values.astype(np.float64)) * 255)
    return "F", _gray(expected)


def f_tiff_8bit_range(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = rng.uniform(0, 255, (HEIGHT, WIDTH)).astype(np.float32)
    values.flat[0] = 200.0  # max above 1: read as 0..255
    Image.fromarray(values).save(path.with_suffix(".tif"))
    return "F", _gray(np.round(values.astype(np.float64)))


def f_tiff_out_of_range(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = rng.uniform(-3, 1000, (HEIGHT, WIDTH)).astype(np.float32)
    Image.fromarray(values).save(path.with_suffix(".tif"))
    return "F", _gray(_stretched(values))


def cmyk_tiff(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    values[0, :3] = [[0, 0, 0, 0], [255, 255, 255, 255], [0, 255, 255, 0]]  # white, black, pure red
    Image.frombytes("CMYK", (WIDTH, HEIGHT), values.tobytes()).save(path.with_suffix(".tif"))
    cmy, k = values[..., :3].astype(np.int64), values[..., 3:].astype(np.int64)
    expected = ((255 - cmy) * (255 - k) + 127) // 255  # round((255 - C)(255 - K) / 255), no ties possible
    assert expected[0, :3].tolist() == [[255, 255, 255], [0, 0, 0], [255, 0, 0]]
    return "CMYK", expected


def palette_with_transparency(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    image = Image.frombytes("P", (WIDTH, HEIGHT), indices.tobytes())
    image.putpalette(palette.tobytes())
    image.save(path.with_suffix(".png"), transparency=bytes(rng.integers(0, 256, 256, dtype=np.uint8)))
    return "P", palette[indices]


def la_png(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = rng.integers(0, 256, (HEIGHT, WIDTH, 2), dtype=np.uint8)
    Image.frombytes("LA", (WIDTH, HEIGHT), values.tobytes()).save(path.with_suffix(".png"))
    return "LA", _gray(values[..., 0])


def rgba_png(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    values[..., 3].flat[:2] = [0, 255]  # alpha is dropped: fully transparent pixels keep their colour
    Image.fromarray(values).save(path.with_suffix(".png"))
    return "RGBA", values[..., :3]


def bilevel_png(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = rng.integers(0, 2, (HEIGHT, WIDTH)).astype(bool)
    Image.fromarray(values).save(path.with_suffix(".png"))
    return "1", _gray(values * 255)


def l_png(path: Path, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    values = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    Image.fromarray(values).save(path.with_suffix(".png"))
    return "L", _gray(values)


CASES = [i16_png, i16b_tiff, i_tiff_16bit_values, i_tiff_32bit, f_tiff_unit, f_tiff_8bit_range, f_tiff_out_of_range,
         cmyk_tiff, palette_with_transparency, la_png, rgba_png, bilevel_png, l_png]


def _written(write, folder: Path) -> tuple[Path, str, np.ndarray]:
    mode, expected = write(folder / write.__name__, np.random.default_rng(0))
    (path,) = folder.glob(f"{write.__name__}.*")
    return path, mode, expected


@pytest.mark.parametrize("write", CASES, ids=[case.__name__ for case in CASES])
def test_every_mode_decodes_to_the_expected_rgb(write, tmp_path):
    path, mode, expected = _written(write, tmp_path)
    with Image.open(path) as opened:
        assert opened.mode == mode  # the file really holds the mode under test
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(image), expected.astype(np.uint8))


def test_every_pil_path_uses_the_same_rule(tmp_path):
    """The torchvision loader's dataset and the GPU-decode loader's CPU decoding give load_rgb's pixels."""
    written = [_written(write, tmp_path) for write in CASES]
    dataset = ImageFolderDataset(tmp_path)
    by_path = {path: index for index, (path, _) in enumerate(dataset.samples)}
    for path, _, expected in written:
        from_dataset = np.asarray(dataset[by_path[str(path)]][0])
        encoded = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        from_gpu_loader = decode_on_cpu(encoded, str(path)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(from_dataset, expected, err_msg=path.name)
        np.testing.assert_array_equal(from_gpu_loader, expected, err_msg=path.name)
