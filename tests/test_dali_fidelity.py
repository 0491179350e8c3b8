"""The DALI augmentation against the torchvision reference (PIL images): bit-exact pieces, bit-exact end to end, the
same distribution on real photos, and draws that belong to the sample.

- Pieces, against torchvision's functional ops on PIL: grayscale, hue shift and solarization on all 2**24 colours;
  PIL's Gaussian blur at each drawn sigma.
- End to end: crops cut at the photo's native size (no resampling involved), every random effect at the recipe's
  rates; every DALI crop equals torchvision's functional ops applied with the same draws (`draw_augmentations`).
- Distribution: two-sample KS tests of per-crop statistics between the DALI loader and the torchvision loader on real
  photos, each against a threshold calibrated on two independent torchvision runs (the noise floor).
- Crop windows are RandomResizedCrop.get_params's rule applied to the drawn numbers; a sample's crops depend on the
  sample, not on its batch, its rank or where the epoch started.
"""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia.dali cannot be imported (install nvidia-dali-cuda130)")
import torchvision.transforms.functional as F  # noqa: E402
from crop_statistics import (STATISTICS_CROPS, assert_same_distribution, loader_run, save,  # noqa: E402
                             statistics, uint8_crops, write_photo_folder)
from nvidia.dali import fn, pipeline_def  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402
from test_dali import NO_EFFECTS  # noqa: E402

from fastdino.data import sample_seed  # noqa: E402
from fastdino.data import dali_pipeline  # noqa: E402
from fastdino.data.dali import DaliMultiCropLoader  # noqa: E402
from fastdino.data.dali_draws import draw_augmentations  # noqa: E402
from fastdino.data.demo_dataset import demo_attention_images  # noqa: E402
from fastdino.data.recipe import HUE, MultiCropRecipe  # noqa: E402

NATIVE = 32  # photo side for the exact tests: crops of the whole photo at this size need no resampling
WHOLE_PHOTO = dict(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), global_crop_size=NATIVE,
                   local_crop_size=NATIVE)


