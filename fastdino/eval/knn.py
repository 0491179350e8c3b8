"""Weighted k-nearest-neighbour classification of frozen features: the DINO paper's kNN protocol.

Protocol (Wu et al. 2018, as used by DINO): the CLS feature after the final norm, L2-normalized, of every train and
val image (resize + center crop); each val image takes its k most cosine-similar train images, each neighbour votes
for its class with weight exp(similarity / T), T = 0.07; top-1 / top-5 of the summed votes. k in {10, 20, 100, 200}.

Ties: neighbours with equal similarity at the k-th place are chosen by `torch.topk` (arbitrary, as the reference);
classes with equal votes rank by class index (lowest first), so results do not depend on the sort implementation.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from fastdino import checkpoint as checkpoint_io
from fastdino.config import RULES
from fastdino.rules import CheckedArgumentParser, Rule, existing_folder, existing_path, not_a_file, positive
from fastdino.data import IMAGENET_MEAN, IMAGENET_STD, DatasetError, ImageFolderDataset
from fastdino.distributed import init_distributed, print_on_rank0, rank_and_world_size, shutdown_distributed
from fastdino.errors import report_usage_errors

# The reference evaluates 224-pixel crops of images resized to 256; other sizes keep that ratio.
RESIZE_RATIO = 256 / 224
# Elements of one [test chunk, train] similarity block: 2**27 fp32 = 512 MiB, so ImageNet (1.28M train) fits a GPU.
_SIMILARITY_BLOCK_ELEMENTS = 2**27


def eval_transform(image_size: int) -> transforms.Compose:
    """PIL image -> normalized tensor [3, image_size, image_size]: bicubic resize of the shorter side to
    round(image_size * 256/224), center crop, ImageNet normalization (the reference: Resize(256) + CenterCrop(224))."""
    if image_size <= 0:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    return transforms.Compose([
        transforms.Resize(round(image_size * RESIZE_RATIO), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Iterable, device: torch.device | str,
                     amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS features of every batch of `loader` (yielding (images [B,3,H,W], labels [B])), in loader order.

    Returns (features [N, D] fp32, rows L2-normalized; labels [N] int64), both on `device`. The backbone runs in eval
    mode (its previous mode is restored); `amp` runs it under bf16 autocast on CUDA (ignored on CPU).
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for images, targets in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                cls = backbone(images.to(device, non_blocking=True))
            features.append(F.normalize(cls.float(), dim=1))
            labels.append(torch.as_tensor(targets, dtype=torch.long).to(device))
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batch: nothing to extract features from")
    return torch.cat(features), torch.cat(labels)


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped per-rank tensors along dim 0, rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def extract_dataset_features(backbone: nn.Module, dataset, device: torch.device | str, batch_size: int = 128,
                             num_workers: int = 4, amp: bool = False,
                             collective: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract_features` over a whole dataset, split across ranks when torch.distributed is initialized and
    `collective` (then every rank must call it); collective=False: this process extracts everything alone (for a
    caller that runs on one rank only, e.g. training's kNN on rank 0).

    Rank r takes the contiguous share [r*S, (r+1)*S) with S = ceil(N / world); the last shares are padded by repeating
    the final sample so that every rank runs the same number of forward passes (FSDP-safe), and the gathered rows are
    cut back to N. Every rank returns all N rows in dataset order, on `device`.
    """
    if len(dataset) == 0:
        raise ValueError("cannot extract features of an empty dataset")
    rank, world_size = rank_and_world_size() if collective else (0, 1)
    count = len(dataset)
    share = math.ceil(count / world_size)
    indices = [min(i, count - 1) for i in range(rank * share, (rank + 1) * share)]
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda", drop_last=False)
    features, labels = extract_features(backbone, loader, device, amp=amp)
    if world_size > 1:
        features, labels = _all_gather_rows(features), _all_gather_rows(labels)
    return features[:count], labels[:count]


