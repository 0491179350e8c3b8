"""Linear probe: a linear classifier trained on frozen backbone features (the DINO paper's linear protocol, as the
reference's eval_linear.py), in one process or under `torchrun --nproc_per_node=N -m fastdino.eval.linear`.

Features (the reference's rule): ViT-S/T concatenate the CLS token of the last 4 blocks (after the final norm);
ViT-B takes the last CLS token and the average of the last block's patch tokens. Classifier: one nn.Linear (weights
normal std 0.01, zero bias, no BatchNorm), DDP-wrapped under torchrun; SGD momentum 0.9, weight decay 0,
lr = --lr * batch per process * processes / 256, cosine to 0 over the epochs (100 by default); train images:
RandomResizedCrop + horizontal flip; val: resize + center crop. The best val top-1 over the epochs is reported.

N processes reach the result of one process with the same global batch (up to float rounding):
- `batch_size` is per process (the reference's --batch_size_per_gpu): the global batch is batch_size * N.
- Order: one permutation per epoch drawn from (seed, epoch), cut into global batches; each process takes a strided
  part of every global batch. The last global batch is smaller and its parts may differ by one sample, or be empty.
  DistributedSampler would pad it by repeating samples, so N processes would train on another set than one; here
  each process's summed loss is divided by the global batch size and multiplied by N (undoing DDP's average over
  processes), so every step follows the mean gradient over exactly the samples of its global batch.
- Each train sample's crop and flip are drawn from a generator seeded by (seed, epoch, sample index), so they do not
  depend on the number of processes or workers, nor on where a resumed probe starts again.
- Validation: process r takes val samples r, r + N, ...; the hit counts are summed over processes, so every val
  image counts exactly once.

With an output folder, after every epoch: `checkpoint.pth` (classifier, optimizer, scheduler, epoch, best accuracy
and the best classifier, written atomically) and `log.txt` (one JSON row per epoch). The same command again
continues from it to the result of an uninterrupted run. `--evaluate` only evaluates a saved classifier.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from fastdino import checkpoint as checkpoint_io
from fastdino.config import RULES
from fastdino.rules import (INVALID, CheckedArgumentParser, Rule, convert, existing_file, existing_folder, not_a_file,
                            positive)
from fastdino.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, epoch_batches
from fastdino.data.torch_loader import SeededSamples
from fastdino.distributed import init_distributed, print_on_rank0, rank_and_world_size, shutdown_distributed, unwrap
from fastdino.errors import UsageError, report_usage_errors
from fastdino.eval.knn import EVAL_WORKERS, backbone_option_rules, eval_transform, labelled_folders
from fastdino.hub import canonical_name

# Per step: (this process's features [b, F], labels [b], size of the global batch they belong to); b may be 0.
TrainBatches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor, int]]]
ValBatches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]

# The paper's choice per architecture: (n_last_blocks, avgpool).
FEATURE_RULES = {"vit_tiny": (4, False), "vit_small": (4, False), "vit_base": (1, True)}
LOG_FILE = "log.txt"
# --lr is checked as typed, so a refusal shows the value given (`--lr=0`, not float's `0.0`; `-1e-5`, not `-1e-05`);
# float() also reads inf and nan, which the training settings refuse too
LR_AS_TYPED = Rule(f"{RULES['optim.lr'].allowed}, a finite number",
                   lambda text: (value := convert(text, float)) is not INVALID and RULES["optim.lr"].allows(value))


def linear_features(backbone: nn.Module, images: torch.Tensor, n_last_blocks: int = 4,
                    avgpool: bool = False) -> torch.Tensor:
    """Frozen features [B, D * (n_last_blocks + avgpool)] of images [B, 3, H, W] by the reference's rule.

    Without avgpool: CLS tokens of the last `n_last_blocks` blocks (normed), concatenated oldest block first.
    With avgpool (only with n_last_blocks=1, as the reference): CLS and mean patch token interleaved per channel,
    [cls_0, pool_0, cls_1, pool_1, ...], the reference's layout, so its released linear weights apply.
    """
    if n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be at least 1, got {n_last_blocks}")
    if avgpool and n_last_blocks != 1:
        raise ValueError("avgpool combines the last block's mean patch token with its CLS token only: "
                         f"use n_last_blocks=1 with avgpool (got {n_last_blocks})")
    layers = backbone.get_intermediate_layers(images, n_last_blocks)
    cls_tokens = torch.cat([tokens[:, 0] for tokens in layers], dim=-1)
    if not avgpool:
        return cls_tokens
    mean_patch = layers[-1][:, 1:].mean(dim=1)
    return torch.stack((cls_tokens, mean_patch), dim=-1).flatten(1)


def make_linear_classifier(in_features: int, num_classes: int,
                           generator: torch.Generator | None = None) -> nn.Linear:
    """nn.Linear(in_features, num_classes) initialized as the reference: weights N(0, 0.01^2), zero bias. A seeded
    `generator` makes the start the same in every process and for every number of processes."""
    classifier = nn.Linear(in_features, num_classes)
    nn.init.normal_(classifier.weight, mean=0.0, std=0.01, generator=generator)
    nn.init.zeros_(classifier.bias)
    return classifier


@torch.no_grad()
def evaluate_linear(classifier: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device | str) -> dict[str, float | None]:
    """Top-1 / top-5 (%) of `classifier` (an nn.Linear, or DDP around one) on (features [B, F], labels [B]) batches;
    top5 None below 5 classes. Collective under torch.distributed: each process passes its own share of the val
    set and the hits are summed over processes."""
    model = unwrap(classifier).eval()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # top-1 hits, top-5 hits, samples
    for features, labels in batches:
        labels = labels.to(device)
        ranking = model(features.to(device)).topk(min(5, model.out_features), dim=1).indices
        counts[0] += (ranking[:, 0] == labels).sum()
        counts[1] += (ranking == labels[:, None]).any(dim=1).sum()
        counts[2] += labels.shape[0]
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(counts)
    correct_top1, correct_top5, total = counts.tolist()
    if total == 0:
        raise ValueError("no validation batch to evaluate")
    top5 = 100.0 * correct_top5 / total if model.out_features >= 5 else None
    return {"top1": 100.0 * correct_top1 / total, "top5": top5}


def _train_one_epoch(classifier: nn.Module, optimizer: torch.optim.Optimizer,
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor, int]], device: torch.device | str) -> float:
    """One pass over `batches` (see TrainBatches); returns the mean loss over the epoch's samples, all processes."""
    world_size = rank_and_world_size()[1]
    classifier.train()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, samples
    for features, labels, global_batch in batches:
        labels = labels.to(device)
        loss_sum = F.cross_entropy(classifier(features.to(device)), labels, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (world_size / global_batch)).backward()  # DDP averages: the mean over the global batch
        optimizer.step()
        totals[0] += loss_sum.detach()
        totals[1] += labels.shape[0]
    if world_size > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def train_linear_classifier(classifier: nn.Module, train_batches: TrainBatches, val_batches: ValBatches,
                            epochs: int, lr: float, device: torch.device | str, val_every: int = 1,
                            log: Callable[[str], None] = print, resume: Mapping[str, Any] | None = None,
                            save: Callable[[dict[str, Any]], None] | None = None,
                            stop_after_epochs: int | None = None) -> dict:
    """Train `classifier` (an nn.Linear on `device`, or DDP around one) with the reference recipe; return
    {'best_top1', 'history'}.

    `train_batches(epoch)` yields this process's steps of `epoch` (see TrainBatches); `val_batches()` this process's
    share of the val set. `lr` is the already-scaled rate. After each epoch `save(checkpoint)` receives the
    classifier, optimizer, scheduler, epoch, best accuracy and best classifier; passing such a checkpoint as `resume`
    continues after its epoch exactly as if never stopped. `stop_after_epochs`: return after this many epochs of this
    call (an interruption, for tests). 'history': one row per epoch: epoch, lr, train_loss, and val_top1 / val_top5
    when evaluated.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    model = unwrap(classifier).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)
    progress: dict[str, Any] = {"epoch": 0, "best_acc": 0.0, "best_state_dict": None, "history": []}
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        progress = {key: resume[key] for key in progress}
    end = epochs if stop_after_epochs is None else min(epochs, progress["epoch"] + stop_after_epochs)
    for epoch in range(progress["epoch"], end):
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row["train_loss"] = _train_one_epoch(classifier, optimizer, train_batches(epoch), device)
        scheduler.step()
        if (epoch + 1) % val_every == 0 or epoch == epochs - 1:
            accuracy = evaluate_linear(classifier, val_batches(), device)
            if progress["best_state_dict"] is None or accuracy["top1"] > progress["best_acc"]:
                progress["best_acc"] = accuracy["top1"]
                progress["best_state_dict"] = {key: value.detach().cpu().clone()
                                               for key, value in model.state_dict().items()}
            row.update(val_top1=accuracy["top1"], val_top5=accuracy["top5"])
            log(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val top-1 {accuracy['top1']:.2f}% "
                f"(best {progress['best_acc']:.2f}%)")
        progress["history"].append(row)
        progress["epoch"] = epoch + 1
        if save is not None:
            save({**progress, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict()})
    return {"best_top1": progress["best_acc"], "history": progress["history"]}


def train_transform(image_size: int) -> transforms.Compose:
    """The reference's linear-probe train augmentation: RandomResizedCrop(image_size), horizontal flip, normalize."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@dataclass
