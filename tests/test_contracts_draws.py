"""What each draw depends on, for every loader (torchvision, GPU decode, DALI): every image of the folder is the same
picture (one per class, so the label names the sample), so two crops differ only through the random draws. They
differ between two epochs at the same position in the order and for the same sample, between two samples and
between two seeds; they are equal for the same (seed, epoch, sample) whatever the batch it falls in (to float
rounding: the GPU-decode loader's batched resampling differs in the last bits with the batch's other crops)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.data import DataAugmentationDINO, ImageFolderDataset, MultiCropLoader
from fastdino.data.gpu_decode import GpuDecodeMultiCropLoader
from fastdino.data.recipe import MultiCropRecipe

RECIPE = MultiCropRecipe(local_crops_number=1, global_crop_size=16, local_crop_size=8)
SAMPLES = 8


def same(a, b):
    return torch.allclose(a, b, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("same_picture")
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    picture = Image.fromarray(small).resize((64, 48), Image.BILINEAR)
    for index in range(SAMPLES):
        (root / f"class{index}").mkdir()
        picture.save(root / f"class{index}" / "image.jpg", quality=95)
    return root


def make_loader(kind, folder, seed, batch_size):
    if kind == "torch":
        augment = DataAugmentationDINO(local_crops_number=1, global_crop_size=16, local_crop_size=8)
        return MultiCropLoader(ImageFolderDataset(folder, augment), batch_size=batch_size, num_workers=0, seed=seed)
    if kind == "gpu_decode":
        return GpuDecodeMultiCropLoader(folder, batch_size=batch_size, seed=seed, device="cpu", num_threads=1,
                                        recipe=RECIPE)
    pytest.importorskip("nvidia.dali")
    from fastdino.data.dali import DaliMultiCropLoader

    return DaliMultiCropLoader(folder, batch_size, seed=seed, num_threads=1, recipe=RECIPE)


def epoch_crops(kind, folder, seed, epoch, batch_size=4):
    """[(sample, first global crop)] in the order of the epoch."""
    found = []
    for crops, labels in make_loader(kind, folder, seed, batch_size).epoch_iter(epoch):
        found += [(int(label), crops[0][position].float().cpu()) for position, label in enumerate(labels)]
    return found


@pytest.mark.parametrize("kind", ["torch", "gpu_decode", "dali"])
def test_each_draw_depends_on_seed_epoch_and_sample_only(folder, kind):
    first, second = epoch_crops(kind, folder, 0, 0), epoch_crops(kind, folder, 0, 1)
    assert len(first) == len(second) == SAMPLES
    for (_, crop), (_, next_epoch) in zip(first, second):  # the same position in the order
        assert not same(crop, next_epoch)
    assert not any(same(a, b) for index, (_, a) in enumerate(first) for _, b in first[index + 1:])  # samples
    by_sample = dict(second)
    assert all(not same(crop, by_sample[sample]) for sample, crop in first)  # the same sample
    reseeded = dict(epoch_crops(kind, folder, 1, 0))
    assert all(not same(crop, reseeded[sample]) for sample, crop in first)
    other_batches = dict(epoch_crops(kind, folder, 0, 0, batch_size=2))  # another batch and position in it
    assert all(same(crop, other_batches[sample]) for sample, crop in first)
