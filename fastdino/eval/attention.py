"""Self-attention pictures: where the CLS token of the last block looks, per head (the DINO paper's figures).

For each head: the CLS token's attention over the patch tokens, upsampled (nearest) to the image, and the mask of
the most-attended patches that together hold `keep` (60%) of that head's attention mass, drawn over the image.

Default image size: the reference draws 480 px pictures, 60 patches per side at patch 8. Attention costs the square
of the number of patches, so a smaller patch at 480 px costs far more (patch 4: 120 per side, 16 times the
attention; the demo's model took 106 s and 14.6 GB for one photo); the default is therefore at most 60 patches per
side and at most 480 px: 480 px for patch 8 and 16 (as the reference), 240 px for patch 4.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms  # noqa: E402

from fastdino.config import RULES  # noqa: E402
from fastdino.rules import CheckedArgumentParser, between, existing_path, not_a_file  # noqa: E402
from fastdino.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from fastdino.data.datasets import _DECODE_ERRORS, find_images, load_rgb  # noqa: E402
from fastdino.errors import UsageError, report_usage_errors  # noqa: E402

# The reference's pictures: 480 px at patch 8, i.e. 60 patches per side (see the module docstring).
REFERENCE_IMAGE_SIZE = 480
REFERENCE_PATCHES_PER_SIDE = 60


def default_image_size(patch_size: int) -> int:
    """Shorter side for a backbone with this patch size: the reference's 480 px, but no more than its 60 patches per
    side, so a small patch does not multiply the attention's time and memory (480 for patch 8 and 16, 240 for 4)."""
    return min(REFERENCE_IMAGE_SIZE, REFERENCE_PATCHES_PER_SIDE * patch_size)


