"""The torchvision GPU-decode loader (fastdino.data.gpu_decode), on the CPU except the last test.

References: torchvision's own transforms (get_params draws, per-image functional ops), the CPU MultiCropLoader with
DataAugmentationDINO (same seed -> same crops up to the documented operation differences), binomial statistics for
the per-slot probabilities.
"""
import logging
import math

import numpy as np
import pytest
import torch
from helpers import tiny_config, write_image_folder
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fastdino import builders
from fastdino import trainer as trainer_module
from fastdino.data import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, ImageFolderDataset, MultiCropLoader
from fastdino.data.gpu_decode import GpuDecodeMultiCropLoader, decode_on_cpu
from fastdino.data.gpu_decode_augment import augment_batch
from fastdino.data.gpu_decode_draws import CropParams, draw_crop_window, draw_image_params, draw_jitter
from fastdino.data.recipe import MultiCropRecipe, multicrop_slots

NUM_IMAGES = 12
RECIPE = dict(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=2,
              global_crop_size=24, local_crop_size=12)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
pytestmark = [pytest.mark.filterwarnings("ignore:.*TorchCodec:DeprecationWarning"),  # torchvision 0.29's decoders
              pytest.mark.usefixtures("one_cpu_thread")]  # tiny tensors: see tests/conftest.py


def smooth_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A natural-looking colour field (a 4x4 random grid, bicubically enlarged)."""
    grid = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    """NUM_IMAGES class folders of one JPEG each, so a label names its image; sizes vary."""
    root = tmp_path_factory.mktemp("gpu_decode_data")
    rng = np.random.default_rng(0)
    for index in range(NUM_IMAGES):
        folder = root / f"class{index:02d}"
        folder.mkdir()
        height, width = (int(v) for v in rng.integers(28, 60, size=2))
        smooth_image(rng, height, width).save(folder / "image.jpg", quality=95)
    return root


def make_loader(root, **overrides) -> GpuDecodeMultiCropLoader:
    crops = {key: overrides.pop(key) for key in list(overrides) if key in RECIPE}
    options = dict(batch_size=4, seed=3, device="cpu", num_threads=2, recipe=MultiCropRecipe(**{**RECIPE, **crops}))
    options.update(overrides)
    return GpuDecodeMultiCropLoader(root, **options)


def levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |a - b| of two normalized crop batches, in 0-255 pixel levels."""
    return float(((a.float() - b.float()) * STD).abs().mean() * 255)


def test_crops_shapes_dtypes_labels(dataset_root):
    loader = make_loader(dataset_root, dtype=torch.bfloat16)
    assert len(loader) == NUM_IMAGES // 4
    steps = list(loader.epoch_iter(0))
    assert len(steps) == len(loader)
    for crops, labels in steps:
        assert [tuple(c.shape) for c in crops] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 2
        assert all(c.dtype == torch.bfloat16 and c.device.type == "cpu" and torch.isfinite(c).all() for c in crops)
        assert labels.dtype == torch.int64 and labels.shape == (4,)


