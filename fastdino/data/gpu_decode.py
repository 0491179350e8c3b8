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
- Augmentation (`augment_batch`): per image a bicubic antialiased resized crop, then batched over the slot with
  per-image parameters: flip, colour jitter in the image's random order, grayscale, Gaussian blur, solarization,
  ImageNet normalization, cast to `dtype`.
- Decode and augmentation run in a producer thread on its own CUDA stream, so they overlap the training step; the
  consumer's stream waits on an event per batch. The producer synchronizes its stream before every batched decode:
  nvJPEG's hardware decoder (seen on H100) writes its output before earlier work queued on the stream has run, which
  can overwrite memory that work still reads (pytorch/vision#9606, meta-pytorch/torchcodec#1634).

Randomness: every image draws its parameters from its own torch.Generator seeded with
`sample_seed(seed, epoch, index)`, in the same order and with the same calls as the torchvision transforms of
`augment.DataAugmentationDINO` under `MultiCropLoader`. Same seed, same image: same crop windows, flips, jitter
factors and order, grayscale, blur sigmas and solarization as the CPU loader, on any rank count or thread count,
and exactly again after a mid-epoch resume. Pixel differences against the CPU loader come from the operations:
float instead of uint8 intermediates, torchvision's tensor hue instead of PIL's, an exact Gaussian (window
2*ceil(3 sigma)+1, reflect padding) instead of PIL's box approximation: about 1-2 levels of 255 in mean absolute
difference on smooth test images, where independent draws differ by ~60 (tests/test_gpu_decode.py).

device="cpu" runs the same pipeline with CPU decoding (tests, machines without a GPU). labels stay on the CPU.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from fastdino.data.augment import IMAGENET_MEAN, IMAGENET_STD, check_multicrop_settings
from fastdino.data.datasets import load_rgb
from fastdino.data.torch_loader import epoch_batches, sample_seed

logger = logging.getLogger("fastdino.data")

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work, and TorchCodec is not a dependency.
warnings.filterwarnings("ignore", message=r".*TorchCodec.*", category=DeprecationWarning, module=r"torchvision\.io")

_JPEG_SIGNATURE = b"\xff\xd8\xff"
_ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
_JITTER_P, _GRAYSCALE_P, _FLIP_P = 0.8, 0.2, 0.5
_BLUR_SIGMA = (0.1, 2.0)
_SOLARIZE_THRESHOLD = 128 / 255
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)  # ColorJitter's operation ids


