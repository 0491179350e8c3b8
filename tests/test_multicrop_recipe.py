"""One multi-crop recipe, followed by every loader path: change it in one place and the torchvision transforms
(DataAugmentationDINO under MultiCropLoader), the DALI pipeline (CPU) and the GPU-decode loader (CPU) all follow.

Each path runs with recipes far from the paper's (other crop sizes, areas and aspect ratios; blur on the second
global crop only, solarization on the first, other flip / jitter / grayscale probabilities and strengths, other
normalization), and the crops it makes and the draws it records must be the recipe's, slot by slot. A path that
keeps a number of its own fails here.
"""
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from fastdino.data import DataAugmentationDINO, ImageFolderDataset, MultiCropLoader, sample_seed
from fastdino.data.dali import DALI_IMPORT_ERROR, DaliMultiCropLoader
from fastdino.data.dali_draws import draw_augmentations
from fastdino.data.gpu_decode import GpuDecodeMultiCropLoader
from fastdino.data.gpu_decode_draws import draw_image_params
from fastdino.data.recipe import MultiCropRecipe

pytestmark = [pytest.mark.filterwarnings("ignore:.*TorchCodec:DeprecationWarning"),  # torchvision 0.29's decoders
              pytest.mark.usefixtures("one_cpu_thread")]  # tiny tensors: see tests/conftest.py
PATHS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(DALI_IMPORT_ERROR is not None,
                                                                     reason=f"DALI unusable: {DALI_IMPORT_ERROR}")),
         "gpu_decode"]

