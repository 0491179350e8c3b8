"""Multi-crop batches from CPU worker processes (torch DataLoader), sharded across ranks and exactly reproducible.

Two things make a run resumable to the image:
- the epoch's order is a permutation drawn from (seed, epoch) alone, identical on every rank, and each rank takes a
  strided share of it;
- every sample's augmentation is drawn from its own generator state, seeded from (seed, epoch, dataset index), so the
  crops do not depend on which worker decodes them, how many workers there are, or where the iteration started.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  drop_last: bool = True) -> list[list[int]]:
    """Dataset indices of this rank's batches for one epoch.

    A permutation of range(num_samples) drawn from a torch.Generator seeded with (seed, epoch) is shared by all ranks;
    rank r takes positions r, r + world_size, ... (DistributedSampler's layout). Every rank gets the same number of
    batches, as collective operations require.
    - drop_last=True: the permutation is cut to a multiple of world_size * batch_size, so each image is seen at most
      once per epoch across ranks and the remainder (num_samples mod world_size * batch_size) is skipped this epoch
      (a different remainder each epoch).
    - drop_last=False: the permutation is padded with its own first entries to a multiple of world_size (at most
      world_size - 1 repeats), so every image is seen at least once; the last batch may be smaller than batch_size.
    """
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size > 0 and 0 <= rank < world_size, got batch_size={batch_size}, "
                         f"rank={rank}, world_size={world_size}")
    generator = torch.Generator().manual_seed(mix_seeds(seed, epoch))
    order = torch.randperm(num_samples, generator=generator).tolist()
    if drop_last:
        order = order[:num_samples // (world_size * batch_size) * world_size * batch_size]
    elif num_samples > 0:
        padded_length = -(-num_samples // world_size) * world_size
        order = (order * -(-padded_length // num_samples))[:padded_length]
    share = order[rank::world_size]
    return [share[start:start + batch_size] for start in range(0, len(share), batch_size)]


def mix_seeds(*values: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy's SeedSequence hashing, stable across versions)."""
    words = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the augmentation of dataset sample `index` in `epoch`."""
    return mix_seeds(seed, epoch, index, 1)


class SeededSamples(Dataset):
    """Wraps a dataset so that key (epoch, index) returns dataset[index] with RNG seeded by (seed, epoch, index).

    torch's CPU generator and python's `random` are seeded (numpy's is not). In a worker process the global state is
    the worker's own; in the main process (num_workers=0) both states are saved and restored around the sample.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample_rng_seed = sample_seed(self.seed, epoch, index)
        if get_worker_info() is not None:
            return self._seeded_sample(index, sample_rng_seed)
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                return self._seeded_sample(index, sample_rng_seed)
        finally:
            random.setstate(python_state)

    def _seeded_sample(self, index: int, sample_rng_seed: int):
        # default_generator only: torch.manual_seed would also (lazily) reseed the CUDA generators of the process.
        torch.default_generator.manual_seed(sample_rng_seed)
        random.seed(sample_rng_seed)
        return self.dataset[index]


class _EpochPlan:
    """Batch sampler whose content is set per epoch, so one DataLoader (and its persistent workers) serves all epochs."""

    def __init__(self, loader: "MultiCropLoader"):
        self.loader = loader
        self.epoch, self.start_step = 0, 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch  # read now: the DataLoader asks for this iterator when its own iteration starts
        batches = self.loader.batches(epoch)[self.start_step:]
        return iter([[(epoch, index) for index in batch] for batch in batches])

    def __len__(self) -> int:
        return len(self.loader) - self.start_step


def collate_multicrop(samples: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[(crops, label)] * B -> (list of crop batches [B, 3, H, W], labels int64 [B])."""
    crops = samples[0][0]
    if not isinstance(crops, (list, tuple)) or not all(isinstance(crop, torch.Tensor) for crop in crops):
        raise TypeError("MultiCropLoader needs a dataset transform that returns a list of tensors (one per crop), "
                        f"got {type(crops).__name__}; use fastdino.data.DataAugmentationDINO")
    # default_collate stacks into shared memory inside workers, saving one copy of every batch.
    crop_batches, labels = default_collate([(list(sample_crops), label) for sample_crops, label in samples])
    return crop_batches, labels


class MultiCropLoader:
    """Multi-crop training batches for one rank: `for crops, labels in loader.epoch_iter(epoch, start_step)`.

    `dataset[i]` must return (list of crop tensors, label), e.g. ImageFolderDataset(root, DataAugmentationDINO()).
    `len(loader)` is the number of steps per epoch on this rank; `batches(epoch)` the index plan (see epoch_batches).
    One epoch_iter at a time: starting a new one abandons the previous one.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, pin_memory: bool | None = None,
                 prefetch_factor: int = 2, persistent_workers: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        num_samples = self.num_images = len(dataset)
        self.num_classes = len(getattr(dataset, "classes", ()))
        if drop_last and num_samples < batch_size * world_size:
            raise ValueError(f"the dataset has {num_samples} images, fewer than one global batch "
                             f"(batch_size {batch_size} x world_size {world_size}); use a smaller batch size")
        if num_samples == 0:
            raise ValueError("the dataset is empty")
        self._steps = len(self.batches(0))
        self._plan = _EpochPlan(self)
        pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        worker_options = dict(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers) \
            if num_workers > 0 else {}
        # Its own generator: DataLoader otherwise draws the workers' base seed from the global one at every epoch.
        self._loader = DataLoader(SeededSamples(dataset, seed), batch_sampler=self._plan, num_workers=num_workers,
                                  collate_fn=collate_multicrop, pin_memory=pin_memory,
                                  generator=torch.Generator().manual_seed(mix_seeds(seed, rank)), **worker_options)

    def __len__(self) -> int:
        return self._steps

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's dataset indices, batch by batch, for `epoch`."""
        return epoch_batches(len(self.dataset), self.batch_size, self.seed, epoch, self.rank, self.world_size,
                             self.drop_last)

    def epoch_iter(self, epoch: int, start_step: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Yield (crops: list of [B, 3, H, W] float32, labels: int64 [B]) for steps start_step .. len(self) - 1."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= self._steps:
            raise ValueError(f"start_step must be in [0, {self._steps}] (steps per epoch), got {start_step}")
        self._plan.epoch, self._plan.start_step = epoch, start_step
        yield from self._loader