def _check_knn_inputs(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                      test_labels: torch.Tensor, k: int, num_classes: int) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be [N, D] matrices of one width, got train {tuple(train_features.shape)} "
                         f"and test {tuple(test_features.shape)}")
    for name, features, labels in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        if labels.shape != (features.shape[0],):
            raise ValueError(f"{name} labels must have shape [{features.shape[0]}], got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}); got [{int(labels.min())}, "
                             f"{int(labels.max())}] (label -1 means an unlabelled flat folder: kNN needs classes)")
    if test_features.shape[0] == 0:
        raise ValueError("no test samples")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be between 1 and the number of train samples ({train_features.shape[0]}), got {k}")


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int | None = None) -> dict[str, float | None]:
    """Weighted kNN accuracy of test rows against train rows (the module docstring gives the rule).

    Features: [N_train, D] and [N_test, D], rows L2-normalized (cosine similarity is their dot product); labels
    int64 in [0, num_classes) (default: 1 + largest label seen). Runs on train_features' device, `chunk_size` test
    rows at a time (default: as many as fit a 512 MiB similarity block). Returns {'top1': %, 'top5': % or None
    when there are fewer than 5 classes}.
    """
    train_labels, test_labels = train_labels.long(), test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    _check_knn_inputs(train_features, train_labels, test_features, test_labels, k, num_classes)
    device = train_features.device
    train_labels = train_labels.to(device)
    num_train, num_test = train_features.shape[0], test_features.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _SIMILARITY_BLOCK_ELEMENTS // num_train)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    ranks_kept = min(5, num_classes)
    correct_top1 = torch.zeros((), dtype=torch.long, device=device)
    correct_top5 = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, num_test, chunk_size):
        queries = test_features[start:start + chunk_size].to(device, train_features.dtype)
        targets = test_labels[start:start + chunk_size].to(device)
        similarity = queries @ train_features.T                                   # [b, N_train]
        top_similarity, top_index = similarity.topk(k, dim=1)                     # [b, k]
        votes = torch.zeros(queries.shape[0], num_classes, device=device, dtype=torch.float32)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity.float() / temperature).exp())
        ranking = votes.argsort(dim=1, descending=True, stable=True)[:, :ranks_kept]
        hits = ranking == targets[:, None]
        correct_top1 += hits[:, 0].sum()
        correct_top5 += hits.any(dim=1).sum()
    top5 = 100.0 * correct_top5.item() / num_test if num_classes >= 5 else None
    return {"top1": 100.0 * correct_top1.item() / num_test, "top5": top5}