class FrozenFeatures:
    """The frozen backbone and the reference's feature rule, shared by the train and the val passes."""

    backbone: nn.Module
    device: torch.device
    n_last_blocks: int = 4
    avgpool: bool = False
    amp: bool = False

    @property
    def dim(self) -> int:
        return self.backbone.embed_dim * (self.n_last_blocks + int(self.avgpool))

    def of(self, loader: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features [B, dim] fp32 on the device, labels [B]) for each (images, labels) batch of `loader`."""
        for images, labels in loader:
            # no_grad around the forward only: a context held across `yield` would switch off autograd for the caller
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                 enabled=self.amp and self.device.type == "cuda"):
                features = linear_features(self.backbone, images.to(self.device, non_blocking=True),
                                           self.n_last_blocks, self.avgpool)
            yield features.float(), labels


def train_epoch_batches(features: FrozenFeatures, dataset: Dataset, batch_size: int, seed: int, epoch: int,
                        num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """This process's steps of `epoch` (TrainBatches): its strided part of each global batch of batch_size * N
    samples (see the module docstring), each sample augmented from its (seed, epoch, index) generator."""
    rank, world_size = rank_and_world_size()
    global_batches = epoch_batches(len(dataset), batch_size * world_size, seed, epoch, drop_last=False)
    parts = [batch[rank::world_size] for batch in global_batches]
    loader = DataLoader(SeededSamples(dataset, seed), batch_sampler=[[(epoch, i) for i in p] for p in parts if p],
                        num_workers=num_workers, pin_memory=features.device.type == "cuda")
    loaded = features.of(loader)
    for batch, part in zip(global_batches, parts):
        if part:
            yield *next(loaded), len(batch)
        else:  # the last global batch has fewer samples than processes: this one still takes part in the step
            yield torch.empty(0, features.dim, device=features.device), torch.empty(0, dtype=torch.long), len(batch)


def val_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """This process's share of the val set: samples rank, rank + N, ... (all of them in one process)."""
    rank, world_size = rank_and_world_size()
    return DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=device.type == "cuda")


