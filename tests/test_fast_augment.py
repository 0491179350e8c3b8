"""The fast CPU multi-crop path (`fast_augment.FastMultiCrop`) against the torchvision reference
(`DataAugmentationDINO`): the same draws, the same crops where no resampling is involved, the same distributions on
photos with and without JPEG draft decoding, and the loader's guarantees (workers, resume, corrupt files).
"""
import numpy as np
import pytest
import torch
from crop_statistics import (STATISTICS_CROPS, assert_same_distribution, loader_run, save, statistics,
                             uint8_crops, write_photo_folder)
from PIL import Image
from torchvision import transforms

from fastdino.data import DataAugmentationDINO, ImageFolderDataset, MultiCropLoader, MultiCropRecipe
from fastdino.data import fast_augment
from fastdino.data.demo_dataset import demo_attention_images
from fastdino.data.fast_augment import FastMultiCrop, normalize_crops

NATIVE = 32
WHOLE_PHOTO = dict(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), global_crop_size=NATIVE,
                   local_crop_size=NATIVE)


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory):
    """The four bundled photos at NATIVE x NATIVE, 8 PNG copies each (crops of the whole photo need no resampling)."""
    root = tmp_path_factory.mktemp("native")
    for name, image in demo_attention_images():
        (root / name).mkdir()
        pixels = np.asarray(image.convert("RGB").resize((NATIVE, NATIVE), Image.LANCZOS))
        for copy in range(8):
            save(pixels, root / name / f"{copy}.png")
    return root


def test_draws_are_the_references_for_many_samples(monkeypatch):
    """Per sample seed, the windows of all 12 slots equal those RandomResizedCrop draws in the reference, and both
    leave torch's generator in the same state (every coin, factor and sigma drawn in the same order)."""
    recipe = MultiCropRecipe(local_crops_number=10)
    reference, fast = DataAugmentationDINO(recipe=recipe), FastMultiCrop(recipe=recipe)
    image = Image.new("RGB", (500, 375))
    windows = []
    get_params = transforms.RandomResizedCrop.get_params
    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params",
                        staticmethod(lambda *args: windows.append(get_params(*args)) or windows[-1]))
    for seed in range(200):
        torch.manual_seed(seed)
        reference(image)
        after_reference = torch.get_rng_state()
        torch.manual_seed(seed)
        drawn = fast.draw(*image.size)
        assert [p.window for p in drawn] == windows[-recipe.num_crops:], seed
        assert torch.equal(torch.get_rng_state(), after_reference), seed


