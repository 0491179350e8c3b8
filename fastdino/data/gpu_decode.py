"""DINO multi-crop batches decoded by nvJPEG through torchvision, augmented on the GPU: for GPUs without DALI.

Drop-in for `MultiCropLoader` and `DaliMultiCropLoader`: `len(loader)` steps per epoch on this rank,
`loader.epoch_iter(epoch, start_step)` yields `(crops: list of [B, 3, S, S], labels: int64 [B])`, two global crops
first. A CPU process would have to decode and augment ~10 crops per image; here the CPU only reads file bytes.

Pipeline, per batch
- Order and sharding: `torch_loader.epoch_batches` (the same per-epoch permutation and rank shares as the other
  loaders, so each image is seen at most once per epoch across ranks with drop_last).
- Bytes are read by a thread pool, `prefetch` batches ahead. JPEGs are decoded in one batched
  `torchvision.io.decode_jpeg(..., device="cuda")` call; other formats (PNG, WebP, ...) and JPEGs the GPU decoder
  rejects (CMYK, ...) are decoded on the CPU (`decode_on_cpu`) and copied over; such files are counted
  (`num_cpu_decoded`) and named once in a warning. Files that no decoder reads are replaced by another image of the
  same batch (`num_failed`, warned); files failing the header/end-marker pre-scan of `dali.scan_image_files` are
  left out before the first epoch (`num_rejected`).
- Augmentation (`gpu_decode_augment.augment_batch`), per crop slot of the recipe (`recipe.MultiCropRecipe`): per
  image a bicubic antialiased resized crop, then batched over the slot with per-image parameters: flip, colour
  jitter in the image's random order, grayscale, Gaussian blur, solarization, normalization, cast to `dtype`.
- Decode and augmentation run in a producer thread on its own CUDA stream, so they overlap the training step; the
  consumer's stream waits on an event per batch. The producer synchronizes its stream before every batched decode:
  nvJPEG's hardware decoder (seen on H100) writes its output before earlier work queued on the stream has run, which
  can overwrite memory that work still reads (pytorch/vision#9606, meta-pytorch/torchcodec#1634).

Randomness (`gpu_decode_draws`): every image draws its parameters from its own torch.Generator seeded with
`sample_seed(seed, epoch, index)`, in the same order and with the same calls as the torchvision transforms of
`augment.DataAugmentationDINO` under `MultiCropLoader`. Same seed, recipe and image: same crop windows, flips, jitter
factors and order, grayscale, blur sigmas and solarization as the CPU loader, on any rank count or thread count,
and exactly again after a mid-epoch resume. Pixel differences against the CPU loader come from the operations:
float instead of uint8 intermediates, torchvision's tensor hue instead of PIL's, an exact Gaussian (window
2*ceil(3 sigma)+1, reflect padding) instead of PIL's box approximation: about 1-2 levels of 255 in mean absolute
difference on smooth test images, where independent draws differ by ~60 (tests/test_gpu_decode.py).

device="cpu" runs the same pipeline with CPU decoding (tests, machines without a GPU). labels stay on the CPU.
"""
from __future__ import annotations

import logging
import queue
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from fastdino.data.datasets import load_rgb
from fastdino.data.gpu_decode_augment import augment_batch
from fastdino.data.gpu_decode_draws import draw_image_params
from fastdino.data.recipe import MultiCropRecipe
from fastdino.data.torch_loader import epoch_batches, sample_seed

logger = logging.getLogger("fastdino.data")

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work, and TorchCodec is not a dependency.
warnings.filterwarnings("ignore", message=r".*TorchCodec.*", category=DeprecationWarning, module=r"torchvision\.io")

_JPEG_SIGNATURE = b"\xff\xd8\xff"


@dataclass
class _LoadedFile:
    """A file after the reading threads: JPEG bytes still to decode, or an image already decoded on the CPU."""

    path: str
    encoded: torch.Tensor | None = None  # uint8 [num_bytes]
    image: torch.Tensor | None = None  # uint8 [3, H, W] on the CPU
    cpu_fallback: bool = False  # decoded on the CPU although the batch decode is on the GPU: not a JPEG, or rejected
    error: str | None = None


def decode_on_cpu(data: torch.Tensor, path: str) -> torch.Tensor:
    """uint8 [3, H, W] RGB from a file's bytes: JPEGs by torchvision's libjpeg decoder (same pixels as PIL), every
    other file, and JPEGs it rejects, by datasets.load_rgb, the mode rule all loaders share (torchvision's
    decode_image would return uint16 for 16-bit PNGs). Raises OSError / ValueError when neither decodes the file."""
    if bytes(data[:3].tolist()) == _JPEG_SIGNATURE:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass  # e.g. a JPEG variant libjpeg-turbo rejects: PIL may still read it
    return torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1).contiguous()