def test_constant_image_gives_the_imagenet_normalized_colour():
    colour = torch.tensor([200, 31, 97], dtype=torch.uint8)
    image = colour.view(3, 1, 1).expand(3, 20, 30).contiguous()
    plain = CropParams((2, 3, 15, 20), False, None, 1.0, 1.0, 1.0, 0.0, False, 0.0, False)
    blurred = CropParams((0, 0, 20, 30), True, None, 1.0, 1.0, 1.0, 0.0, False, 1.7, False)  # blur keeps a constant
    out = augment_batch([image, image], [plain, blurred], size=16)
    expected = ((colour.float() / 255).view(1, 3, 1, 1) - MEAN) / STD
    torch.testing.assert_close(out, expected.expand(2, 3, 16, 16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_together_see_every_image_once(dataset_root, world_size):
    seen = []
    for rank in range(world_size):
        loader = make_loader(dataset_root, batch_size=2, rank=rank, world_size=world_size, local_crops_number=0)
        rank_labels = [labels for _, labels in loader.epoch_iter(5)]
        assert len(rank_labels) == len(loader) == NUM_IMAGES // (2 * world_size)
        seen.extend(torch.cat(rank_labels).tolist())
    assert sorted(seen) == list(range(NUM_IMAGES))


def test_deterministic_resumable_and_seed_dependent(dataset_root):
    full = list(make_loader(dataset_root).epoch_iter(1))
    other_threads = make_loader(dataset_root, num_threads=1, prefetch=1)
    abandoned = other_threads.epoch_iter(1)
    next(abandoned)
    abandoned.close()  # stops its producer thread; a new epoch starts cleanly
    resumed = list(other_threads.epoch_iter(1, start_step=1))
    assert len(resumed) == len(full) - 1
    for (crops_a, labels_a), (crops_b, labels_b) in zip(full[1:], resumed):
        assert torch.equal(labels_a, labels_b)
        assert all(torch.equal(a, b) for a, b in zip(crops_a, crops_b))
    reseeded = list(make_loader(dataset_root, seed=4).epoch_iter(1))
    assert not all(torch.equal(a, b) for a, b in zip(full[0][0], reseeded[0][0]))


def test_same_crops_as_the_cpu_reference_loader(dataset_root):
    """Same seed: same windows, flips, jitter, blur, solarization as MultiCropLoader(DataAugmentationDINO), so the
    pixels differ only by the operations (PIL uint8 vs float, PIL box blur, PIL hue): ~1-2 levels, where
    independent draws differ by ~60."""
    transform = DataAugmentationDINO(RECIPE["global_crops_scale"], RECIPE["local_crops_scale"],
                                     RECIPE["local_crops_number"], RECIPE["global_crop_size"],
                                     RECIPE["local_crop_size"])
    reference = list(MultiCropLoader(ImageFolderDataset(dataset_root, transform), batch_size=4, num_workers=0,
                                     seed=3).epoch_iter(2))
    ours = list(make_loader(dataset_root).epoch_iter(2))
    unrelated = list(make_loader(dataset_root).epoch_iter(3))
    for (crops_ref, labels_ref), (crops, labels) in zip(reference, ours):
        assert torch.equal(labels_ref, labels)
        assert max(levels(a, b) for a, b in zip(crops_ref, crops)) < 4.0
    assert min(levels(a, b) for (ca, _), (cb, _) in zip(reference, unrelated) for a, b in zip(ca, cb)) > 20.0


@pytest.mark.parametrize("height,width,scale", [(40, 60, (0.4, 1.0)), (17, 23, (0.05, 0.4)), (8, 200, (0.9, 1.0))])
def test_draws_equal_torchvision_get_params(height, width, scale):
    """Same generator state -> the same numbers as torchvision's RandomResizedCrop / ColorJitter (the last shape
    forces the central-crop fallback)."""
    image = torch.zeros(3, height, width)
    jitter = transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)
    for seed in range(40):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected_window = transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
            order, *factors = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        generator = torch.Generator().manual_seed(seed)
        assert draw_crop_window(height, width, scale, generator) == tuple(expected_window)
        assert draw_jitter(generator) == (tuple(order.tolist()), *factors)


def test_slot_probabilities():
    """Per slot: flip 0.5, jitter 0.8, grayscale 0.2, blur 1 / 0.1 / 0.5, solarize only on slot 1 (0.2), within
    4.5 binomial standard deviations; blur sigmas in [0.1, 2]."""
    slots = multicrop_slots(local_crops_number=1, global_crop_size=24, local_crop_size=12)
    n = 1500
    draws = [draw_image_params(30, 40, slots, seed) for seed in range(n)]
    expected = [dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=1.0, solarize=0.0),
                dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=0.1, solarize=0.2),
                dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=0.5, solarize=0.0)]
    for slot, rates in enumerate(expected):
        params = [image_params[slot] for image_params in draws]
        observed = dict(flip=[p.flip for p in params], jitter=[p.jitter_order is not None for p in params],
                        grayscale=[p.grayscale for p in params], blur=[p.blur_sigma > 0 for p in params],
                        solarize=[p.solarize for p in params])
        for name, p in rates.items():
            rate = sum(observed[name]) / n
            assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12, (slot, name, rate)
        assert all(0.1 <= p.blur_sigma <= 2.0 for p in params if p.blur_sigma > 0)


