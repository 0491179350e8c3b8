"""DALI multi-crop loader: shapes, sharding, determinism, the augmentation distribution against torchvision, bad files.

Augmentation rates are measured on synthetic images built so that one effect is visible (a ramp shows a flip, a
constant colour shows grayscale and solarization, a checkerboard shows blur) with the other effects switched off.
Crops are tiny so the whole file runs in seconds on CPU DALI.
"""
import io
import json
import logging
import math
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia.dali cannot be imported (install nvidia-dali-cuda130)")
from crop_statistics import pixels, save  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.stats import ks_2samp, kstest  # noqa: E402
from torchvision.transforms import RandomResizedCrop  # noqa: E402

from fastdino.data.dali import (DaliMultiCropLoader, WebDatasetShards, make_webdataset_index,  # noqa: E402
                                scan_image_files)
from fastdino.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from fastdino.data.datasets import DatasetError  # noqa: E402
from fastdino.data.recipe import MultiCropRecipe  # noqa: E402
from fastdino.data.torch_loader import epoch_batches  # noqa: E402

NO_EFFECTS = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))
TINY = dict(local_crops_number=2, global_crop_size=16, local_crop_size=8)
SMALL = MultiCropRecipe(local_crops_number=1, global_crop_size=16, local_crop_size=8)


def _run(path: str, recipe: MultiCropRecipe, count: int = 256, batch_size: int = 64, epoch: int = 0):
    """All crop batches (per slot, concatenated) and parameters of `count` copies of one image."""
    loader = DaliMultiCropLoader([(path, i) for i in range(count)], batch_size, seed=3, recipe=recipe, num_threads=2)
    slots = [[] for _ in range(recipe.num_crops)]
    params = [[] for _ in range(recipe.num_crops)]
    for crops, _, batch_params in loader.epoch_iter_with_params(epoch):
        for slot in range(recipe.num_crops):
            slots[slot].append(crops[slot])
            params[slot].append(batch_params[slot])
    merged = [{key: torch.cat([p[key] for p in slot_params]) for key in slot_params[0]} for slot_params in params]
    return [torch.cat(s) for s in slots], merged


def _assert_rate(observed: torch.Tensor, p: float, name: str):
    """A Bernoulli rate within 4.5 standard deviations (exactly 0 or 1 when p is)."""
    n = observed.numel()
    rate = observed.float().mean().item()
    tolerance = 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9
    assert abs(rate - p) <= tolerance, f"{name}: rate {rate:.3f} over {n} crops, expected {p} +- {tolerance:.3f}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of smooth random JPEGs (ImageNet-like aspect ratio, small)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / f"class{label}").mkdir()
        for i in range(12):
            small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
            big = np.asarray(Image.fromarray(small).resize((80, 60), Image.BILINEAR))
            save(big, root / f"class{label}" / f"{i}.jpg", quality=90)
    return root


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_dtypes_and_count(folder, dtype):
    loader = DaliMultiCropLoader(folder, batch_size=4, dtype=dtype, num_threads=2, device="cpu",
                                 recipe=MultiCropRecipe(local_crops_number=3, global_crop_size=32, local_crop_size=16))
    assert len(loader) == 24 // 4
    batches = list(loader.epoch_iter(0))
    assert len(batches) == len(loader)
    crops, labels = batches[0]
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(c.dtype == dtype and c.device.type == "cpu" for c in crops)
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0] * 12 + [1] * 12


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_normalization_of_a_constant_colour(tmp_path, dtype, tolerance):
    colour = np.array([200.0, 60.0, 120.0])
    path = save(np.broadcast_to(colour, (40, 50, 3)), tmp_path / "flat.png")
    recipe = MultiCropRecipe(**TINY, **{**NO_EFFECTS, "flip_p": 0.5, "blur_p": (1.0, 0.5, 0.5)})
    loader = DaliMultiCropLoader([(path, 0)] * 8, 8, recipe=recipe, dtype=dtype, num_threads=2)
    crops, _ = next(loader.epoch_iter(0))
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for crop in crops:
        torch.testing.assert_close(crop.float().mean(dim=(0, 2, 3)), expected.float(), atol=tolerance, rtol=0)
        assert crop.float().std(dim=(0, 2, 3)).max() < tolerance


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sharding_covers_every_file_once_per_epoch(tmp_path, world_size, drop_last):
    path = save(np.full((20, 20, 3), 90), tmp_path / "img.png")
    count = 24 if drop_last else 26  # 24: a multiple of every world_size * batch_size
    recipe = MultiCropRecipe(**TINY, **NO_EFFECTS)
    seen = []
    for rank in range(world_size):
        loader = DaliMultiCropLoader([(path, i) for i in range(count)], 4, seed=1, rank=rank, world_size=world_size,
                                     drop_last=drop_last, recipe=recipe, num_threads=1)
        labels = [b[1] for b in loader.epoch_iter(2)]
        assert len(labels) == len(loader)
        plan = epoch_batches(count, 4, 1, 2, rank, world_size, drop_last)  # the order MultiCropLoader uses
        assert [batch.tolist() for batch in labels] == plan
        seen += torch.cat(labels).tolist()
    if drop_last:
        assert sorted(seen) == list(range(count))
    else:
        assert set(seen) == set(range(count)) and len(seen) - count < world_size * 4


