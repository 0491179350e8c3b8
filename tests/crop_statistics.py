"""Two-sample fidelity tests of a multi-crop path against the torchvision reference (`DataAugmentationDINO`), shared
by the DALI and the fast CPU path's tests: per-crop statistics of crops of real photos, each compared by a KS test
against a threshold calibrated on two independent torchvision runs (the noise floor).
"""
import math
import os

import numpy as np
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms

from fastdino.data import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, ImageFolderDataset, MultiCropLoader
from fastdino.data.demo_dataset import demo_attention_images

STATISTICS_CROPS = dict(global_crop_size=32, local_crop_size=16, local_crops_number=8)
PHOTO_SIDE, COPIES = 96, 100  # distribution test: 4 photos x 100 copies, 10 crops each


def save(array: np.ndarray, path, **options) -> str:
    Image.fromarray(array.astype(np.uint8)).save(path, **options)
    return str(path)


def pixels(crop: torch.Tensor) -> torch.Tensor:
    """Normalized crops [B, 3, H, W] back to 0..255 floats."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (crop.float() * std + mean) * 255.0


def uint8_crops(crops: torch.Tensor) -> np.ndarray:
    """Crops [B, 3, S, S] (uint8, or normalized floats turned back into the uint8 pixels they were made from) as
    uint8 [B, S, S, 3]."""
    if crops.dtype != torch.uint8:
        crops = pixels(crops.cpu()).round().clamp(0, 255).to(torch.uint8)
    return crops.permute(0, 2, 3, 1).numpy()


def write_photo_folder(root, side: int = PHOTO_SIDE, suffix: str = ".png", **options):
    """The four bundled photos, longer side `side`, COPIES hard links of each in its own class folder."""
    for name, image in demo_attention_images():
        scale = side / max(image.size)
        folder = root / name
        folder.mkdir()
        first = save(np.asarray(image.resize((round(image.width * scale), round(image.height * scale)),
                                             Image.LANCZOS)), folder / f"0000{suffix}", **options)
        for copy in range(1, COPIES):
            os.link(first, folder / f"{copy:04d}{suffix}")
    return root


def crop_statistics(crops: np.ndarray) -> dict[str, np.ndarray]:
    """Per-crop mean, std, dominant hue (circular mean of PIL's HSV hue weighted by saturation, radians), mean
    saturation and sharpness (mean |Laplacian| of the luma) of uint8 crops [N, S, S, 3]."""
    values = crops.astype(np.float64)
    count, size = crops.shape[:2]
    hsv = np.asarray(Image.fromarray(crops.reshape(count * size, size, 3)).convert("HSV"), dtype=np.float64)
    hsv = hsv.reshape(crops.shape)
    angle = hsv[..., 0] * (2 * math.pi / 256)
    weight = hsv[..., 1]
    luma = values @ np.array([0.299, 0.587, 0.114])
    laplacian = (4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2]
                 - luma[:, 1:-1, 2:])
    return {"mean": values.mean((1, 2, 3)), "std": values.std((1, 2, 3)),
            "hue": np.arctan2((np.sin(angle) * weight).sum((1, 2)), (np.cos(angle) * weight).sum((1, 2))),
            "saturation": hsv[..., 1].mean((1, 2)), "sharpness": np.abs(laplacian).mean((1, 2))}


def statistics(run: tuple[list[np.ndarray], list[np.ndarray], np.ndarray]) -> dict:
    """{slot group: {statistic: values}} of one run (crops, plain crops, windows, photo areas; see the runs).

    The per-crop statistics of the crops, then how far each moved from the plain crop of the same window (the
    pipeline's own resized crop with no other effect: the photos' content cancels and the augmentation shows), and
    the window's area fraction and log aspect ratio.
    """
    crops, plain, windows = run
    out = {}
    for group, slots in (("global 0", [0]), ("global 1", [1]), ("local", range(2, len(crops)))):
        augmented = crop_statistics(np.concatenate([crops[slot] for slot in slots]))
        reference = crop_statistics(np.concatenate([plain[slot] for slot in slots]))
        moved = {f"{name} change": augmented[name] - reference[name] for name in augmented}
        moved["hue change"] = np.angle(np.exp(1j * moved["hue change"]))  # wrapped into (-pi, pi]
        h, w, area = np.concatenate([windows[:, slot] for slot in slots]).T.astype(np.float64)
        out[group] = {**augmented, **moved, "area": h * w / area, "aspect": np.log(w / h)}
    return out


def loader_run(folder, seed: int, monkeypatch, transform=None
               ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Epoch 0 of MultiCropLoader with `transform` (default: the torchvision reference): crops per slot
    [N, S, S, 3], the plain crops of their windows (the path's own resized crop with no other effect: PIL's bicubic
    resized crop of the photo, what RandomResizedCrop gives, or the fast path's, recorded as it makes them) and
    windows [N, slots, (h, w, photo area)], recorded where the transform draws them (RandomResizedCrop.get_params,
    or `fast_augment.draw_crop_params`)."""
    from fastdino.data import fast_augment

    windows, resized = [], []
    get_params, draw_crop_params = transforms.RandomResizedCrop.get_params, fast_augment.draw_crop_params
    resized_crop = fast_augment._resized_crop

    def recording(image, scale, ratio):
        windows.append(((image.height, image.width), *get_params(image, scale, ratio)))
        return windows[-1][1:]

    def recording_draw(height, width, slot, generator):
        params = draw_crop_params(height, width, slot, generator)
        windows.append(((height, width), *params.window))
        return params

    def recording_resize(*args):
        resized.append(resized_crop(*args))
        return resized[-1]

    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(recording))
    monkeypatch.setattr(fast_augment, "draw_crop_params", recording_draw)
    monkeypatch.setattr(fast_augment, "_resized_crop", recording_resize)
    dataset = ImageFolderDataset(folder, transform or DataAugmentationDINO(**STATISTICS_CROPS))
    loader = MultiCropLoader(dataset, 64, num_workers=0, seed=seed, drop_last=False)
    batches, labels = [], []
    for crops, batch_labels in loader.epoch_iter(0):
        batches.append([uint8_crops(crop) for crop in crops])
        labels += batch_labels.tolist()
    monkeypatch.undo()
    slots = len(batches[0])
    crops = [np.concatenate([batch[slot] for batch in batches]) for slot in range(slots)]
    if resized:
        plain = [np.stack([np.asarray(crop) for crop in resized[slot::slots]]) for slot in range(slots)]
    else:
        photos = [Image.open(dataset.samples[label * COPIES][0]).convert("RGB")
                  for label in range(len(dataset.classes))]
        plain = [np.stack([np.asarray(photos[labels[n]].crop((j, i, j + w, i + h)).resize(crops[slot].shape[1:3],
                                                                                              Image.BICUBIC))
                           for n, (_, i, j, h, w) in enumerate(windows[slot::slots])]) for slot in range(slots)]
    sizes = [(h, w, height * width) for (height, width), _, _, h, w in windows]
    return crops, plain, np.array(sizes).reshape(-1, slots, 3)


