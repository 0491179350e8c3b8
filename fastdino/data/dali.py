"""DINO multi-crop batches from an NVIDIA DALI pipeline: decode each image once (nvJPEG on a GPU), crop and augment.

Drop-in for `MultiCropLoader`: `len(loader)` steps per epoch on this rank, `loader.epoch_iter(epoch, start_step)`
yields `(crops: list of [B, 3, H, W], labels: int64 [B])`, two global crops first. What the crops get is a
`recipe.MultiCropRecipe`; the graph is in `dali_pipeline.py`, the host-side draws it reads in `dali_draws.py`.

Order, sharding, determinism, resume
- Folder datasets use `torch_loader.epoch_batches`: the same per-epoch permutation and strided rank shares as
  MultiCropLoader (each image at most once per epoch across ranks with drop_last; at least once without). The reader
  gets this rank's file list in that order, so no DALI shuffle buffer is involved.
- Augmentation: the graph draws nothing. Every random number of a sample is drawn on the host from a generator
  seeded with `sample_seed(seed, epoch, index)` (the torchvision loader's rule; `dali_draws.draw_augmentations`)
  and fed to the graph with the encoded file. A sample's crops are a function of (seed, epoch, index) alone, not of
  its batch, rank, batch size or starting step, so a mid-epoch resume (start_step > 0) replays the remaining steps
  exactly: the same images with the same augmentation. (The torchvision loader consumes its generator differently:
  the two loaders cut different crops of a sample, from the same distribution.) The draws cost about 50 us per
  sample (seeding included), on the thread that runs the pipeline.
- WebDataset shards: DALI's reader splits the samples into `world_size` contiguous shards (rank r reads shard
  (r + epoch) mod world_size, so data moves between ranks across epochs) and shuffles within a buffer of
  `initial_fill` samples: write shards in shuffled order. Index files are required: `make_webdataset_index`. A
  sample's draws are keyed by its position in this rank's stream. The reader cannot seek: a mid-epoch resume reads
  the stream from its start, so it sees the epoch's first len - start_step batches again (augmented as before), not
  the remaining ones.
- Prefetching: DALI runs `prefetch` batches ahead on its own threads. DALI reuses its output buffers, so every batch
  is copied into fresh torch tensors before the next one is requested.

Semantics against the torchvision reference (`augment.DataAugmentationDINO`, PIL images), checked in
tests/test_dali_fidelity.py and tests/test_dali.py
- Crop windows: RandomResizedCrop.get_params's rule applied to the drawn numbers (its attempts, then the central
  fallback; w and h are rounded half up where torchvision rounds half to even, a difference of probability zero).
- After the resize every step is PIL's own arithmetic, bit for bit: ColorJitter (brightness, contrast and
  saturation as ImageEnhance's float32 blends truncated to uint8, hue as torchvision's adjust_hue through PIL's uint8
  HSV with the hue wrapping around, in torchvision's random order of the four), grayscale (PIL's integer luma),
  PIL's GaussianBlur (three extended box passes per axis with its fixed-point rounding), solarization, flip. Verified on all 2**24 colours (grayscale, hue, solarization), per drawn sigma (blur), and end
  to end: crops of photos cut at their native size (no resampling) equal torchvision's functional ops applied with
  the same draws, on every pixel of every crop.
- What remains different is the resize: DALI's antialiased bicubic is not PIL's. Against PIL's resized crop of the
  same window, on the four bundled photos: 224/96 px crops of the full photos, mean |difference| 0.17 grey levels,
  15 % of pixels differ, 0.05-0.2 % by more than 2 (at most 24), mean |Laplacian| 0.2-0.4 % lower; 32/16 px crops of
  96 px photos, 0.36 levels, 24 %, 2.4 %, 0.5 % higher. The later steps carry that difference along and add none.
  Two-sample KS tests on 4,000 crops of photos (per-crop mean, std, hue, saturation and sharpness, the change of
  each from the plain crop, crop area and aspect ratio) find no difference beyond the noise floor of two torchvision
  runs.
- Exactness is checked on CPU DALI. The GPU graph runs the same operators, each rounding its own result (no fused
  multiply-adds across operators), so it should be exact too; `pytest -m gpu` checks it on a GPU.
- Output dtype fp32 or fp16; bf16 is produced by a cast after DALI.

Bad files: DALI stops the whole pipeline on a file it cannot decode, so files are checked before the first epoch by
`scan_image_files` (two small reads per file: the format signature, and for JPEG/PNG the end marker that truncated
files lack), in threads, with an optional cache file keyed by (size, mtime) so a million-image folder is scanned
once. Rejected files are left out, counted (`num_rejected`) and named in one warning. A file that passes the check
and still fails to decode ends the epoch with an error naming the batch's files. Grayscale, CMYK and PNG images
decode fine. WebDataset shards are not scanned.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fastdino.data.datasets import DatasetError, find_images
from fastdino.data.recipe import MultiCropRecipe
from fastdino.data.torch_loader import epoch_batches, mix_seeds, sample_seed

logger = logging.getLogger("fastdino.data")

try:
    from nvidia.dali import types as dali_types
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from fastdino.data.dali_draws import draw_augmentations, graph_inputs
    from fastdino.data.dali_pipeline import multicrop_pipeline
    _TORCH_OF_DALI = {dali_types.FLOAT: torch.float32, dali_types.FLOAT16: torch.float16,
                      dali_types.INT32: torch.int32, dali_types.INT64: torch.int64, dali_types.UINT8: torch.uint8}
    DALI_IMPORT_ERROR: str | None = None
except ImportError as error:  # the torchvision MultiCropLoader is the fallback
    DALI_IMPORT_ERROR = f"{type(error).__name__}: {error}"


# File signatures of the formats DALI decodes (nvImageCodec). GIF is not among them.
_SIGNATURES = {
    "jpeg": (b"\xff\xd8\xff",),
    "png": (b"\x89PNG\r\n\x1a\n",),
    "bmp": (b"BM",),
    "tiff": (b"II*\x00", b"MM\x00*"),
    "jpeg2000": (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"),
    "pnm": (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"),
}
_TAIL_BYTES = 1024  # end markers are searched for here; some writers pad after them


def check_image_file(path: str) -> str | None:
    """None when `path` looks decodable by DALI, else the reason: empty, unknown format, or truncated JPEG/PNG."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(16)
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read(_TAIL_BYTES)
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    if size == 0:
        return "empty file"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    kind = next((name for name, magics in _SIGNATURES.items() if head.startswith(magics)), None)
    if kind is None:
        return "not an image format DALI decodes (JPEG, PNG, BMP, TIFF, WebP, JPEG 2000, PNM)"
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if kind == "png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def scan_image_files(paths: Sequence[str], cache_file: str | Path | None = None,
                     num_threads: int = 16) -> dict[str, str]:
    """{path: reason} for the files of `paths` that DALI could not decode (see check_image_file).

    With `cache_file`, verdicts are stored as JSON keyed by path with (size, mtime_ns) and reused while a file is
    unchanged, so only new or modified files are read again.
    """
    cache: dict[str, list] = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except (OSError, ValueError):
            logger.warning("ignoring unreadable image-scan cache %s", cache_file)

    def verdict(path: str) -> tuple[str, list]:
        try:
            stat = os.stat(path)
        except OSError as error:
            return path, [-1, -1, f"unreadable ({error.strerror or error})"]
        known = cache.get(path)
        if known is not None and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return path, known
        return path, [stat.st_size, stat.st_mtime_ns, check_image_file(path)]

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        results = dict(pool.map(verdict, paths, chunksize=256))
    if cache_file is not None:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(f"{cache_file}.tmp")
        temporary.write_text(json.dumps(results))
        temporary.replace(cache_file)
    return {path: entry[2] for path, entry in results.items() if entry[2] is not None}