@dataclass(frozen=True)
class SlotRecipe:
    """One crop slot of the multi-crop recipe: output size, area range, blur and solarization probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


def multicrop_slots(global_crops_scale: tuple[float, float] = (0.4, 1.0),
                    local_crops_scale: tuple[float, float] = (0.05, 0.4), local_crops_number: int = 8,
                    global_crop_size: int = 224, local_crop_size: int = 96) -> list[SlotRecipe]:
    """The DINO slots: global (blur p 1), global (blur p 0.1, solarize p 0.2), then the locals (blur p 0.5)."""
    global_crops_scale, local_crops_scale = check_multicrop_settings(
        global_crops_scale, local_crops_scale, local_crops_number, global_crop_size, local_crop_size
    )
    return [SlotRecipe(int(global_crop_size), global_crops_scale, blur_p=1.0),
            SlotRecipe(int(global_crop_size), global_crops_scale, blur_p=0.1, solarize_p=0.2),
            *[SlotRecipe(int(local_crop_size), local_crops_scale, blur_p=0.5)] * int(local_crops_number)]


@dataclass(frozen=True)
class CropParams:
    """The random choices of one crop of one image.

    window: (top, left, height, width) in source pixels. jitter_order: ColorJitter's operation ids (0 brightness,
    1 contrast, 2 saturation, 3 hue) in application order, or None when the jitter is not applied.
    blur_sigma: 0 when not blurred.
    """

    window: tuple[int, int, int, int]
    flip: bool
    jitter_order: tuple[int, ...] | None
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur_sigma: float
    solarize: bool


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _coin(generator: torch.Generator, p: float) -> bool:
    return bool(torch.rand(1, generator=generator) < p)


def draw_crop_window(height: int, width: int, scale: tuple[float, float],
                     generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w): RandomResizedCrop.get_params (ratio 3/4..4/3) with the same draws, from `generator`."""
    area = height * width
    log_ratio = torch.log(torch.tensor(_ASPECT_RATIO))
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                   generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect ratio
    if in_ratio < min(_ASPECT_RATIO):
        w, h = width, int(round(width / min(_ASPECT_RATIO)))
    elif in_ratio > max(_ASPECT_RATIO):
        h, w = height, int(round(height * max(_ASPECT_RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_jitter(generator: torch.Generator) -> tuple[tuple[int, ...], float, float, float, float]:
    """(order, brightness, contrast, saturation, hue): ColorJitter(0.4, 0.4, 0.2, 0.1).get_params' draws."""
    order = tuple(torch.randperm(4, generator=generator).tolist())
    factors = [_uniform(generator, 1 - _JITTER[name], 1 + _JITTER[name])
               for name in ("brightness", "contrast", "saturation")]
    return (order, *factors, _uniform(generator, -_JITTER["hue"], _JITTER["hue"]))


def draw_crop_params(height: int, width: int, slot: SlotRecipe, generator: torch.Generator) -> CropParams:
    """One crop's choices, drawn in the order DataAugmentationDINO's transforms draw them."""
    window = draw_crop_window(height, width, slot.scale, generator)
    flip = _coin(generator, _FLIP_P)
    jitter = draw_jitter(generator) if not _JITTER_P < torch.rand(1, generator=generator) else None
    grayscale = _coin(generator, _GRAYSCALE_P)
    blur_sigma = _uniform(generator, *_BLUR_SIGMA) if _coin(generator, slot.blur_p) else 0.0
    solarize = _coin(generator, slot.solarize_p) if slot.solarize_p > 0 else False
    order, brightness, contrast, saturation, hue = jitter if jitter is not None else (None, 1.0, 1.0, 1.0, 0.0)
    return CropParams(window, flip, order, brightness, contrast, saturation, hue, grayscale, blur_sigma, solarize)


def draw_image_params(height: int, width: int, slots: Sequence[SlotRecipe], seed: int) -> list[CropParams]:
    """The choices of every slot for one image [height x width], from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [draw_crop_params(height, width, slot, generator) for slot in slots]


def _resized_crop(image: torch.Tensor, window: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 [3, H, W] (0-255) or float (0-1) -> float [1, 3, size, size], bicubic and antialiased (not clamped)."""
    top, left, height, width = window
    region = image[:, top:top + height, left:left + width].unsqueeze(0)
    if not region.is_floating_point():
        region = region.float().div_(255)
    return F.interpolate(region, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(images, num_output_channels=1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = _per_image(ratio)
    return (images * ratio + other * (1 - ratio)).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of float RGB images [B, 3, H, W] in [0, 1] by hue[b] (a fraction of the colour circle)."""
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    red, green, blue = images.unbind(dim=1)
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue6 = torch.where(value == red, (green - blue) / safe_chroma,
                       torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4))
    hue6 = torch.where(chroma > 0, hue6, torch.zeros_like(hue6))
    hue6 = torch.remainder(hue6 + 6 * hue.view(-1, 1, 1), 6.0)
    # HSV -> RGB: channel n takes v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + hue6.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return (value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * ramp)).clamp_(0, 1)


def _jitter_op(op: int, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """ColorJitter's operation `op` on float images [n, 3, H, W] with per-image factors [n] (torchvision semantics)."""
    if op == _BRIGHTNESS:
        return (images * _per_image(factors)).clamp_(0, 1)
    if op == _CONTRAST:
        return _blend(images, _luma(images).mean(dim=(1, 2, 3), keepdim=True), factors)
    if op == _SATURATION:
        return _blend(images, _luma(images), factors)
    return adjust_hue(images, factors)


def _color_jitter(images: torch.Tensor, params: Sequence[CropParams]) -> torch.Tensor:
    """Each image's four jitter operations in its own order: position by position, one batched call per operation
    on the images that take it at that position."""
    factors = torch.tensor([[p.brightness, p.contrast, p.saturation, p.hue] for p in params]).to(images.device)
    for position in range(4):
        for op in range(4):
            chosen = [b for b, p in enumerate(params) if p.jitter_order is not None and p.jitter_order[position] == op]
            if chosen:
                index = torch.tensor(chosen).to(images.device)
                images[index] = _jitter_op(op, images[index], factors[index, op])
    return images


def gaussian_blur(images: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Blur float images [n, 3, H, W] with per-image sigmas (n floats > 0): window 2*ceil(3 sigma)+1, reflect
    padding (torchvision's gaussian_blur for each image), as one grouped separable convolution."""
    n, channels, height, width = images.shape
    half = min(math.ceil(3 * max(sigmas)), height - 1, width - 1)  # from host floats: no device sync
    sigmas = torch.tensor(sigmas, dtype=images.dtype).to(images.device)
    offsets = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    reach = torch.ceil(3 * sigmas).clamp_(max=half).unsqueeze(1)  # each image's own window half-width
    kernels = torch.exp(-0.5 * (offsets / sigmas.unsqueeze(1)) ** 2) * (offsets.abs() <= reach)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [n * 3, K]
    padded = F.pad(images.reshape(1, n * channels, height, width), (half, half, half, half), mode="reflect")
    blurred = F.conv2d(padded, kernels.view(n * channels, 1, 1, -1), groups=n * channels)
    blurred = F.conv2d(blurred, kernels.view(n * channels, 1, -1, 1), groups=n * channels)
    return blurred.view(n, channels, height, width)


def augment_batch(images: Sequence[torch.Tensor], params: Sequence[CropParams], size: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One crop slot for a batch: images [3, H_b, W_b], uint8 (0-255) or float (0-1), all on one device (CPU or
    CUDA), and one CropParams each -> normalized crops [B, 3, size, size] in `dtype` on that device."""
    if len(images) != len(params) or not images:
        raise ValueError(f"need one CropParams per image and at least one image, got {len(images)} images and "
                         f"{len(params)} params")
    crops = torch.cat([_resized_crop(image, p.window, size) for image, p in zip(images, params)]).clamp_(0, 1)
    device = crops.device
    flags = torch.tensor([[p.flip, p.grayscale, p.solarize] for p in params]).to(device)
    flip, grayscale, solarize = (_per_image(flags[:, i]) for i in range(3))
    crops = torch.where(flip, crops.flip(-1), crops)
    if any(p.jitter_order is not None for p in params):
        crops = _color_jitter(crops, params)
    crops = torch.where(grayscale, _luma(crops).expand_as(crops), crops)
    blurred = [b for b, p in enumerate(params) if p.blur_sigma > 0]
    if blurred:
        index = torch.tensor(blurred).to(device)
        crops[index] = gaussian_blur(crops[index], [params[b].blur_sigma for b in blurred])
    crops = torch.where(solarize & (crops >= _SOLARIZE_THRESHOLD), 1 - crops, crops)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((crops - mean) / std).to(dtype)


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
    One epoch_iter at a time: starting a new one abandons the previous one.
    """

    def __init__(self, source, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, *, global_crops_scale: tuple[float, float] = (0.4, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crop_size: int = 224, local_crop_size: int = 96, device: str | torch.device = "auto",
                 dtype: torch.dtype = torch.float32, num_threads: int = 8, prefetch: int = 2,
                 scan_cache: str | Path | None = None):
        from fastdino.data.dali import check_loader_settings, decodable_samples  # importable without DALI itself

        check_loader_settings(batch_size, num_threads, prefetch, seed, rank, world_size)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        self.slots = multicrop_slots(global_crops_scale, local_crops_scale, local_crops_number, global_crop_size,
                                     local_crop_size)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.dtype = drop_last, dtype
        self.device = _resolve_device(device)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.num_rejected = 0  # files left out by the pre-scan
        self._cpu_decoded_files: set[str] = set()
        self._failed_files: set[str] = set()
        self.samples, self.num_rejected = decodable_samples(source, scan_cache, self.num_threads, "GPU-decode loader")
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
        crops = [augment_batch(images, [image_params[s] for image_params in params], slot.size, self.dtype)
                 for s, slot in enumerate(self.slots)]
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