def threshold_mask(attn: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """Per head, the fewest tokens whose attention adds up to at least `keep` of the head's total.

    attn [heads, N] (non-negative) -> bool [heads, N]. Rule (the reference's): rank tokens by attention, largest
    first, and keep each token while the mass of the tokens ranked before it is still below `keep`.
    """
    if attn.ndim != 2:
        raise ValueError(f"attn must be [heads, tokens], got shape {tuple(attn.shape)}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
    values, order = attn.double().sort(dim=1, descending=True)
    total = values.sum(dim=1, keepdim=True)
    if (total <= 0).any() or (values[:, -1] < 0).any():
        raise ValueError("attention of every head must be non-negative with a positive sum")
    mass_before = torch.cumsum(values, dim=1) - values
    kept_in_rank_order = mass_before < keep * total
    return torch.zeros_like(kept_in_rank_order).scatter_(1, order, kept_in_rank_order)


@torch.no_grad()
def attention_maps(backbone: nn.Module, image_tensor: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention of the last block: image [3, H, W] (normalized) -> [heads, H // p, W // p] fp32 on CPU.

    Right and bottom pixels beyond a multiple of the patch size are cropped off (as the reference). Each head's map
    sums to 1 minus the CLS token's attention to itself.
    """
    if image_tensor.ndim != 3 or image_tensor.shape[0] != 3:
        raise ValueError(f"image_tensor must be [3, H, W], got shape {tuple(image_tensor.shape)}")
    patch = backbone.patch_size
    grid_h, grid_w = image_tensor.shape[1] // patch, image_tensor.shape[2] // patch
    if grid_h == 0 or grid_w == 0:
        raise ValueError(f"image {tuple(image_tensor.shape[1:])} is smaller than one {patch}x{patch} patch")
    device = next(backbone.parameters()).device
    image = image_tensor[:, :grid_h * patch, :grid_w * patch].unsqueeze(0).to(device)
    was_training = backbone.training
    try:
        attention = backbone.eval().get_last_selfattention(image)      # [1, heads, N, N]
    finally:
        backbone.train(was_training)
    return attention[0, :, 0, 1:].float().cpu().reshape(-1, grid_h, grid_w)


def _upsample(maps: np.ndarray, factor: int) -> np.ndarray:
    """[..., h, w] -> [..., h * factor, w * factor], nearest neighbour (one block of pixels per patch)."""
    return maps.repeat(factor, axis=-2).repeat(factor, axis=-1)


def _head_colors(count: int) -> np.ndarray:
    """`count` distinct bright RGB colours in [0, 1]."""
    return np.asarray(plt.get_cmap("hsv")(np.arange(count) / max(count, 1)))[:, :3]


def _overlay(image: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 image [H, W, 3] with `mask` [H, W] tinted by `color` and its border drawn in that colour."""
    mask = mask.astype(bool)
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    border = mask & ~interior
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * 255 * color
    out[border] = 255 * color
    return out.clip(0, 255).astype(np.uint8)


def _resized(image: Image.Image, image_size: int, patch: int) -> Image.Image:
    """Shorter side to image_size (aspect kept), then cropped to a multiple of the patch size."""
    if image_size < patch:
        raise ValueError(f"image_size {image_size} is smaller than the patch size {patch}")
    resized = transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC)(image.convert("RGB"))
    width, height = resized.size
    return resized.crop((0, 0, width - width % patch, height - height % patch))


def _overview_figure(picture: np.ndarray, maps: np.ndarray, masks: np.ndarray, colors: np.ndarray, keep: float,
                     path: Path) -> None:
    """Top row: the image and each head's attention; bottom row: mean attention and each head's mask, on the image."""
    heads = maps.shape[0]
    figure, axes = plt.subplots(2, heads + 1, figsize=(2.2 * (heads + 1), 4.6), squeeze=False)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("image")
    axes[1, 0].imshow(picture)
    axes[1, 0].imshow(maps.mean(axis=0), cmap="inferno", alpha=0.6)
    axes[1, 0].set_title("mean attention")
    for head in range(heads):
        axes[0, head + 1].imshow(maps[head], cmap="viridis")
        axes[0, head + 1].set_title(f"head {head}")
        axes[1, head + 1].imshow(_overlay(picture, masks[head], colors[head]))
        axes[1, head + 1].set_title(f"{keep:.0%} mass")
    for axis in axes.flat:
        axis.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _normalized(picture: Image.Image) -> torch.Tensor:
    return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(picture))


def held_out_examples(folder: str | os.PathLike, count: int) -> list[tuple[str, Image.Image]]:
    """`count` images of a class-folder dataset, one class after another (the first image of each class, then the
    second, ...), named `<class>-<file stem>`: a few examples of every class, in a fixed order."""
    samples, classes = find_images(folder)
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    picked: list[tuple[int, str]] = []
    for rank in range(max(map(len, by_class.values()))):
        picked += [(label, files[rank]) for label, files in by_class.items() if rank < len(files)]
    return [(f"{classes[label] if classes else 'image'}-{Path(path).stem}", load_rgb(path))
            for label, path in picked[:count]]


def attention_comparison(backbones: dict[str, nn.Module], images: Sequence[tuple[str, Image.Image]],
                         image_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The same pictures through several networks: (pictures [H, W, 3] uint8, maps [images, networks, heads, h, w])
    with the networks in `backbones`' order and the heads in each network's own order."""
    patch = next(iter(backbones.values())).patch_size
    pictures = [_resized(image, image_size, patch) for _, image in images]
    maps = np.stack([np.stack([attention_maps(backbone, _normalized(picture)).numpy()
                               for backbone in backbones.values()]) for picture in pictures])
    return [np.asarray(picture) for picture in pictures], maps


def save_attention_comparison(backbones: dict[str, nn.Module], images: Sequence[tuple[str, Image.Image]],
                              path: str | os.PathLike, image_size: int) -> Path:
    """One figure, a row per image: the image, then every head's CLS attention of each network side by side
    (e.g. the trained teacher beside its random-init twin), so what training changed is seen at a glance."""
    pictures, maps = attention_comparison(backbones, images, image_size)
    heads = maps.shape[2]
    columns = 1 + len(backbones) * heads
    figure, axes = plt.subplots(len(pictures), columns, figsize=(1.6 * columns, 1.7 * len(pictures)), squeeze=False)
    for row, ((name, _), picture) in enumerate(zip(images, pictures)):
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title(name, fontsize=8)
        for index, label in enumerate(backbones):
            for head in range(heads):
                axis = axes[row, 1 + index * heads + head]
                axis.imshow(maps[row, index, head], cmap="viridis")
                axis.set_title(f"{label} h{head}", fontsize=8)
    for axis in axes.flat:
        axis.set_axis_off()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_attention_maps(backbone: nn.Module, image: Image.Image | str | os.PathLike, out_dir: str | os.PathLike,
                        image_size: int | None = None, name: str = "image", keep: float = 0.6) -> list[Path]:
    """Write the attention pictures of one image; return the written paths.

    The image (PIL or a file) is resized so its shorter side is `image_size` (default: `default_image_size` of the
    backbone's patch) and cropped to a multiple of the patch size. Files in out_dir: `{name}.png` (the image),
    `{name}-attn-head{j}.png` (head j's attention map), `{name}-mask-head{j}.png` (head j's `keep`-mass mask over
    the image), `{name}-overview.png` (all in one figure).
    """
    if not isinstance(image, Image.Image):
        image = load_rgb(image)
    if image_size is None:
        image_size = default_image_size(backbone.patch_size)
    picture = _resized(image, image_size, backbone.patch_size)
    maps = attention_maps(backbone, _normalized(picture))                          # [heads, h, w]
    heads, grid_h, grid_w = maps.shape
    masks = threshold_mask(maps.reshape(heads, -1), keep).reshape(heads, grid_h, grid_w)
    maps_px = _upsample(maps.numpy(), backbone.patch_size)
    masks_px = _upsample(masks.numpy(), backbone.patch_size)
    picture_px = np.asarray(picture)
    colors = _head_colors(heads)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{name}.png"]
    picture.save(written[0])
    for head in range(heads):
        attn_path = out_dir / f"{name}-attn-head{head}.png"
        plt.imsave(attn_path, maps_px[head], cmap="viridis")
        mask_path = out_dir / f"{name}-mask-head{head}.png"
        Image.fromarray(_overlay(picture_px, masks_px[head], colors[head])).save(mask_path)
        written += [attn_path, mask_path]
    overview_path = out_dir / f"{name}-overview.png"
    _overview_figure(picture_px, maps_px, masks_px, colors, keep, overview_path)
    written.append(overview_path)
    return written


def _images_to_draw(image_arg: str | None) -> list[tuple[str, Image.Image | str]]:
    """(name, image) pairs: the bundled demo photos, one file, or every image of a folder (names made unique)."""
    if image_arg is None:
        from fastdino.data.demo_dataset import demo_attention_images
        return list(demo_attention_images())
    path = Path(image_arg)
    if path.is_file():
        return [(path.stem, str(path))]
    if not path.exists():
        raise FileNotFoundError(f"image file or folder not found: {path}")
    samples, _ = find_images(path)
    names: dict[str, int] = {}
    pairs = []
    for file, _label in samples:
        stem = Path(file).stem
        names[stem] = names.get(stem, 0) + 1
        pairs.append((stem if names[stem] == 1 else f"{stem}-{names[stem]}", file))
    return pairs


def _draw(backbone: nn.Module, image_arg: str | None, out_dir: str, image_size: int, keep: float) -> list[Path]:
    """`save_attention_maps` of every image of `--image` that decodes. A corrupt file among good ones is a warning
    line naming it, after the pictures (where it is not scrolled away), not the end of the command; UsageError (one
    line) when none decodes."""
    written: list[Path] = []
    unreadable: list[tuple[str, str]] = []  # (file, why)
    for name, image in _images_to_draw(image_arg):
        try:
            picture = image if isinstance(image, Image.Image) else load_rgb(image)
        except _DECODE_ERRORS as error:
            unreadable.append((str(image), f"{type(error).__name__}: {error}"))
            continue
        written += save_attention_maps(backbone, picture, out_dir, image_size, name, keep)
        print(f"{name}: attention pictures written to {out_dir}")
    if not written:
        file, why = unreadable[0]
        others = f" ({len(unreadable) - 1} more cannot either)" if len(unreadable) > 1 else ""
        raise UsageError(f"--image {image_arg}: no image to draw: {file} cannot be decoded ({why}){others}")
    for file, why in unreadable:
        print(f"warning: skipped {file}: cannot be decoded ({why})", file=sys.stderr)
    return written


@report_usage_errors
def main(argv: Sequence[str] | None = None) -> list[Path]:
    from fastdino.eval.knn import backbone_option_rules
    from fastdino.hub import add_backbone_arguments, backbone_from_arguments

    rules = {**backbone_option_rules(), "--image": existing_path, "--out-dir": not_a_file,
             "--image-size": RULES["eval.attention_image_size"], "--keep": between(0, 1, low_open=True)}
    parser = CheckedArgumentParser(description="Save the last block's CLS self-attention maps of a DINO backbone.",
                                   rules=rules)
    add_backbone_arguments(parser)
    parser.add_argument("--image", default=None,
                        help="an image file or a folder of images (default: a few bundled photos); a file that "
                             "cannot be decoded is skipped with a warning")
    parser.add_argument("--out-dir", default="attention_maps", help="where the PNG files go")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"shorter side of the image after resizing (default: the reference's "
                             f"{REFERENCE_IMAGE_SIZE} px, but at most its {REFERENCE_PATCHES_PER_SIDE} patches per "
                             f"side: {default_image_size(8)} px for patch 8 and 16, {default_image_size(4)} px for "
                             f"patch 4, where {REFERENCE_IMAGE_SIZE} px would take 16 times the attention's memory)")
    parser.add_argument("--keep", type=float, default=0.6, help="attention mass kept by the masks")
    args = parser.parse_args(argv)

    backbone = backbone_from_arguments(args).to(args.device)
    image_size = default_image_size(backbone.patch_size) if args.image_size is None else args.image_size
    if image_size < backbone.patch_size:
        raise UsageError(f"--image-size {image_size}: must be at least the backbone's patch size "
                         f"({backbone.patch_size})")
    return _draw(backbone, args.image, args.out_dir, image_size, args.keep)


if __name__ == "__main__":
    main()