def _saved_progress(output_dir: Path | None, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint a probe in `output_dir` continues from; one line when it was written with other settings."""
    path = Path(output_dir) / checkpoint_io.LATEST if output_dir is not None else None
    if path is None or not path.is_file():
        return None
    saved = checkpoint_io.load(path)
    if not isinstance(saved, dict) or "settings" not in saved:
        raise UsageError(f"{path} is not a linear probe's checkpoint (a training run's?): pass another --output-dir")
    stored = saved["settings"]
    changed = [f"{key} {stored.get(key)} -> {value}" for key, value in settings.items() if stored.get(key) != value]
    if changed:
        raise UsageError(f"{path} was written by a probe with other settings ({', '.join(changed)}): pass the same "
                         "settings to continue it, or another --output-dir")
    return saved


def _progress_writer(output_dir: Path | None, settings: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
    """Process 0 writes checkpoint.pth (atomically), then log.txt rewritten from its history: a kill between the two
    leaves the log a row short, which the next epoch's rewrite completes."""
    if output_dir is None:
        return None

    def write(checkpoint: dict[str, Any]) -> None:
        if rank_and_world_size()[0] != 0:
            return
        checkpoint_io.save_atomic({**checkpoint, "settings": settings}, Path(output_dir) / checkpoint_io.LATEST)
        checkpoint_io.write_text_atomic("".join(json.dumps(row) + "\n" for row in checkpoint["history"]),
                                        Path(output_dir) / LOG_FILE)

    return write


def linear_probe(backbone: nn.Module, train_dir: str | os.PathLike, val_dir: str | os.PathLike, image_size: int,
                 device: torch.device | str, n_last_blocks: int = 4, avgpool: bool = False, epochs: int = 100,
                 batch_size: int = 128, base_lr: float = 0.001, num_workers: int = 8, amp: bool = False,
                 seed: int = 0, output_dir: str | os.PathLike | None = None,
                 log: Callable[[str], None] = print_on_rank0, stop_after_epochs: int | None = None) -> dict:
    """The full protocol on two class-folder datasets; returns `train_linear_classifier`'s result.

    Collective under torch.distributed (every process calls it; the classifier is DDP-wrapped); `batch_size` is per
    process. With `output_dir`, progress is saved there after every epoch and a later call with the same settings
    continues from it (`stop_after_epochs`: see train_linear_classifier).
    """
    device = torch.device(device)
    train_set, val_set = labelled_folders(train_dir, val_dir, train_transform(image_size), eval_transform(image_size))
    features = FrozenFeatures(backbone.eval().requires_grad_(False).to(device), device, n_last_blocks, avgpool, amp)
    world_size = rank_and_world_size()[1]
    lr = base_lr * batch_size * world_size / 256
    settings = {"epochs": epochs, "lr": lr, "global_batch": batch_size * world_size, "seed": seed,
                "image_size": image_size, "n_last_blocks": n_last_blocks, "avgpool": avgpool,
                "features": features.dim, "classes": len(train_set.classes)}
    resume = _saved_progress(output_dir, settings)
    if resume is not None:
        log(f"continuing from {Path(output_dir) / checkpoint_io.LATEST}, after epoch {resume['epoch']} of {epochs}")
    classifier = make_linear_classifier(features.dim, len(train_set.classes),
                                        torch.Generator().manual_seed(seed)).to(device)
    if world_size > 1:
        classifier = DistributedDataParallel(classifier, device_ids=[device.index] if device.type == "cuda" else None)
    loader = val_loader(val_set, batch_size, num_workers, device)
    return train_linear_classifier(
        classifier, lambda epoch: train_epoch_batches(features, train_set, batch_size, seed, epoch, num_workers),
        lambda: features.of(loader), epochs=epochs, lr=lr, device=device, log=log, resume=resume,
        save=_progress_writer(output_dir, settings), stop_after_epochs=stop_after_epochs)


def load_linear_weights(source: str | os.PathLike, in_features: int, num_classes: int) -> dict[str, torch.Tensor]:
    """The {'weight', 'bias'} of a saved classifier: a probe's checkpoint.pth (its best classifier), a state dict,
    or the reference's files (`{'state_dict': {'module.linear.weight', ...}}`). UsageError (one line) when the file
    is missing or its weights do not fit `in_features` -> `num_classes`."""
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"no linear classifier at {path}: train one with --output-dir, or pass --pretrained-linear")
    saved = checkpoint_io.load(path)
    state = (saved.get("best_state_dict") or saved.get("state_dict") or saved) if isinstance(saved, dict) else {}
    state = state if isinstance(state, Mapping) else {}
    weights = {canonical_name(key).removeprefix("linear."): value for key, value in state.items()}
    shapes = {key: tuple(value.shape) for key, value in weights.items() if isinstance(value, torch.Tensor)}
    expected = {"weight": (num_classes, in_features), "bias": (num_classes,)}
    if shapes != expected or len(weights) != 2:
        held = (f"linear weights {shapes or 'of no known layout'}" if len(shapes) <= 2 else
                f"{len(shapes)} tensors ({', '.join(list(shapes)[:3])}, ...), not a linear classifier")
        raise UsageError(f"{path} holds {held}; this probe needs {expected} ({in_features} features of the backbone "
                         f"-> {num_classes} classes)")
    return weights