def test_deterministic_by_seed_and_resumable(folder):
    def crops_of(seed, epoch, start_step=0):
        loader = DaliMultiCropLoader(folder, 4, seed=seed, num_threads=2, recipe=SMALL)
        return list(loader.epoch_iter(epoch, start_step))

    first, again, other_epoch = crops_of(0, 1), crops_of(0, 1), crops_of(0, 2)
    for (crops_a, labels_a), (crops_b, labels_b) in zip(first, again):
        assert torch.equal(labels_a, labels_b) and all(torch.equal(a, b) for a, b in zip(crops_a, crops_b))
    assert not torch.equal(first[0][0][0], other_epoch[0][0][0])
    resumed = crops_of(0, 1, start_step=2)  # the same images with the same augmentation
    assert len(resumed) == len(first) - 2
    for (crops_a, labels_a), (crops_b, labels_b) in zip(first[2:], resumed):
        assert torch.equal(labels_a, labels_b) and all(torch.equal(a, b) for a, b in zip(crops_a, crops_b))


def test_crop_windows_match_torchvision_random_resized_crop(tmp_path):
    height, width = 200, 300
    path = save(np.zeros((height, width, 3)), tmp_path / "black.png")
    recipe = MultiCropRecipe(**TINY, **NO_EFFECTS)
    _, params = _run(path, recipe, count=256)
    torch.manual_seed(0)
    blank = torch.empty(1, height, width)  # get_params reads only its size
    for slot, scale in ((0, recipe.global_crops_scale), (2, recipe.local_crops_scale)):
        window = params[slot]["window"].double()
        area = (window[:, 0] * window[:, 1] / (height * width)).numpy()
        log_ratio = torch.log(window[:, 1] / window[:, 0]).numpy()
        reference = [RandomResizedCrop.get_params(blank, list(scale), [3 / 4, 4 / 3])
                     for _ in range(2000)]
        reference_area = np.array([h * w / (height * width) for _, _, h, w in reference])
        reference_log_ratio = np.array([math.log(w / h) for _, _, h, w in reference])
        assert ks_2samp(area, reference_area).pvalue > 1e-3, f"slot {slot}: crop area distribution differs"
        assert ks_2samp(log_ratio, reference_log_ratio).pvalue > 1e-3, f"slot {slot}: aspect ratio differs"
        anchor = params[slot]["anchor"]
        assert (anchor >= 0).all() and (anchor[:, 0] + window[:, 0] <= height).all()
        assert (anchor[:, 1] + window[:, 1] <= width).all()


def test_flip_rate_and_crop_content_follow_the_window(tmp_path):
    """A horizontal ramp: red = x. The red range of a crop gives its window; its slope sign gives the flip."""
    height, width = 60, 256
    ramp = np.broadcast_to(np.arange(width, dtype=np.float64)[None, :, None], (height, width, 3)).copy()
    ramp[..., 1:] = 128
    path = save(ramp, tmp_path / "ramp.png")
    recipe = MultiCropRecipe(**TINY, **{**NO_EFFECTS, "flip_p": 0.5})
    slots, params = _run(path, recipe)
    for slot, (crops, p) in enumerate(zip(slots, params)):
        red = pixels(crops)[:, 0]
        slope = red[:, :, -1].mean(1) - red[:, :, 0].mean(1)
        flipped = slope < 0
        assert torch.equal(flipped.long(), p["flip"]), f"slot {slot}: image flips disagree with the drawn flags"
        _assert_rate(flipped, 0.5, f"flip slot {slot}")
        centre = p["anchor"][:, 1] + p["window"][:, 1] / 2
        torch.testing.assert_close(red.mean((1, 2)), centre.float(), atol=4.0, rtol=0)