def _run_graph(graph, *batches: np.ndarray) -> list[np.ndarray]:
    """The outputs of `graph(frames, *parameters)` in a CPU pipeline fed with these batches (frames: FHWC uint8)."""
    @pipeline_def(batch_size=len(batches[0]), num_threads=2, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        nodes = fn.external_source(source=lambda: list(batches), num_outputs=len(batches), batch=True,
                                   layout=["FHWC"] + [""] * (len(batches) - 1))
        return graph(*nodes)

    pipe = pipeline()
    pipe.build()
    return [np.stack([np.asarray(out[i]) for i in range(len(batches[0]))]) for out in pipe.run()]


@pytest.fixture(scope="module")
def native_photos(tmp_path_factory) -> list[str]:
    """The four bundled photos at NATIVE x NATIVE (PNG: both decoders see the same pixels)."""
    root = tmp_path_factory.mktemp("native")
    return [save(np.asarray(image.resize((NATIVE, NATIVE), Image.LANCZOS)), root / f"{name}.png")
            for name, image in demo_attention_images()]


def _dali_crops(samples: list[tuple[str, int]], recipe: MultiCropRecipe, seed: int, device: str = "cpu"):
    """uint8 crops [N, slots, S, S, 3], labels [N] and per-slot parameters [N, slots] of one epoch (0) of DALI."""
    loader = DaliMultiCropLoader(samples, 64, seed=seed, recipe=recipe, drop_last=False, num_threads=2, device=device)
    crops, labels, params = [], [], []
    for batch_crops, batch_labels, batch_params in loader.epoch_iter_with_params(0):
        crops.append(np.stack([uint8_crops(crop) for crop in batch_crops], axis=1))
        labels.append(batch_labels.numpy())
        params.append({key: torch.stack([slot[key] for slot in batch_params], 1).cpu().numpy()
                       for key in batch_params[0]})
    return (np.concatenate(crops), np.concatenate(labels),
            {key: np.concatenate([p[key] for p in params]) for key in params[0]})


def test_grayscale_hue_and_solarize_equal_pil_on_every_colour():
    every = np.arange(2 ** 24, dtype=np.uint32)
    colours = np.stack([every >> 16, (every >> 8) & 255, every & 255], axis=-1).astype(np.uint8)
    image = Image.fromarray(colours.reshape(4096, 4096, 3))
    frames = colours.reshape(1, 256, 256, 256, 3)
    hue_factor = -0.1  # torchvision adds np.int32(hue_factor * 255) = -25 to PIL's uint8 hue, wrapping to 231
    shift = np.full((1, 256, 1, 1, 1), np.int32(hue_factor * 255) % 256, dtype=np.int32)
    luma, hued, solarized = _run_graph(lambda x, s: (dali_pipeline._pil_luma(x), dali_pipeline._pil_hue(x, s, "cpu"),
                                                     dali_pipeline._solarize(x)), frames, shift)
    assert np.array_equal(luma.reshape(4096, 4096), np.asarray(image.convert("L")))
    assert np.array_equal(hued.reshape(4096, 4096, 3), np.asarray(F.adjust_hue(image, hue_factor)))
    assert np.array_equal(solarized.reshape(4096, 4096, 3), np.asarray(F.solarize(image, 128)))
    # a positive shift on every 16th colour
    subset = np.ascontiguousarray(colours[::16]).reshape(1, 16, 256, 256, 3)
    shift = np.full((1, 16, 1, 1, 1), np.int32(0.05 * 255), dtype=np.int32)
    hued = _run_graph(lambda x, s: dali_pipeline._pil_hue(x, s, "cpu"), subset, shift)[0]
    reference = F.adjust_hue(Image.fromarray(subset.reshape(4096, 256, 3)), 0.05)
    assert np.array_equal(hued.reshape(4096, 256, 3), np.asarray(reference))


def test_blur_equals_pil_gaussian_blur_at_each_drawn_sigma(native_photos, tmp_path):
    noise = save(np.random.default_rng(0).integers(0, 256, (NATIVE, NATIVE, 3)), tmp_path / "noise.png")
    paths = native_photos + [noise]
    recipe = MultiCropRecipe(local_crops_number=2, **WHOLE_PHOTO, **{**NO_EFFECTS, "blur_p": (1.0, 1.0, 1.0)})
    crops, labels, params = _dali_crops([(paths[i % len(paths)], i) for i in range(40)], recipe, seed=4)
    sigmas = params["blur_sigma"]
    assert sigmas.min() < 0.3 and sigmas.max() > 1.8  # the range's ends are covered
    for crop, label, sigma in zip(crops, labels, sigmas):
        photo = Image.open(paths[label % len(paths)]).convert("RGB")
        for slot in range(recipe.num_crops):
            expected = photo.filter(ImageFilter.GaussianBlur(radius=float(sigma[slot])))
            assert np.array_equal(crop[slot], np.asarray(expected)), (label, slot, sigma[slot])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the GPU graph)")])])
def test_crops_equal_torchvision_ops_with_the_same_draws(native_photos, device):
    """All effects at the recipe's rates; the reference is ColorJitter's operations in the drawn order, grayscale,
    PIL's blur and solarization on the flipped PIL photo, with the numbers DALI used (draws of the sample's seed)."""
    recipe = MultiCropRecipe(**WHOLE_PHOTO)
    crops, labels, params = _dali_crops([(native_photos[i % 4], i) for i in range(128)], recipe, seed=5, device=device)
    assert (params["window"] == NATIVE).all()
    draws = draw_augmentations(recipe, [sample_seed(5, 0, int(label)) for label in labels])
    jitter_ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for n, label in enumerate(labels):
        for slot in range(recipe.num_crops):
            image = Image.open(native_photos[label % 4]).convert("RGB")
            if draws["flip"][n, slot]:
                image = F.hflip(image)
            if draws["jitter"][n, slot]:
                for operation in draws["order"][n, slot]:
                    image = jitter_ops[operation](image, float(draws["factor"][n, slot, operation]))
            if draws["gray"][n, slot]:
                image = F.rgb_to_grayscale(image, num_output_channels=3)
            if draws["blur_sigma"][n, slot] > 0:
                image = image.filter(ImageFilter.GaussianBlur(radius=float(draws["blur_sigma"][n, slot])))
            if draws["solarize"][n, slot]:
                image = F.solarize(image, 128)
            assert np.array_equal(crops[n, slot], np.asarray(image)), (n, slot)
    # every effect occurred, in both directions of the hue shift
    for key in ("flip", "jitter", "gray", "solarize"):
        assert draws[key].any() and not draws[key].all(), key
    hue_factors = draws["factor"][..., HUE][draws["jitter"]]
    assert hue_factors.min() < -0.05 and hue_factors.max() > 0.05