def evaluate_saved_classifier(features: FrozenFeatures, source: str | os.PathLike, val_dir: str | os.PathLike,
                              image_size: int, batch_size: int = 128, num_workers: int = 8) -> dict[str, float | None]:
    """Top-1 / top-5 (%) on `val_dir` of the classifier saved in `source` (see load_linear_weights); collective
    under torch.distributed, the val set split as in training."""
    val_set = ImageFolderDataset(val_dir, eval_transform(image_size))
    classifier = nn.Linear(features.dim, len(val_set.classes))
    classifier.load_state_dict(load_linear_weights(source, features.dim, len(val_set.classes)))
    loader = val_loader(val_set, batch_size, num_workers, features.device)
    return evaluate_linear(classifier.to(features.device), features.of(loader), features.device)


def _feature_rule(backbone: nn.Module, n_last_blocks: int | None, avgpool: str | None) -> tuple[int, bool]:
    """The command's (n_last_blocks, avgpool): the paper's choice for the backbone's architecture, or the options."""
    from fastdino.hub import describe_backbone

    default_blocks, default_avgpool = FEATURE_RULES[describe_backbone(backbone.state_dict())["arch"]]
    n_last_blocks = default_blocks if n_last_blocks is None else n_last_blocks
    avgpool = default_avgpool if avgpool is None else avgpool == "true"
    if n_last_blocks > len(backbone.blocks):
        raise UsageError(f"--n-last-blocks={n_last_blocks}: the backbone has {len(backbone.blocks)} blocks")
    if avgpool and n_last_blocks != 1:
        raise UsageError(f"--avgpool true pools the last block only: use --n-last-blocks 1 with it "
                         f"(got {n_last_blocks})")
    return n_last_blocks, avgpool