def test_grayscale_and_solarize_rates_per_slot(tmp_path):
    path = save(np.broadcast_to(np.array([200.0, 150.0, 170.0]), (30, 30, 3)), tmp_path / "colour.png")
    recipe = MultiCropRecipe(**TINY, **{**NO_EFFECTS, "grayscale_p": 0.2, "solarize_p": (0.0, 0.2, 0.0)})
    slots, _ = _run(path, recipe)
    for slot, crops in enumerate(slots):
        colours = pixels(crops).mean((2, 3))  # constant crops: one colour each
        gray = (colours.max(1).values - colours.min(1).values) < 3.0  # uint8 rounding per channel
        solarized = colours.max(1).values < 128  # every channel >= 128 before, so < 128 after inversion
        _assert_rate(gray, 0.2, f"grayscale slot {slot}")
        _assert_rate(solarized, recipe.solarize_p[min(slot, 2)], f"solarize slot {slot}")
        luma = 0.299 * 200 + 0.587 * 150 + 0.114 * 170
        expected = torch.where(solarized[:, None], 255.0 - torch.tensor([200.0, 150.0, 170.0]),
                               torch.tensor([200.0, 150.0, 170.0]))
        expected = torch.where(gray[:, None], torch.where(solarized[:, None], 255.0 - luma, luma), expected)
        torch.testing.assert_close(colours, expected, atol=1.5, rtol=0)


def test_blur_rates_per_slot_and_sigma_range(tmp_path):
    size = 16
    checker = (np.indices((size, size)).sum(0) % 2 * 255)[..., None].repeat(3, axis=2)
    path = save(checker, tmp_path / "checker.png")
    # whole image, same size: no resampling, so any change is the blur; sigma >= 1 makes every blur visible
    recipe = MultiCropRecipe(**{**TINY, "global_crop_size": size, "local_crop_size": size},
                             **{**NO_EFFECTS, "global_crops_scale": (1.0, 1.0), "local_crops_scale": (1.0, 1.0),
                                "blur_p": (1.0, 0.1, 0.5), "blur_sigma": (1.0, 2.0)})
    slots, params = _run(path, recipe)
    for slot, crops in enumerate(slots):
        contrast = pixels(crops).std(dim=(1, 2, 3))
        blurred = contrast < 64  # the checkerboard's std is 127.5; sigma >= 1 leaves < 20
        _assert_rate(blurred, recipe.blur_p[min(slot, 2)], f"blur slot {slot}")
        assert torch.equal(blurred, params[slot]["blur_sigma"] > 0)
    # the default sigma range, from the drawn values: uniform on [0.1, 2]
    recipe = MultiCropRecipe(**TINY, **{**NO_EFFECTS, "blur_p": (1.0, 0.1, 0.5)})
    sigma = _run(path, recipe, count=128)[1][0]["blur_sigma"].numpy()
    assert kstest(sigma, "uniform", args=(0.1, 1.9)).pvalue > 1e-3


@pytest.mark.parametrize("factor", ["brightness", "contrast", "saturation", "hue"])
def test_colour_jitter_ranges(tmp_path, factor):
    """Each jitter alone at p 1 on a two-colour image; the measured factor spans its torchvision range."""
    colours = np.array([[90.0, 110.0, 140.0], [150.0, 130.0, 100.0]])
    image = np.concatenate([np.broadcast_to(colours[0], (32, 16, 3)), np.broadcast_to(colours[1], (32, 16, 3))], 1)
    path = save(image, tmp_path / "two.png")
    strengths = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    strengths[factor] = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)[factor]
    recipe = MultiCropRecipe(**{**TINY, "global_crop_size": 32}, **{**NO_EFFECTS, "jitter_p": 1.0}, **strengths,
                             global_crops_scale=(1.0, 1.0))
    crops = pixels(_run(path, recipe, count=128)[0][0])  # first global crop = whole image
    left, right = crops[:, :, 8:24, 2:12].mean((2, 3)), crops[:, :, 8:24, 20:30].mean((2, 3))
    luma = torch.tensor([0.299, 0.587, 0.114])
    in_left, in_right = torch.tensor(colours[0]).float(), torch.tensor(colours[1]).float()
    if factor == "brightness":
        measured = left.sum(1) / in_left.sum()
        low, high = 0.6, 1.4
    elif factor == "contrast":  # the gap between the two halves scales with contrast around the mean luma
        measured = ((right - left) @ luma) / ((in_right - in_left) @ luma)
        low, high = 0.6, 1.4
        mean_luma = (in_left @ luma + in_right @ luma) / 2
        torch.testing.assert_close((left + right) @ luma / 2, mean_luma.expand(len(left)), atol=1.5, rtol=0)
    elif factor == "saturation":  # chroma (pixel - luma) scales, luma stays
        measured = (left - (left @ luma)[:, None]).norm(dim=1) / (in_left - in_left @ luma).norm()
        low, high = 0.8, 1.2
    else:  # hue: PIL's uint8 HSV hue moves by trunc(255 h), h ~ U(-0.1, 0.1) (torchvision); the max channel stays
        def pil_hsv(rgb: torch.Tensor) -> torch.Tensor:
            pixels = rgb.round().to(torch.uint8).numpy()[None]
            return torch.tensor(np.asarray(Image.fromarray(pixels).convert("HSV"))[0], dtype=torch.float32)

        measured = (pil_hsv(left)[:, 0] - pil_hsv(in_left[None])[0, 0] + 128) % 256 - 128
        low, high = -25.0, 25.0
        torch.testing.assert_close(left.max(1).values, in_left.max().expand(len(left)), atol=0.5, rtol=0)
    slack = 0.03 * (high - low)
    assert measured.min() >= low - slack and measured.max() <= high + slack, (measured.min(), measured.max())
    # 128 uniform draws cover the range: the extremes are within 10 % of its ends
    assert measured.min() <= low + 0.1 * (high - low) + slack and measured.max() >= high - 0.1 * (high - low) - slack