# Every probability 0 or 1, so that each crop must show it; areas and aspect ratios disjoint from the paper's.
# Constant images: no jitter and full grayscale leave each crop one known grey, solarized only in slot 0.
LOADER_RECIPE = MultiCropRecipe(
    global_crops_scale=(0.15, 0.3), local_crops_scale=(0.5, 0.7), local_crops_number=3, global_crop_size=16,
    local_crop_size=8, aspect_ratio=(0.9, 1.1), flip_p=1.0, jitter_p=0.0, grayscale_p=1.0, blur_p=(0.0, 1.0, 0.0),
    blur_sigma=(0.5, 1.0), solarize_p=(1.0, 0.0, 0.0), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
# Probabilities strictly between 0 and 1 and other jitter strengths, for the draws alone.
RATES_RECIPE = MultiCropRecipe(
    global_crops_scale=(0.3, 0.6), local_crops_scale=(0.2, 0.35), local_crops_number=2, global_crop_size=8,
    local_crop_size=4, aspect_ratio=(0.7, 1.4), flip_p=0.3, jitter_p=0.6, brightness=0.1,
    contrast=0.2, saturation=0.3, hue=0.05, grayscale_p=0.4, blur_p=(0.3, 0.9, 0.0), blur_sigma=(0.2, 0.6),
    solarize_p=(0.5, 0.0, 0.25))
HEIGHT, WIDTH, COLOUR = 60, 80, (250, 200, 150)  # PIL luma of COLOUR: 209 (solarized: 46)
NUM_IMAGES, BATCH, SEED = 16, 8, 4


@pytest.fixture(scope="module")
def constant_images(tmp_path_factory):
    """NUM_IMAGES PNGs of one colour (PNG: every decoder sees exactly COLOUR), one class folder each."""
    root = tmp_path_factory.mktemp("constant")
    for index in range(NUM_IMAGES):
        (root / f"class{index:02d}").mkdir()
        Image.new("RGB", (WIDTH, HEIGHT), COLOUR).save(root / f"class{index:02d}" / "image.png")
    return root


class TorchvisionRecorder:
    """Wraps the steps of a DataAugmentationDINO's slot transforms to record, per crop slot, what each crop drew:
    a random step that returns a new image was applied. The blur sigma is read off PIL's GaussianBlur (patched)."""

    FLAGS = {transforms.RandomHorizontalFlip: "flip", transforms.RandomApply: "jitter",
             transforms.RandomGrayscale: "gray", transforms.RandomSolarize: "solarize"}

    def __init__(self, augment: DataAugmentationDINO, monkeypatch):
        self.slots = [defaultdict(list) for _ in augment.slot_transforms]
        self.crop: dict = {}
        for compose in {id(t): t for t in augment.slot_transforms}.values():
            compose.transforms = [self._wrap(step) for step in compose.transforms]
        augment.slot_transforms = [self._slot(index, t) for index, t in enumerate(augment.slot_transforms)]
        real_blur = ImageFilter.GaussianBlur

        def recording_blur(radius):
            self.crop["blur"] = radius
            return real_blur(radius)

        monkeypatch.setattr(ImageFilter, "GaussianBlur", recording_blur)

    def _slot(self, index: int, transform):
        def make(image):
            self.crop = {"blur": 0.0, "solarize": False}
            crop = transform(image)
            for name, value in self.crop.items():
                self.slots[index][name].append(value)
            return crop
        return make

    def _wrap(self, step):
        if isinstance(step, transforms.RandomResizedCrop):
            draw_window = step.get_params

            def get_params(image, scale, ratio):
                top, left, h, w = draw_window(image, scale, ratio)
                self.crop.update(area=h * w / (image.size[0] * image.size[1]), ratio=w / h)
                return top, left, h, w
            step.get_params = get_params
            return step
        if isinstance(step, transforms.RandomApply):
            jitter = step.transforms[0]
            draw_jitter = jitter.get_params

            def get_jitter(*ranges):
                order, *factors = draw_jitter(*ranges)
                self.crop["factors"] = factors
                return (order, *factors)
            jitter.get_params = get_jitter
        name = self.FLAGS.get(type(step))
        if name is None:
            return step

        def recorded(image):
            out = step(image)
            self.crop[name] = out is not image
            return out
        return recorded

    def observed(self) -> list[dict[str, np.ndarray]]:
        """Per slot: {name: array over the crops made}; factors only of the crops that were jittered."""
        return [{name: np.array(values, dtype=float).reshape(len(values), -1).squeeze(1) if name != "factors"
                 else np.array(values, dtype=float).reshape(-1, 4) for name, values in slot.items()}
                for slot in self.slots]


def _gpu_decode_observed(slots, height: int, width: int, seeds: list[int]) -> list[dict[str, np.ndarray]]:
    """The draws of the GPU-decode loader (gpu_decode_draws) for these seeds, per slot."""
    params = [draw_image_params(height, width, slots, seed) for seed in seeds]
    observed = []
    for index in range(len(slots)):
        crops = [image_params[index] for image_params in params]
        observed.append({
            "flip": np.array([p.flip for p in crops]), "jitter": np.array([p.jitter_order is not None for p in crops]),
            "gray": np.array([p.grayscale for p in crops]), "blur": np.array([p.blur_sigma for p in crops]),
            "solarize": np.array([p.solarize for p in crops]),
            "factors": np.array([[p.brightness, p.contrast, p.saturation, p.hue] for p in crops
                                 if p.jitter_order is not None]).reshape(-1, 4),
            "area": np.array([p.window[2] * p.window[3] / (height * width) for p in crops]),
            "ratio": np.array([p.window[3] / p.window[2] for p in crops])})
    return observed


def _dali_observed(recipe: MultiCropRecipe, seeds: list[int]) -> list[dict[str, np.ndarray]]:
    """The host-side draws of the DALI loader (dali_draws) for these seeds, per slot."""
    draws = draw_augmentations(recipe, seeds)
    return [{"flip": draws["flip"][:, s], "jitter": draws["jitter"][:, s], "gray": draws["gray"][:, s],
             "blur": draws["blur_sigma"][:, s], "solarize": draws["solarize"][:, s],
             "factors": draws["factor"][:, s][draws["jitter"][:, s]]} for s in range(recipe.num_crops)]


def _rate_matches(hits: np.ndarray, p: float) -> bool:
    """Exactly all or none when p is 1 or 0, else within 4.5 binomial standard deviations."""
    if p in (0.0, 1.0):
        return bool(np.all(hits == bool(p)))
    return abs(hits.mean() - p) <= 4.5 * math.sqrt(p * (1 - p) / hits.size)


def _within(values: np.ndarray, low: float, high: float, tolerance: float = 0.0) -> bool:
    return bool(np.all((values >= low * (1 - tolerance)) & (values <= high * (1 + tolerance))))


def check_draws(recipe: MultiCropRecipe, observed: list[dict[str, np.ndarray]]) -> None:
    """Per crop slot: each coin's rate is the recipe's probability; sigmas, jitter factors, crop areas and aspect
    ratios (where recorded; up to the rounding of the window to whole pixels) lie in the recipe's ranges."""
    assert len(observed) == recipe.num_crops
    for index, (slot, seen) in enumerate(zip(recipe.slots(), observed)):
        probabilities = dict(flip=slot.flip_p, jitter=slot.jitter_p, gray=slot.grayscale_p, blur=slot.blur_p,
                             solarize=slot.solarize_p)
        for name, p in probabilities.items():
            if name in seen:
                assert _rate_matches(np.asarray(seen[name]) > 0, p), (index, name, np.mean(seen[name] > 0), p)
        sigmas = np.asarray(seen["blur"])
        assert _within(sigmas[sigmas > 0], *slot.blur_sigma), (index, sigmas)
        if len(seen.get("factors", ())):
            factors = np.asarray(seen["factors"])
            *blends, hue = slot.jitter_strengths
            for k, strength in enumerate(blends):
                assert _within(factors[:, k], max(0.0, 1 - strength), 1 + strength), (index, k, factors[:, k])
            assert np.all(np.abs(factors[:, 3]) <= hue), (index, factors[:, 3])
        if "area" in seen:
            assert _within(seen["area"], *slot.scale, tolerance=0.06), (index, seen["area"])
            assert _within(seen["ratio"], *slot.aspect_ratio, tolerance=0.05), (index, seen["ratio"])


def check_crops(recipe: MultiCropRecipe, batches: list[tuple[list[torch.Tensor], torch.Tensor]]) -> None:
    """Crop count and sizes are the recipe's; on the constant images every crop is the grey of COLOUR, inverted in
    the solarized slots, after the recipe's normalization."""
    assert len(batches) == NUM_IMAGES // BATCH
    luma = (COLOUR[0] * 19595 + COLOUR[1] * 38470 + COLOUR[2] * 7471 + 0x8000) >> 16  # PIL's convert("L")
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (recipe.mean, recipe.std))
    for crops, labels in batches:
        assert [tuple(crop.shape) for crop in crops] == [(BATCH, 3, slot.size, slot.size) for slot in recipe.slots()]
        assert labels.shape == (BATCH,)
        for index, (slot, crop) in enumerate(zip(recipe.slots(), crops)):
            pixels = (crop.float() * std + mean) * 255
            grey = 255 - luma if slot.solarize_p == 1 and luma >= slot.solarize_threshold else luma
            assert (pixels - grey).abs().max() <= 1.5, (index, pixels.mean(dim=(0, 2, 3)), grey)