def test_grayscale_and_solarize_rates_seen_in_the_output():
    """On constant images: a grayscale crop has equal channels (saturation jitter never reaches 0); a bright grey
    crop ends up dark only when solarized. Checked per slot against the binomial rates."""
    slots = multicrop_slots(local_crops_number=1, global_crop_size=8, local_crop_size=4)
    n = 600
    colourful = torch.tensor([200, 40, 110], dtype=torch.uint8).view(3, 1, 1).expand(3, 10, 12).contiguous()
    bright = torch.full((3, 10, 12), 250, dtype=torch.uint8)
    params = [draw_image_params(10, 12, slots, seed) for seed in range(n)]
    for slot, (recipe, solarize_p) in enumerate(zip(slots, (0.0, 0.2, 0.0))):
        slot_params = [p[slot] for p in params]
        pixels = augment_batch([colourful] * n, slot_params, recipe.size) * STD + MEAN
        gray = (pixels.amax(dim=1) - pixels.amin(dim=1)).amax(dim=(1, 2)) < 1e-4
        assert gray.tolist() == [p.grayscale for p in slot_params]
        assert abs(gray.float().mean() - 0.2) <= 4.5 * math.sqrt(0.16 / n)
        dark = (augment_batch([bright] * n, slot_params, recipe.size) * STD + MEAN).mean(dim=(1, 2, 3)) < 0.5
        assert dark.tolist() == [p.solarize for p in slot_params]
        assert abs(dark.float().mean() - solarize_p) <= 4.5 * math.sqrt(solarize_p * (1 - solarize_p) / n)


def reference_crop(image: torch.Tensor, p: CropParams, size: int) -> torch.Tensor:
    """One crop with torchvision's per-image functional ops on float images."""
    top, left, height, width = p.window
    crop = TF.resized_crop(image.float() / 255, top, left, height, width, [size, size],
                           interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    if p.flip:
        crop = TF.horizontal_flip(crop)
    operations = [lambda x: TF.adjust_brightness(x, p.brightness), lambda x: TF.adjust_contrast(x, p.contrast),
                  lambda x: TF.adjust_saturation(x, p.saturation), lambda x: TF.adjust_hue(x, p.hue)]
    for op in p.jitter_order or ():
        crop = operations[op](crop)
    if p.grayscale:
        crop = TF.rgb_to_grayscale(crop, num_output_channels=3)
    if p.blur_sigma > 0:
        kernel = 2 * math.ceil(3 * p.blur_sigma) + 1
        crop = TF.gaussian_blur(crop, [kernel, kernel], [p.blur_sigma, p.blur_sigma])
    if p.solarize:
        crop = TF.solarize(crop, 128 / 255)
    return TF.normalize(crop, IMAGENET_MEAN, IMAGENET_STD)


def test_augment_batch_equals_torchvision_per_image():
    rng = np.random.default_rng(1)
    generator = torch.Generator().manual_seed(1)
    images, params = [], []
    for b in range(10):
        height, width = (int(v) for v in rng.integers(20, 50, size=2))
        images.append(torch.from_numpy(np.array(smooth_image(rng, height, width))).permute(2, 0, 1).contiguous())
        order, *factors = draw_jitter(generator)
        params.append(CropParams(
            window=draw_crop_window(height, width, (0.1, 1.0), generator), flip=bool(b % 2),
            jitter_order=order if b % 3 else None, brightness=factors[0], contrast=factors[1],
            saturation=factors[2], hue=factors[3], grayscale=b in (4, 7), blur_sigma=[0.0, 0.3, 1.1, 2.0, 0.7][b % 5],
            solarize=b in (2, 5, 9)))
    out = augment_batch(images, params, size=16)
    expected = torch.stack([reference_crop(image, p, 16) for image, p in zip(images, params)])
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)