def _load_file(path: str, decode_jpeg_here: bool) -> _LoadedFile:
    """Read a file; decode it now unless it is a JPEG left for the batched (GPU) decode."""
    try:
        with open(path, "rb") as handle:
            data = torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)
    except OSError as error:
        return _LoadedFile(path, error=f"unreadable ({error.strerror or error})")
    is_jpeg = bytes(data[:3].tolist()) == _JPEG_SIGNATURE
    if is_jpeg and not decode_jpeg_here:
        return _LoadedFile(path, encoded=data)
    try:
        return _LoadedFile(path, image=decode_on_cpu(data, path), cpu_fallback=not is_jpeg)
    except Exception as error:  # every decoder has its own error types; the batch goes on without this file
        return _LoadedFile(path, error=f"{type(error).__name__}: {error}")


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or a CUDA device, got {str(device)!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class _ProducerFailed:
    """Carries an exception from the producer thread to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


class GpuDecodeMultiCropLoader:
    """Multi-crop training batches decoded and augmented on the device: `for crops, labels in
    loader.epoch_iter(epoch, start_step)`.

    source: a dataset folder (find_images layouts), a list of (path, label), or an object with `.samples` such as
    ImageFolderDataset. device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; crops come out there in
    `dtype` (float32, float16 or bfloat16), labels on the CPU. num_threads: file-reading threads (they also decode
    everything on device="cpu"). prefetch: batches read and produced ahead. scan_cache: see dali.scan_image_files.
    recipe: the multi-crop recipe (default: the paper's).
    One epoch_iter at a time: starting a new one abandons the previous one.
    """

    def __init__(self, source, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, *,
                 recipe: MultiCropRecipe = MultiCropRecipe(),
                 device: str | torch.device = "auto", dtype: torch.dtype = torch.float32, num_threads: int = 8,
                 prefetch: int = 2, scan_cache: str | Path | None = None):
        from fastdino.data.dali import check_loader_settings, decodable_samples  # importable without DALI itself

        check_loader_settings(batch_size, num_threads, prefetch, seed, rank, world_size)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        self.recipe = recipe
        self.slots = self.recipe.slots()
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.dtype = drop_last, dtype
        self.device = _resolve_device(device)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.num_rejected = 0  # files left out by the pre-scan
        self._cpu_decoded_files: set[str] = set()
        self._failed_files: set[str] = set()
        self.samples, self.num_rejected = decodable_samples(source, scan_cache, self.num_threads, "GPU-decode loader")
        self.num_images = len(self.samples)
        self.num_classes = len({label for _, label in self.samples if label >= 0})
        if drop_last and len(self.samples) < batch_size * world_size:
            raise ValueError(f"the dataset has {len(self.samples)} usable images, fewer than one global batch "
                             f"(batch_size {batch_size} x world_size {world_size}); use a smaller batch size")
        self._steps = len(self.batches(0))

    def __len__(self) -> int:
        return self._steps

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's sample indices, batch by batch, for `epoch` (see torch_loader.epoch_batches)."""
        return epoch_batches(len(self.samples), self.batch_size, self.seed, epoch, self.rank, self.world_size,
                             self.drop_last)

    def epoch_iter(self, epoch: int, start_step: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Yield (crops: list of 2 + N tensors [B, 3, S, S] in self.dtype on self.device, labels: int64 [B] on the
        CPU) for steps start_step .. len(self) - 1 of `epoch`; identical to the same steps of a full epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= self._steps:
            raise ValueError(f"start_step must be in [0, {self._steps}] (steps per epoch), got {start_step}")
        batches = self.batches(epoch)[start_step:]
        if not batches:
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(epoch, batches, ready, stop), daemon=True,
                                    name="fastdino-gpu-decode")
        producer.start()
        try:
            for _ in batches:
                item = ready.get()
                if isinstance(item, _ProducerFailed):
                    raise item.error
                crops, labels, done = item
                if done is not None:  # the crops were made on the producer's stream
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(done)
                    for crop in crops:
                        crop.record_stream(stream)
                yield crops, labels
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            producer.join()

    def _produce(self, epoch: int, batches: list[list[int]], ready: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: read files `prefetch` batches ahead, decode, augment, hand batches over in order."""

        def hand_over(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        on_gpu = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if on_gpu else None
        pool = ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="fastdino-read")
        try:
            with torch.cuda.device(self.device) if on_gpu else nullcontext(), \
                    torch.cuda.stream(stream) if on_gpu else nullcontext():
                reading = deque()
                for batch in batches[:self.prefetch + 1]:
                    reading.append([pool.submit(_load_file, self.samples[i][0], not on_gpu) for i in batch])
                for step, batch in enumerate(batches):
                    if stop.is_set():
                        return
                    loaded = [future.result() for future in reading.popleft()]
                    if step + self.prefetch + 1 < len(batches):
                        reading.append([pool.submit(_load_file, self.samples[i][0], not on_gpu)
                                        for i in batches[step + self.prefetch + 1]])
                    crops, labels = self._make_batch(epoch, batch, loaded)
                    done = None
                    if on_gpu:
                        done = torch.cuda.Event()
                        done.record(stream)
                    if not hand_over((crops, labels, done)):
                        return
        except BaseException as error:  # handed to the consumer, which re-raises it
            hand_over(_ProducerFailed(error))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _make_batch(self, epoch: int, batch: list[int],
                    loaded: list[_LoadedFile]) -> tuple[list[torch.Tensor], torch.Tensor]:
        images = [image.float().div_(255) for image in self._decode(loaded)]  # converted once for all slots
        params = [draw_image_params(image.shape[1], image.shape[2], self.slots, sample_seed(self.seed, epoch, index))
                  for image, index in zip(images, batch)]
        crops = [augment_batch(images, [image_params[s] for image_params in params], slot.size, self.dtype,
                               recipe=self.recipe) for s, slot in enumerate(self.slots)]
        labels = torch.tensor([self.samples[i][1] for i in batch], dtype=torch.int64)
        return crops, labels

    def _decode(self, loaded: list[_LoadedFile]) -> list[torch.Tensor]:
        """uint8 [3, H, W] images on self.device, one per file; undecodable files replaced by the next good one."""
        images: list[torch.Tensor | None] = [None] * len(loaded)
        pending = [b for b, item in enumerate(loaded) if item.encoded is not None]
        if pending:
            for b, image in zip(pending, self._decode_jpegs([loaded[b] for b in pending])):
                images[b] = image
        for b, item in enumerate(loaded):
            if images[b] is None and item.image is not None:
                images[b] = item.image.to(self.device)
        self._note_files(self._cpu_decoded_files, [item.path for item in loaded if item.cpu_fallback],
                         "decoded on the CPU (not a JPEG, or rejected by the GPU JPEG decoder)")
        failed = [b for b, image in enumerate(images) if image is None]
        if failed:
            self._note_files(self._failed_files, [loaded[b].path for b in failed],
                             "could not be decoded and were replaced by another image of their batch",
                             {loaded[b].path: loaded[b].error for b in failed})
            good = [b for b, image in enumerate(images) if image is not None]
            if not good:
                raise RuntimeError(f"no image of a batch could be decoded: {[item.path for item in loaded]}")
            for b in failed:
                images[b] = images[next((g for g in good if g > b), good[0])]
        return images

    def _decode_jpegs(self, items: list[_LoadedFile]) -> list[torch.Tensor | None]:
        """JPEG bytes -> images on the GPU in one batched nvJPEG call. Files it rejects are decoded on the CPU
        (their `image` is set and None is returned in their place) or get an `error`."""
        torch.cuda.current_stream(self.device).synchronize()  # nvJPEG hardware-decoder ordering bug (module doc)
        try:
            return list(decode_jpeg([item.encoded for item in items], mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass  # some file of the batch is not decodable by nvJPEG: find it
        images: list[torch.Tensor | None] = []
        for item in items:
            torch.cuda.current_stream(self.device).synchronize()
            try:
                images.append(decode_jpeg(item.encoded, mode=ImageReadMode.RGB, device=self.device))
                continue
            except RuntimeError:
                images.append(None)
            try:
                item.image, item.cpu_fallback = decode_on_cpu(item.encoded, item.path), True
            except Exception as error:  # every decoder has its own error types
                item.error = f"{type(error).__name__}: {error}"
        return images

    @property
    def num_cpu_decoded(self) -> int:
        """Distinct files decoded on the CPU so far: not JPEG, or rejected by the GPU decoder."""
        return len(self._cpu_decoded_files)

    @property
    def num_failed(self) -> int:
        """Distinct files no decoder could read so far (each replaced by another image of its batch)."""
        return len(self._failed_files)

    @staticmethod
    def _note_files(known: set[str], paths: list[str], what: str, reasons: dict[str, str] | None = None) -> None:
        """Add `paths` to `known`; one warning naming the ones not seen before."""
        new = sorted(set(paths) - known)
        if not new:
            return
        known.update(new)
        named = [f"{path} ({reasons[path]})" if reasons else path for path in new]
        listing = "; ".join(named[:20]) + (f"; and {len(new) - 20} more" if len(new) > 20 else "")
        logger.warning("GPU-decode loader: %d image file(s) %s: %s", len(new), what, listing)