def noise_floor(first: np.ndarray, second: np.ndarray, rng: np.random.Generator, splits: int = 100) -> float:
    """Largest KS statistic to accept against `first`: 1.3 x the largest KS statistic between the halves of `splits`
    random re-splits of two independent torchvision runs (first + second).

    The largest of 100 is about the 1 % point of the null distribution of the statistic (ties and all); with the
    Kolmogorov tail P(D > d) ~ 2 exp(-2 n d**2), 1.3 x that point is exceeded with probability ~3e-4 by a pipeline of
    the same distribution. The splits' statistics are computed at once: the two empirical distribution functions
    along the sorted pooled values, compared after each run of equal values (as scipy's ks_2samp does).
    """
    pooled = np.sort(np.concatenate([first, second]))
    run_ends = np.append(pooled[1:] != pooled[:-1], True)
    in_first = rng.random((splits, len(pooled))).argsort(axis=1) < len(first)  # a random half per split
    gaps = np.cumsum(in_first, axis=1) / len(first) - np.cumsum(~in_first, axis=1) / len(second)
    return 1.3 * float(np.abs(gaps[:, run_ends]).max())


def assert_same_distribution(first: dict, second: dict, candidate: dict, name: str) -> None:
    """`candidate`'s statistics (`statistics` of a run) within the noise floor of reference run `first`, calibrated
    against reference run `second`, for every slot group and statistic."""
    rng = np.random.default_rng(0)
    report, failures = [], []
    for group, values_by_name in first.items():
        for statistic, values in values_by_name.items():
            threshold = noise_floor(values, second[group][statistic], rng)
            distance = ks_2samp(candidate[group][statistic], values, method="asymp").statistic
            floor = ks_2samp(second[group][statistic], values, method="asymp").statistic
            report.append(f"{group} {statistic}: KS {distance:.3f} (torchvision runs {floor:.3f}, threshold "
                          f"{threshold:.3f}, n={len(values)})")
            if distance > threshold:
                failures.append(report[-1])
    print("\n".join(report))
    assert not failures, f"{name} differs from torchvision beyond the noise floor:\n" + "\n".join(failures)