def check_loader_settings(batch_size: int, num_threads: int, prefetch: int, seed: int, rank: int,
                          world_size: int) -> None:
    """ValueError naming the first bad loader setting (shared by the on-device loaders)."""
    if batch_size <= 0 or num_threads <= 0 or prefetch <= 0:
        raise ValueError(f"batch_size, num_threads and prefetch must be > 0, got {batch_size}, {num_threads}, "
                         f"{prefetch}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def decodable_samples(source, scan_cache: str | Path | None = None, num_threads: int = 16,
                      who: str = "loader") -> tuple[list[tuple[str, int]], int]:
    """(samples, number left out): the (path, label) pairs of `source` (a folder, a list of pairs, or anything with
    `.samples`) that pass `scan_image_files`; the others are named in one warning. DatasetError when none is left."""
    if isinstance(source, (str, Path)):
        samples = find_images(source)[0]
    else:
        samples = [(str(path), int(label)) for path, label in getattr(source, "samples", source)]
    if not samples:
        raise DatasetError("the dataset holds no images")
    rejected = scan_image_files([path for path, _ in samples], scan_cache, num_threads=num_threads)
    if rejected:
        listing = "; ".join(f"{path} ({reason})" for path, reason in list(rejected.items())[:20])
        more = f"; and {len(rejected) - 20} more" if len(rejected) > 20 else ""
        logger.warning("%s: leaving out %d of %d image files that cannot be decoded: %s%s",
                       who, len(rejected), len(samples), listing, more)
        samples = [(path, label) for path, label in samples if path not in rejected]
    if not samples:
        raise DatasetError(f"none of the {len(rejected)} image files can be decoded")
    return samples, len(rejected)


