"""The CPU multi-crop loader: the per-rank index plan, per-sample determinism, exact resume, untouched global RNG."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.data import DataAugmentationDINO, ImageFolderDataset, MultiCropLoader, epoch_batches, sample_seed


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(22):
        folder = root / f"class_{i % 3}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    augment = DataAugmentationDINO(local_crops_number=1, global_crop_size=8, local_crop_size=4)
    return ImageFolderDataset(root, augment)


def _epoch(loader, epoch, start_step=0):
    return [(list(crops), labels) for crops, labels in loader.epoch_iter(epoch, start_step)]


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (crops, labels), (expected_crops, expected_labels) in zip(got, expected):
        assert torch.equal(labels, expected_labels)
        assert len(crops) == len(expected_crops)
        assert all(torch.equal(a, b) for a, b in zip(crops, expected_crops))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_drop_last_plan_sees_each_image_at_most_once(world_size):
    num_samples, batch_size = 23, 3
    plans = [epoch_batches(num_samples, batch_size, seed=5, epoch=4, rank=r, world_size=world_size)
             for r in range(world_size)]
    seen = [index for plan in plans for batch in plan for index in batch]
    assert len(seen) == len(set(seen)) == num_samples // (world_size * batch_size) * world_size * batch_size
    assert set(seen) <= set(range(num_samples))
    assert all(len(plan) == len(plans[0]) for plan in plans)  # same step count on every rank
    assert all(len(batch) == batch_size for plan in plans for batch in plan)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_keep_last_plan_sees_every_image(world_size):
    num_samples, batch_size = 23, 4
    plans = [epoch_batches(num_samples, batch_size, seed=5, epoch=0, rank=r, world_size=world_size, drop_last=False)
             for r in range(world_size)]
    seen = [index for plan in plans for batch in plan for index in batch]
    assert set(seen) == set(range(num_samples))
    assert len(seen) - num_samples == (-num_samples) % world_size  # padding only to even out the ranks
    assert all(len(plan) == len(plans[0]) for plan in plans)


def test_plan_depends_on_seed_and_epoch_only():
    plan = epoch_batches(100, 10, seed=1, epoch=0)
    assert plan == epoch_batches(100, 10, seed=1, epoch=0)
    assert plan != epoch_batches(100, 10, seed=1, epoch=1)
    assert plan != epoch_batches(100, 10, seed=2, epoch=0)
    # Shards of one epoch are slices of one shared permutation.
    whole = [i for batch in plan for i in batch]
    two_ranks = [epoch_batches(100, 10, seed=1, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert [i for batch in two_ranks[1] for i in batch] == whole[1::2]


def test_crops_depend_only_on_seed_epoch_and_index(dataset):
    loader = MultiCropLoader(dataset, batch_size=4, num_workers=0, seed=3)
    assert len(loader) == len(dataset) // 4
    batches = _epoch(loader, epoch=2)
    plan = loader.batches(2)
    for (crops, labels), indices in zip(batches, plan):
        assert [tuple(c.shape) for c in crops] == [(4, 3, 8, 8)] * 2 + [(4, 3, 4, 4)]
        assert labels.tolist() == [dataset.samples[i][1] for i in indices]
    # Independent reference: seed the generator by hand and augment the one sample.
    index, position = plan[1][2], 2
    torch.manual_seed(sample_seed(3, 2, index))
    expected = dataset[index][0]
    assert all(torch.equal(batches[1][0][c][position], expected[c]) for c in range(3))
    assert not torch.equal(batches[0][0][0][0], batches[0][0][0][1])


def test_main_process_rng_is_untouched(dataset):
    torch.manual_seed(123)
    random.seed(123)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    _epoch(MultiCropLoader(dataset, batch_size=5, num_workers=0, seed=0), epoch=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state


def test_same_batches_with_workers_and_after_resume(dataset):
    in_process = MultiCropLoader(dataset, batch_size=4, num_workers=0, seed=7)
    with_workers = MultiCropLoader(dataset, batch_size=4, num_workers=2, seed=7)
    reference = {epoch: _epoch(in_process, epoch) for epoch in (0, 1)}
    assert not torch.equal(reference[0][0][0][0], reference[1][0][0][0])  # a new epoch, new order and crops

    first_batch = next(iter(with_workers.epoch_iter(0)))  # abandoned mid-epoch, as a crash would
    _assert_same_batches([(list(first_batch[0]), first_batch[1])], reference[0][:1])
    _assert_same_batches(_epoch(with_workers, 0, start_step=2), reference[0][2:])
    _assert_same_batches(_epoch(with_workers, 1), reference[1])
    _assert_same_batches(_epoch(in_process, 1, start_step=len(in_process) - 1), reference[1][-1:])
    assert _epoch(in_process, 1, start_step=len(in_process)) == []


def test_bad_arguments_raise_clear_errors(dataset):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        MultiCropLoader(dataset, batch_size=8, num_workers=0, seed=0, world_size=3)
    loader = MultiCropLoader(dataset, batch_size=4, num_workers=0, seed=0)
    with pytest.raises(ValueError, match="start_step"):
        next(loader.epoch_iter(0, start_step=len(loader) + 1))
    with pytest.raises(ValueError, match="rank"):
        MultiCropLoader(dataset, batch_size=4, num_workers=0, seed=0, rank=2, world_size=2)
    plain = ImageFolderDataset(dataset.root, transform=lambda image: torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="list of tensors"):
        next(MultiCropLoader(plain, batch_size=4, num_workers=0, seed=0).epoch_iter(0))