def _reference_window(height: int, width: int, area, log_ratio, offset, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params (torchvision), with the drawn numbers in place of its random ones."""
    for fraction, log_aspect in zip(area, log_ratio):
        target, aspect = height * width * fraction, math.exp(log_aspect)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return (int(offset[0] * (height - h + 1)), int(offset[1] * (width - w + 1))), (h, w)
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2), (h, w)


@pytest.mark.parametrize("height,width", [(60, 80), (24, 240)])  # 24 x 240: no global attempt fits, fallback
def test_crop_windows_follow_random_resized_crop_on_the_draws(tmp_path, height, width):
    path = save(np.zeros((height, width, 3)), tmp_path / "black.png")
    recipe = MultiCropRecipe(local_crops_number=2, global_crop_size=8, local_crop_size=8, **NO_EFFECTS)
    _, labels, params = _dali_crops([(path, i) for i in range(64)], recipe, seed=6)
    draws = draw_augmentations(recipe, [sample_seed(6, 0, int(label)) for label in labels])
    for n in range(len(labels)):
        for slot in range(recipe.num_crops):
            anchor, window = _reference_window(height, width, draws["area"][n, slot], draws["log_ratio"][n, slot],
                                               draws["offset"][n, slot])
            assert tuple(params["anchor"][n, slot]) == anchor and tuple(params["window"][n, slot]) == window


def test_a_samples_crops_do_not_depend_on_batch_rank_or_start(native_photos):
    recipe = MultiCropRecipe(local_crops_number=1, global_crop_size=16, local_crop_size=8)
    samples = [(native_photos[i % 4], i) for i in range(24)]

    def crops_by_sample(batch_size: int, rank: int = 0, world_size: int = 1, start_step: int = 0) -> dict:
        loader = DaliMultiCropLoader(samples, batch_size, seed=7, rank=rank, world_size=world_size, recipe=recipe,
                                     num_threads=2)
        return {int(label): [crop[k] for crop in crops] for crops, labels in loader.epoch_iter(1, start_step)
                for k, label in enumerate(labels)}

    reference = crops_by_sample(8)
    others = [crops_by_sample(4), {**crops_by_sample(4, 0, 2), **crops_by_sample(4, 1, 2)}, crops_by_sample(4, 0, 1, 3)]
    for other in others:
        assert other and set(other) <= set(reference)
        for label, crops in other.items():
            assert all(torch.equal(a, b) for a, b in zip(crops, reference[label])), label


# ---- distribution on real photos ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


def _dali_run(folder, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """As crop_statistics.loader_run, for the DALI loader; its plain crops come from a second run with every effect
    off (the same draws, so the same windows)."""
    def run(recipe: MultiCropRecipe):
        loader = DaliMultiCropLoader(folder, 64, seed=seed, drop_last=False, num_threads=2, recipe=recipe)
        areas = {label: math.prod(Image.open(path).size) for path, label in loader.samples}
        batches = [([uint8_crops(crop) for crop in crops], [slot["window"] for slot in params], labels)
                   for crops, labels, params in loader.epoch_iter_with_params(0)]
        crops = [np.concatenate([batch[0][slot] for batch in batches]) for slot in range(recipe.num_crops)]
        windows = torch.cat([torch.stack(windows, 1) for _, windows, _ in batches]).numpy()
        area = np.concatenate([[areas[int(label)] for label in labels] for _, _, labels in batches])
        return crops, np.concatenate([windows, np.broadcast_to(area[:, None, None], (*windows.shape[:2], 1))], 2)

    crops, windows = run(MultiCropRecipe(**STATISTICS_CROPS))
    plain, plain_windows = run(MultiCropRecipe(**STATISTICS_CROPS, **NO_EFFECTS))
    assert np.array_equal(windows, plain_windows)
    return crops, plain, windows


def test_dali_crop_statistics_match_the_torchvision_loader_on_photos(photo_folder, monkeypatch):
    """DALI (seed 3) against torchvision (seed 1), with thresholds from torchvision seed 1 against seed 2."""
    first = statistics(loader_run(photo_folder, 1, monkeypatch))
    second = statistics(loader_run(photo_folder, 2, monkeypatch))
    assert_same_distribution(first, second, statistics(_dali_run(photo_folder, 3)), "DALI")