def _parse_arguments(argv: Sequence[str] | None):
    from fastdino.hub import add_backbone_arguments

    rules = {**backbone_option_rules(), "--train-dir": existing_folder, "--val-dir": existing_folder,
             "--image-size": RULES["eval.image_size"], "--n-last-blocks": positive, "--epochs": RULES["optim.epochs"],
             "--batch-size": positive, "--lr": LR_AS_TYPED, "--num-workers": RULES["data.num_workers"],
             "--seed": RULES["seed"], "--output-dir": not_a_file, "--pretrained-linear": existing_file}
    parser = CheckedArgumentParser(description="Linear probe of a frozen DINO backbone (the DINO paper's protocol, "
                                               "as the reference's eval_linear.py); under torchrun the work is split "
                                               "over the processes with the result of one.", rules=rules)
    add_backbone_arguments(parser)
    parser.add_argument("--train-dir", help="class folders of the training images (not needed with --evaluate)")
    parser.add_argument("--val-dir", required=True, help="class folders of the validation images (same classes)")
    parser.add_argument("--image-size", type=int, default=224, help="crop size (val: resize to size*256/224 first)")
    parser.add_argument("--n-last-blocks", type=int, default=None,
                        help="CLS tokens of this many last blocks (default: 4 for vit_small/tiny, 1 for vit_base)")
    parser.add_argument("--avgpool", choices=("true", "false"), default=None,
                        help="add the mean patch token (default: true for vit_base, false otherwise)")
    parser.add_argument("--epochs", type=int, default=100,
                        help="passes over the train images; the lr decays to 0 over them")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="images per step and process (the reference's --batch_size_per_gpu); the global batch "
                             "is this times the number of processes")
    parser.add_argument("--lr", default="0.001",
                        help="learning rate for a global batch of 256, scaled linearly with the global batch")
    parser.add_argument("--num-workers", type=int, default=EVAL_WORKERS, help="data-loading processes per process")
    parser.add_argument("--seed", type=int, default=0, help="classifier init, image order and augmentation")
    parser.add_argument("--amp", action="store_true", help="backbone under bf16 autocast on CUDA")
    parser.add_argument("--output-dir", default=None,
                        help="write checkpoint.pth and log.txt after every epoch; the same command again continues "
                             "from them")
    parser.add_argument("--evaluate", action="store_true",
                        help="only evaluate the best classifier of --output-dir/checkpoint.pth, or --pretrained-linear")
    parser.add_argument("--pretrained-linear", default=None,
                        help="with --evaluate: a classifier file (a probe's checkpoint.pth or the reference's "
                             "released linear weights)")
    args = parser.parse_args(argv)
    args.lr = float(args.lr)  # checked by LR_AS_TYPED
    if args.evaluate and args.pretrained_linear is None and args.output_dir is None:
        raise UsageError("--evaluate needs the classifier: --output-dir of a probe, or --pretrained-linear FILE")
    if not args.evaluate and args.train_dir is None:
        raise UsageError("--train-dir is required to train the classifier (or pass --evaluate)")
    return args