def labelled_folders(train_dir: str | os.PathLike, val_dir: str | os.PathLike, train_transform,
                     val_transform=None) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The train and val class-folder datasets of an evaluation (kNN, linear probe), with the same classes in both
    (val_transform: train_transform's when None); DatasetError (one line) otherwise."""
    train_set = ImageFolderDataset(train_dir, train_transform)
    val_set = ImageFolderDataset(val_dir, val_transform or train_transform)
    if not train_set.classes:
        raise DatasetError(f"{train_dir} is a flat folder of images; an evaluation needs class sub-folders")
    if train_set.classes != val_set.classes:
        raise DatasetError(f"train and val class folders differ: {len(train_set.classes)} classes in {train_dir}, "
                         f"{len(val_set.classes)} in {val_dir}; labels would not correspond")
    return train_set, val_set


def knn_accuracy(backbone: nn.Module, train_dir: str | os.PathLike, val_dir: str | os.PathLike, image_size: int,
                 device: torch.device | str, batch_size: int = 128, k: int = 20, temperature: float = 0.07,
                 num_workers: int = 4, amp: bool = False, collective: bool = True) -> dict[str, float | None]:
    """kNN top-1/top-5 (%) of `backbone` on two class-folder datasets with the same classes (the periodic eval of
    training: point it at a held-out subset). Collective when torch.distributed is initialized: call on every rank;
    collective=False runs it in this process alone (see `extract_dataset_features`)."""
    train_set, val_set = labelled_folders(train_dir, val_dir, eval_transform(image_size))
    train_features, train_labels = extract_dataset_features(backbone, train_set, device, batch_size, num_workers, amp,
                                                            collective)
    val_features, val_labels = extract_dataset_features(backbone, val_set, device, batch_size, num_workers, amp,
                                                        collective)
    return knn_classify(train_features, train_labels, val_features, val_labels, k=k, temperature=temperature,
                        num_classes=len(train_set.classes))


def _cache_path(cache_dir: Path, checkpoint: str, folder: str, settings: dict) -> Path:
    """A file name that changes whenever the checkpoint file, the folder's files (names, sizes, times: an image
    replaced under the same name too) or the extraction settings change."""
    stat = os.stat(checkpoint)
    files = [(str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns)
             for path in sorted(Path(folder).rglob("*")) if path.is_file()]
    identity = {"checkpoint": os.path.abspath(checkpoint), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "folder": os.path.abspath(folder), "files": files, **settings}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"features-{Path(folder).name}-{digest}.pt"


def _cached_dataset_features(backbone: nn.Module, dataset, args: argparse.Namespace, device: torch.device,
                             folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    if args.cache_dir is None:
        return extract_dataset_features(backbone, dataset, device, args.batch_size, args.num_workers, args.amp)
    settings = {"arch": args.arch, "patch_size": args.patch_size, "checkpoint_key": args.checkpoint_key,
                "image_size": args.image_size, "amp": args.amp, "num_samples": len(dataset)}
    path = _cache_path(Path(args.cache_dir), args.checkpoint, folder, settings)
    if path.is_file():
        print_on_rank0(f"features of {folder} read from the cache {path}")
        cached = checkpoint_io.load(path, map_location=device)
        return cached["features"], cached["labels"]
    features, labels = extract_dataset_features(backbone, dataset, device, args.batch_size, args.num_workers, args.amp)
    if rank_and_world_size()[0] == 0:
        checkpoint_io.save_atomic({"features": features.cpu(), "labels": labels.cpu()}, path)
        print_on_rank0(f"features of {folder} cached in {path}")
    return features, labels


# data-loading processes of the eval commands: 8, or fewer on a machine with fewer cores (more only wait)
EVAL_WORKERS = min(8, os.cpu_count() or 1)


def backbone_option_rules() -> dict[str, Rule]:
    """The rules of the options `hub.add_backbone_arguments` adds (shared by the fastdino.eval commands)."""
    from fastdino.preflight import device_option

    return {"--checkpoint": existing_path, "--arch": RULES["model.arch"], "--patch-size": RULES["model.patch_size"],
            "--device": device_option()}


@report_usage_errors
def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, float | None]]:
    from fastdino.hub import add_backbone_arguments, backbone_from_arguments

    rules = {**backbone_option_rules(), "--train-dir": existing_folder, "--val-dir": existing_folder,
             "--image-size": RULES["eval.image_size"], "--k": RULES["eval.knn_k"],
             "--temperature": RULES["eval.knn_temperature"], "--batch-size": positive,
             "--num-workers": RULES["data.num_workers"], "--cache-dir": not_a_file}
    parser = CheckedArgumentParser(description="Weighted k-NN evaluation of a DINO backbone on class folders "
                                               "(the DINO paper's protocol).", rules=rules)
    add_backbone_arguments(parser)
    parser.add_argument("--train-dir", required=True, help="class folders of the reference (train) images")
    parser.add_argument("--val-dir", required=True, help="class folders of the evaluated images (same classes)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="center-crop size; images are first resized to size*256/224 (bicubic) as the reference")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200],
                        help="numbers of neighbours (20 is usually best); values above the train size are skipped")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / temperature)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass, per process")
    parser.add_argument("--num-workers", type=int, default=EVAL_WORKERS, help="data-loading processes per process")
    parser.add_argument("--amp", action="store_true", help="extract under bf16 autocast on CUDA (the reference: fp32)")
    parser.add_argument("--cache-dir", default=None,
                        help="keep extracted features here, keyed by checkpoint file, folder and settings")
    args = parser.parse_args(argv)

    device = init_distributed(args.device).device
    backbone = backbone_from_arguments(args, whole_patches=True).to(device)
    train_set, val_set = labelled_folders(args.train_dir, args.val_dir, eval_transform(args.image_size))
    print_on_rank0(f"{len(train_set)} train and {len(val_set)} val images, {len(train_set.classes)} classes")
    train_features, train_labels = _cached_dataset_features(backbone, train_set, args, device, args.train_dir)
    val_features, val_labels = _cached_dataset_features(backbone, val_set, args, device, args.val_dir)

    results = {}
    for k in args.k:
        if k > len(train_set):
            print_on_rank0(f"k={k} skipped: only {len(train_set)} train images")
            continue
        results[k] = knn_classify(train_features, train_labels, val_features, val_labels, k=k,
                                  temperature=args.temperature, num_classes=len(train_set.classes))
        top5 = results[k]["top5"]
        top5_text = f", top-5 {top5:.2f}%" if top5 is not None else ""
        print_on_rank0(f"{k}-NN: top-1 {results[k]['top1']:.2f}%{top5_text}")
    shutdown_distributed()
    return results


if __name__ == "__main__":
    main()