def make_webdataset_index(tar_path: str | Path, index_path: str | Path | None = None) -> Path:
    """Write the index file that `fn.readers.webdataset` needs for a tar shard (DALI's `wds2idx` tool); returns it.

    Default index path: the shard's path with `.idx` in place of `.tar`. Same as running `wds2idx shard.tar`.
    """
    from wds2idx import IndexCreator  # ships with nvidia-dali

    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(f"WebDataset shard {str(tar_path)!r} does not exist")
    index_path = Path(index_path) if index_path is not None else tar_path.with_suffix(".idx")
    with IndexCreator(str(tar_path), str(index_path), verbose=False) as creator:
        creator.create_index()
    return index_path


@dataclass(frozen=True)
class WebDatasetShards:
    """WebDataset tar shards (`<key>.jpg` + optional `<key>.cls` text label) and their DALI index files.

    index_paths default to each shard's path with `.idx` in place of `.tar` (see make_webdataset_index).
    """
    paths: tuple[str, ...]
    index_paths: tuple[str, ...] | None = None
    image_extensions: str = "jpg;jpeg;png;webp"
    initial_fill: int = 4096

    def indexes(self) -> list[str]:
        indexes = list(self.index_paths) if self.index_paths else [str(Path(p).with_suffix(".idx")) for p in self.paths]
        missing = [index for index in indexes if not Path(index).is_file()]
        if missing:
            raise FileNotFoundError(f"WebDataset index files missing: {missing[:5]}; create them with "
                                    "fastdino.data.dali.make_webdataset_index(shard) or `wds2idx shard.tar`")
        return indexes

    def num_samples(self) -> int:
        """Samples in all shards, from the first line of each index file ('v1.2 <count>')."""
        return sum(int(Path(index).read_text().split(maxsplit=2)[1]) for index in self.indexes())


def _dali_dtype(dtype: torch.dtype):
    """DALI output type for a training dtype: bf16 has no DALI type, so fp16 is produced and cast afterwards."""
    if dtype == torch.float32:
        return dali_types.FLOAT
    if dtype in (torch.float16, torch.bfloat16):
        return dali_types.FLOAT16
    raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")