def test_bad_files_png_and_corrupt_jpegs(tmp_path, caplog):
    rng = np.random.default_rng(2)
    for index in range(6):
        smooth_image(rng, 30, 40).save(tmp_path / f"good{index}.jpg")
    smooth_image(rng, 30, 40).convert("P").save(tmp_path / "palette.png")
    whole = (tmp_path / "good0.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # no end marker: caught by the pre-scan
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 500).tolist()) + b"\xff\xd9")
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        loader = GpuDecodeMultiCropLoader(tmp_path, batch_size=4, seed=0, device="cpu", num_threads=2,
                                          recipe=MultiCropRecipe(**RECIPE))
        assert loader.num_rejected == 1 and len(loader.samples) == 8
        for epoch in range(2):
            for crops, labels in loader.epoch_iter(epoch):
                assert all(torch.isfinite(c).all() for c in crops) and labels.tolist() == [-1] * 4
    assert loader.num_failed == 1 and loader.num_cpu_decoded == 1
    text = caplog.text
    assert "truncated.jpg" in text and "garbage.jpg" in text and "palette.png" in text
    assert sum("garbage.jpg" in record.getMessage() for record in caplog.records) == 1  # once, met in 2 epochs


def test_bad_arguments(dataset_root):
    with pytest.raises(ValueError, match="batch"):
        make_loader(dataset_root, batch_size=NUM_IMAGES + 1)
    with pytest.raises(ValueError, match="dtype"):
        make_loader(dataset_root, dtype=torch.int8)
    loader = make_loader(dataset_root)
    with pytest.raises(ValueError, match="start_step"):
        next(loader.epoch_iter(0, start_step=len(loader) + 1))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            make_loader(dataset_root, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_cuda_decode_and_crops_match_cpu(dataset_root):
    from torchvision.io import decode_jpeg

    paths = sorted(str(p) for p in dataset_root.glob("*/*.jpg"))
    data = [torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8) for p in paths]
    on_gpu = decode_jpeg(data, mode="RGB", device="cuda")
    for encoded, path, gpu_image in zip(data, paths, on_gpu):
        cpu_image = decode_on_cpu(encoded, path)
        difference = (gpu_image.cpu().int() - cpu_image.int()).abs()
        assert gpu_image.shape == cpu_image.shape and difference.float().mean() < 1.0, path
    cuda_steps = list(make_loader(dataset_root, device="cuda").epoch_iter(0))
    cpu_steps = list(make_loader(dataset_root, device="cpu").epoch_iter(0))
    for (crops_gpu, labels_gpu), (crops_cpu, labels_cpu) in zip(cuda_steps, cpu_steps):
        assert torch.equal(labels_gpu, labels_cpu) and crops_gpu[0].is_cuda
        assert max(levels(a.cpu(), b) for a, b in zip(crops_gpu, crops_cpu)) < 2.0


@pytest.mark.parametrize("device,loader,dali_installed,expected", [
    ("cpu", "auto", True, "torch"), ("cuda", "auto", True, "dali"), ("cuda", "auto", False, "gpu_decode"),
    ("cpu", "gpu_decode", True, "gpu_decode"), ("cuda", "torch", False, "torch")])
def test_trainer_loader_choice(monkeypatch, tmp_path, device, loader, dali_installed, expected):
    monkeypatch.setattr(builders, "_dali_installed", lambda: dali_installed)
    config = tiny_config(tmp_path, tmp_path, f"data.loader={loader}")
    fast = builders.resolve_fast_paths(config, torch.device(device))
    assert (fast.dali, fast.gpu_decode) == (expected == "dali", expected == "gpu_decode")
    assert fast.reasons["data.loader"].startswith(f"{expected} (")


def test_trainer_trains_with_the_gpu_decode_loader(tmp_path):
    config = tiny_config(write_image_folder(tmp_path / "images", count=8), tmp_path / "run", "data.loader=gpu_decode",
                         "optim.epochs=1")
    trainer = trainer_module.Trainer(config)
    assert isinstance(trainer.loader, GpuDecodeMultiCropLoader)
    summary = trainer.train(stop_after_steps=2)
    assert trainer.step == 2 and summary