def test_crops_equal_the_reference_without_resampling(native_folder):
    """Whole-photo crops at the photo's size, every effect at the recipe's rates: per sample, the fast path's uint8
    crops are the reference's pixels, and normalize_crops gives the reference's float input."""
    recipe = MultiCropRecipe(**WHOLE_PHOTO)

    def batches(transform):
        loader = MultiCropLoader(ImageFolderDataset(native_folder, transform), 16, num_workers=0, seed=5)
        return [crops for crops, _ in loader.epoch_iter(0)]

    for reference, fast in zip(batches(DataAugmentationDINO(recipe=recipe)), batches(FastMultiCrop(recipe=recipe))):
        for expected, crop in zip(reference, fast):
            assert crop.dtype == torch.uint8
            assert np.array_equal(uint8_crops(crop), uint8_crops(expected))
            torch.testing.assert_close(normalize_crops([crop], recipe)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """The photos at 400 px, JPEG quality 90: every crop of STATISTICS_CROPS is downscaled 4x or more."""
    return write_photo_folder(tmp_path_factory.mktemp("jpegs"), 400, ".jpg", quality=90)


@pytest.mark.parametrize("folder", ["photo_folder", "jpeg_folder"])
def test_crop_statistics_match_the_reference_on_photos(folder, request, monkeypatch):
    """Fast path (seed 3) against the reference (seed 1), thresholds from reference seed 1 against seed 2; on the
    JPEGs the fast path decodes at 1/4 (or 1/8) of the size (checked), so the draft's filter is measured too."""
    folder = request.getfixturevalue(folder)
    reductions = []
    factor = fast_augment.draft_factor
    monkeypatch.setattr(fast_augment, "draft_factor", lambda *args: reductions.append(factor(*args)) or reductions[-1])
    fast = statistics(loader_run(folder, 3, monkeypatch, FastMultiCrop(**STATISTICS_CROPS)))
    if "jpeg" in str(folder):
        assert min(reductions) >= 4
    first = statistics(loader_run(folder, 1, monkeypatch))
    second = statistics(loader_run(folder, 2, monkeypatch))
    assert_same_distribution(first, second, fast, "the fast CPU path")


def test_a_corrupt_file_is_replaced_with_the_references_draws(native_folder, tmp_path):
    """The sample after a truncated JPEG (its header read, so its windows drawn, before the decode fails) gets the
    crops the reference gives it: the failed decode's draws are undone."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    photo = next(native_folder.glob("*/0.png"))
    Image.open(photo).resize((256, 256)).save(tmp_path / "a" / "0.jpg", quality=90)
    encoded = (tmp_path / "a" / "0.jpg").read_bytes()
    (tmp_path / "a" / "0.jpg").write_bytes(encoded[:len(encoded) // 2])  # sorted first: sample 0
    (tmp_path / "b" / "1.png").write_bytes(photo.read_bytes())
    recipe = MultiCropRecipe(**WHOLE_PHOTO)
    crops = []
    for transform in (DataAugmentationDINO(recipe=recipe), FastMultiCrop(recipe=recipe)):
        torch.manual_seed(11)
        crops.append(ImageFolderDataset(tmp_path, transform)[0][0])
    for expected, crop in zip(*crops):
        assert np.array_equal(uint8_crops(crop[None]), uint8_crops(expected[None]))


def test_the_same_batches_for_any_number_of_workers_and_on_resume(native_folder):
    recipe = MultiCropRecipe(local_crops_number=2, global_crop_size=24, local_crop_size=12)
    dataset = ImageFolderDataset(native_folder, FastMultiCrop(recipe=recipe))

    def epoch(workers: int, start_step: int = 0) -> list:
        loader = MultiCropLoader(dataset, 4, num_workers=workers, seed=3)
        return [(crops, labels) for crops, labels in loader.epoch_iter(1, start_step)]

    alone = epoch(0)
    for other in (epoch(2), epoch(2, start_step=3)):
        expected = alone[len(alone) - len(other):]
        assert len(other) == len(expected)
        for (crops, labels), (crops_expected, labels_expected) in zip(other, expected):
            assert torch.equal(labels, labels_expected)
            assert all(torch.equal(a, b) for a, b in zip(crops, crops_expected))


def test_draft_decoded_crops_show_the_references_windows(jpeg_folder):
    """Without effects, each crop of a draft-decoded JPEG is the reference's crop of the same window up to the
    downscale filters: a window off by a few percent (what the two-sample tests cannot see) moves it much more."""
    recipe = MultiCropRecipe(**STATISTICS_CROPS, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                             solarize_p=(0.0, 0.0, 0.0))
    path = next(jpeg_folder.glob("astronaut/0000.jpg"))
    reference, fast = DataAugmentationDINO(recipe=recipe), FastMultiCrop(recipe=recipe)
    differences = []
    for seed in range(20):
        torch.manual_seed(seed)
        expected = reference(Image.open(path).convert("RGB"))
        torch.manual_seed(seed)
        crops = fast.from_file(path)
        differences += [np.abs(uint8_crops(crop[None]).astype(float) - uint8_crops(e[None])).mean()
                        for crop, e in zip(crops, expected)]
    print(f"mean |difference| per crop: median {np.median(differences):.2f}, max {max(differences):.2f} levels")
    assert np.median(differences) < 6.0