class DaliMultiCropLoader:
    """Multi-crop training batches from DALI for one rank: `for crops, labels in loader.epoch_iter(epoch)`.

    source: a dataset folder (find_images layouts), a list of (path, label), an object with `.samples` such as
    ImageFolderDataset, or WebDatasetShards. device: "auto" (CUDA when present), "cpu" or "cuda"; on CUDA the
    images are decoded by nvJPEG ("mixed") and crops are CUDA tensors with no host round trip. dtype: of the crops.
    num_threads: DALI CPU threads. scan_cache: file in which the bad-file scan of a folder dataset is kept.
    recipe: the multi-crop recipe (default: the paper's).
    """

    def __init__(self, source, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, *,
                 recipe: MultiCropRecipe = MultiCropRecipe(),
                 device: str | torch.device = "auto", dtype: torch.dtype = torch.float32, num_threads: int = 4,
                 prefetch: int = 2, scan_cache: str | Path | None = None):
        if DALI_IMPORT_ERROR is not None:
            raise ImportError(f"nvidia.dali is not usable ({DALI_IMPORT_ERROR}); install nvidia-dali-cuda130 or use "
                              "the torchvision loader (data.loader=torch)")
        check_loader_settings(batch_size, num_threads, prefetch, seed, rank, world_size)
        if isinstance(device, torch.device):  # the trainer passes its device
            device = device.type
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        self.recipe = recipe
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.device, self.dtype = drop_last, device, dtype
        self._crop_dtype = _dali_dtype(dtype)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.num_rejected = 0
        if isinstance(source, WebDatasetShards):
            self.shards, self.samples = source, None
            num_samples = source.num_samples()
        else:
            self.shards = None
            self.samples, self.num_rejected = decodable_samples(source, scan_cache, who="DALI loader")
            num_samples = len(self.samples)
        self.num_images = num_samples
        self.num_classes = None if self.samples is None else len({label for _, label in self.samples if label >= 0})
        if drop_last and num_samples < batch_size * world_size:
            raise ValueError(f"the dataset has {num_samples} usable images, fewer than one global batch "
                             f"(batch_size {batch_size} x world_size {world_size}); use a smaller batch size")
        if self.samples is not None:
            self._steps = len(epoch_batches(num_samples, batch_size, seed, 0, rank, world_size, drop_last))
        else:  # DALI's smallest shard holds num_samples // world_size samples; partial batches are always dropped
            self._steps = num_samples // world_size // batch_size

    def __len__(self) -> int:
        return self._steps

    def _pipeline(self, epoch: int, batches: list[list[int]] | None, return_params: bool):
        if self.samples is not None:
            order = [index for batch in batches for index in batch]
            # a smaller last batch (drop_last=False) is padded to the fixed DALI batch size and trimmed afterwards
            order += [order[i % len(order)] for i in range(-len(order) % self.batch_size)]
            reader = dict(kind="file", files=[self.samples[i][0] for i in order],
                          labels=[self.samples[i][1] for i in order])
            keys = order
        else:
            reader = dict(kind="webdataset", paths=list(self.shards.paths), index_paths=self.shards.indexes(),
                          ext=[self.shards.image_extensions, "cls"], missing_component_behavior="empty",
                          random_shuffle=True, initial_fill=self.shards.initial_fill,
                          seed=mix_seeds(self.seed, epoch, 7) % 2**31, num_shards=self.world_size,
                          shard_id=(self.rank + epoch) % self.world_size)
            keys = None

        def draw_source(iteration: int) -> dict:
            """The augmentation draws of the samples the reader yields at `iteration` (the reader loops, and so
            do the keys when DALI prefetches past the last batch)."""
            positions = range(iteration * self.batch_size, (iteration + 1) * self.batch_size)
            if keys is not None:
                indices = [keys[position % len(keys)] for position in positions]
            else:  # a WebDataset sample is known by its position in this rank's stream
                indices = [position * self.world_size + self.rank for position in positions]
            seeds = [sample_seed(self.seed, epoch, index) for index in indices]
            return graph_inputs(self.recipe, draw_augmentations(self.recipe, seeds))

        on_gpu = self.device == "cuda"
        pipe = multicrop_pipeline(reader=reader, recipe=self.recipe, decode_device="mixed" if on_gpu else "cpu",
                                  crop_dtype=self._crop_dtype, draw_source=draw_source, return_params=return_params,
                                  batch_size=self.batch_size, num_threads=self.num_threads,
                                  device_id=torch.cuda.current_device() if on_gpu else None,
                                  seed=mix_seeds(self.seed, epoch, 5) % 2**31, prefetch_queue_depth=self.prefetch)
        pipe.build()
        return pipe

    def _to_torch(self, batch, count: int, dtype: torch.dtype) -> torch.Tensor:
        """Copy a DALI batch (buffers are reused by DALI) into a new torch tensor; first `count` samples."""
        dense = batch.as_tensor()
        on_gpu = isinstance(batch, TensorListGPU)
        out = torch.empty(dense.shape(), dtype=_TORCH_OF_DALI[dense.dtype],
                          device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream() if on_gpu else None)
        return out[:count].to(dtype)

    def _labels(self, batch, count: int) -> torch.Tensor:
        if self.samples is not None:
            return self._to_torch(batch, count, torch.int64).reshape(count)
        # WebDataset: `.cls` holds the label as text; missing -> empty -> -1
        values = [batch.at(i).tobytes().strip() for i in range(count)]
        return torch.tensor([int(value) if value else -1 for value in values], dtype=torch.int64)

    def _failure_message(self, error: RuntimeError, epoch: int, step: int, batch: list[int]) -> str:
        detail = next((line for line in str(error).splitlines() if "rror" in line and "pipeline" not in line),
                      str(error).splitlines()[0] if str(error) else type(error).__name__)
        files = sorted({self.samples[i][0] for i in batch}) if batch else []
        listing = f" Files of this batch: {files[:10]}{' ...' if len(files) > 10 else ''}." if files else ""
        return (f"DALI pipeline failed at epoch {epoch} step {step}: {detail.strip()}.{listing} A file that passes "
                "the header/end-marker pre-scan but cannot be decoded must be removed from the dataset.")

    def _iterate(self, epoch: int, start_step: int, return_params: bool):
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= self._steps:
            raise ValueError(f"start_step must be in [0, {self._steps}] (steps per epoch), got {start_step}")
        if self.samples is not None:
            batches = epoch_batches(len(self.samples), self.batch_size, self.seed, epoch, self.rank,
                                    self.world_size, self.drop_last)[start_step:]
            sizes = [len(batch) for batch in batches]
        else:
            batches, sizes = None, [self.batch_size] * (self._steps - start_step)
        if not sizes:
            return
        pipe = self._pipeline(epoch, batches, return_params)
        per_slot = 5 if return_params else 1
        try:
            for step, count in enumerate(sizes):
                try:
                    outputs = pipe.run()
                except RuntimeError as error:
                    raise RuntimeError(self._failure_message(error, epoch, start_step + step,
                                                             batches[step] if batches is not None else [])) from error
                labels = self._labels(outputs[0], count)
                slots = [outputs[1 + per_slot * s: 1 + per_slot * (s + 1)] for s in range(self.recipe.num_crops)]
                crops = [self._to_torch(slot[0], count, self.dtype) for slot in slots]
                if not return_params:
                    yield crops, labels
                    continue
                params = [dict(anchor=self._to_torch(s[1], count, torch.int64),
                               window=self._to_torch(s[2], count, torch.int64),
                               flip=self._to_torch(s[3], count, torch.int64).reshape(count),
                               blur_sigma=self._to_torch(s[4], count, torch.float32).reshape(count))
                          for s in slots]
                yield crops, labels, params
        finally:
            del pipe

    def epoch_iter(self, epoch: int, start_step: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Yield (crops: list of 2 + N tensors [B, 3, S, S] in self.dtype on self.device, labels: int64 [B]).

        Steps start_step .. len(self) - 1 of `epoch`; see the module docstring for what a mid-epoch start repeats.
        """
        yield from self._iterate(epoch, start_step, return_params=False)

    def epoch_iter_with_params(self, epoch: int, start_step: int = 0):
        """As epoch_iter, plus per crop slot a dict of the drawn parameters (for tests and diagnostics):
        anchor [B, 2] (y, x), window [B, 2] (h, w) in source pixels, flip [B] (0/1), blur_sigma [B] (0: no blur)."""
        yield from self._iterate(epoch, start_step, return_params=True)