@pytest.mark.parametrize("path", PATHS)
def test_every_loader_makes_the_recipes_crops_with_its_draws(path, constant_images, monkeypatch):
    recipe = LOADER_RECIPE
    if path == "torchvision":
        augment = DataAugmentationDINO(recipe=recipe)
        recorder = TorchvisionRecorder(augment, monkeypatch)
        loader = MultiCropLoader(ImageFolderDataset(constant_images, augment), BATCH, num_workers=0, seed=SEED)
        batches = list(loader.epoch_iter(0))
        observed = recorder.observed()
    elif path == "dali":
        loader = DaliMultiCropLoader(constant_images, BATCH, seed=SEED, recipe=recipe, device="cpu", num_threads=2)
        batches, params = [], []
        for crops, labels, batch_params in loader.epoch_iter_with_params(0):
            batches.append((crops, labels))
            params.append(batch_params)
        observed = []
        for index in range(recipe.num_crops):
            window = torch.cat([p[index]["window"] for p in params]).numpy()  # (h, w)
            observed.append({"flip": torch.cat([p[index]["flip"] for p in params]).numpy(),
                             "blur": torch.cat([p[index]["blur_sigma"] for p in params]).numpy(),
                             "area": window[:, 0] * window[:, 1] / (HEIGHT * WIDTH),
                             "ratio": window[:, 1] / window[:, 0]})
    else:
        loader = GpuDecodeMultiCropLoader(constant_images, BATCH, seed=SEED, recipe=recipe, device="cpu",
                                          num_threads=2)
        batches = list(loader.epoch_iter(0))
        seeds = [sample_seed(SEED, 0, index) for batch in loader.batches(0) for index in batch]
        observed = _gpu_decode_observed(loader.slots, HEIGHT, WIDTH, seeds)
    assert (augment if path == "torchvision" else loader).recipe == recipe
    check_crops(recipe, batches)
    check_draws(recipe, observed)


@pytest.mark.parametrize("path", ["torchvision", "dali", "gpu_decode"])
def test_per_slot_rates_and_ranges_follow_the_recipe(path, monkeypatch):
    """The draws alone, many of them: the probabilities strictly between 0 and 1 show up as rates."""
    recipe, n = RATES_RECIPE, 400
    if path == "torchvision":
        augment = DataAugmentationDINO(recipe=recipe)
        recorder = TorchvisionRecorder(augment, monkeypatch)
        image = Image.new("RGB", (WIDTH, HEIGHT), COLOUR)
        with torch.random.fork_rng(devices=[]):
            for seed in range(n):
                torch.manual_seed(seed)
                augment(image)
        observed = recorder.observed()
    elif path == "dali":
        observed = _dali_observed(recipe, list(range(n)))
    else:
        observed = _gpu_decode_observed(recipe.slots(), HEIGHT, WIDTH, list(range(n)))
    check_draws(recipe, observed)
    if path == "torchvision":  # the GPU-decode loader replays torchvision's draws, for this recipe too
        replayed = _gpu_decode_observed(recipe.slots(), HEIGHT, WIDTH, list(range(n)))
        for index, (seen, replay) in enumerate(zip(observed, replayed)):
            for name, values in seen.items():
                assert np.array_equal(values, replay[name]), (index, name)


def test_the_recipe_checks_its_numbers():
    assert MultiCropRecipe.from_settings([0.4, 1], [0.05, 0.4], 8, 224, 96) == MultiCropRecipe()
    for bad in (dict(global_crops_scale=(0.5, 0.2)), dict(local_crops_number=-1), dict(local_crop_size=0),
                dict(blur_p=(1.0, 0.1)), dict(solarize_p=(0.0, 1.2, 0.0)), dict(flip_p=-0.1), dict(hue=0.6),
                dict(blur_sigma=(0.0, 2.0)), dict(aspect_ratio=(4 / 3, 3 / 4)), dict(std=(0.2, 0.0, 0.2))):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            MultiCropRecipe(**bad)
    with pytest.raises(ValueError, match="not both"):
        DataAugmentationDINO(local_crops_number=2, recipe=MultiCropRecipe())