@report_usage_errors
def main(argv: Sequence[str] | None = None) -> dict:
    from fastdino.hub import backbone_from_arguments

    args = _parse_arguments(argv)
    device = init_distributed(args.device).device
    backbone = backbone_from_arguments(args, whole_patches=True)
    n_last_blocks, avgpool = _feature_rule(backbone, args.n_last_blocks, args.avgpool)
    if args.evaluate:
        source = args.pretrained_linear or Path(args.output_dir) / checkpoint_io.LATEST
        features = FrozenFeatures(backbone.eval().to(device), device, n_last_blocks, avgpool, args.amp)
        result = evaluate_saved_classifier(features, source, args.val_dir, args.image_size, args.batch_size,
                                           args.num_workers)
        top5 = f", top-5 {result['top5']:.2f}%" if result["top5"] is not None else ""
        print_on_rank0(f"linear probe of {source}: val top-1 {result['top1']:.2f}%{top5}")
    else:
        result = linear_probe(backbone, args.train_dir, args.val_dir, args.image_size, device,
                              n_last_blocks=n_last_blocks, avgpool=avgpool, epochs=args.epochs,
                              batch_size=args.batch_size, base_lr=args.lr, num_workers=args.num_workers, amp=args.amp,
                              seed=args.seed, output_dir=args.output_dir)
        print_on_rank0(f"linear probe: best val top-1 {result['best_top1']:.2f}%")
    shutdown_distributed()
    return result


if __name__ == "__main__":
    main()