def test_bad_files_are_left_out_with_one_warning(tmp_path, caplog):
    rng = np.random.default_rng(1)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).resize((40, 30)))
    good = save(smooth, tmp_path / "good.jpg", quality=90)
    raw = open(good, "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.jpg").write_text("not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    corrupt = bytearray(raw)
    corrupt[len(raw) // 2: len(raw) // 2 + 20] = bytes(20)
    (tmp_path / "corrupt_middle.jpg").write_bytes(bytes(corrupt))  # decodes with a libjpeg warning
    Image.fromarray(smooth).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    Image.fromarray(smooth).convert("L").save(tmp_path / "gray.jpg", quality=90)
    Image.fromarray(smooth).convert("RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(smooth).save(tmp_path / "png_named.jpg", format="PNG")
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        loader = DaliMultiCropLoader(tmp_path, 2, drop_last=False, num_threads=2, recipe=SMALL)
    assert loader.num_rejected == 3
    warnings = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert len(warnings) == 1 and all(name in warnings[0] for name in ("truncated.jpg", "text.jpg", "empty.jpg"))
    assert len(loader.samples) == 6
    batches = list(loader.epoch_iter(0))
    assert sum(len(labels) for _, labels in batches) == 6
    assert all(torch.isfinite(c).all() for crops, _ in batches for c in crops)


def test_scan_cache_is_reused_until_the_file_changes(tmp_path):
    path = save(np.zeros((8, 8, 3)), tmp_path / "a.jpg")
    cache = tmp_path / "scan.json"
    assert scan_image_files([path], cache) == {}
    entries = json.loads(cache.read_text())
    entries[path][2] = "marked bad in the cache"
    cache.write_text(json.dumps(entries))
    assert scan_image_files([path], cache) == {path: "marked bad in the cache"}
    (tmp_path / "a.jpg").write_bytes(b"garbage now")
    assert "not an image" in scan_image_files([path], cache)[path]


def test_empty_missing_and_unusable_folders_fail_at_start(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        DaliMultiCropLoader(tmp_path / "missing", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        DaliMultiCropLoader(tmp_path / "empty", 2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("no")
    with pytest.raises(DatasetError, match="none of"):
        DaliMultiCropLoader(tmp_path / "bad", 2)


def test_webdataset_shards_with_index_and_labels(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(8):
            buffer = io.BytesIO()
            Image.fromarray(np.full((20, 24, 3), 30 * i, dtype=np.uint8)).save(buffer, format="JPEG")
            for name, payload in ((f"{i:04d}.jpg", buffer.getvalue()), (f"{i:04d}.cls", str(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(FileNotFoundError, match="make_webdataset_index"):
        DaliMultiCropLoader(WebDatasetShards(paths=(str(shard),)), 2)
    make_webdataset_index(shard)
    recipe = MultiCropRecipe(**TINY, **NO_EFFECTS)
    seen = []
    for rank in range(2):
        loader = DaliMultiCropLoader(WebDatasetShards(paths=(str(shard),), initial_fill=8), 2, rank=rank,
                                     world_size=2, recipe=recipe, num_threads=1)
        assert len(loader) == 2
        seen += [label for _, labels in loader.epoch_iter(0) for label in labels.tolist()]
    assert sorted(seen) == list(range(8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG decoding, GPU crops)")
def test_gpu_crops_stay_on_the_gpu(folder):
    loader = DaliMultiCropLoader(folder, 4, dtype=torch.bfloat16, device="cuda",
                                 recipe=MultiCropRecipe(local_crops_number=2))
    crops, labels = next(loader.epoch_iter(0))
    assert all(c.is_cuda and c.dtype == torch.bfloat16 and c.shape[0] == 4 for c in crops)
    assert labels.shape == (4,)
