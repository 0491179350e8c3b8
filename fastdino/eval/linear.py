"""Linear probe: a linear classifier trained on frozen backbone features (the DINO paper's linear protocol).

Features (the reference's rule): ViT-S concatenates the CLS token of the last 4 blocks (after the final norm);
ViT-B takes the last CLS token and the average of the last block's patch tokens. Classifier: one nn.Linear (weights
normal std 0.01, zero bias, no BatchNorm); SGD momentum 0.9, weight decay 0, lr 0.001 * batch / 256, cosine to 0 over
the epochs (100 in the paper); train images: RandomResizedCrop + horizontal flip; val: resize + center crop.
The best val top-1 over the epochs is reported. Single process (one GPU or the CPU).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from fastdino.config import RULES, CheckedArgumentParser, existing_folder, positive
from fastdino.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset
from fastdino.errors import report_usage_errors
from fastdino.eval.knn import backbone_option_rules, eval_transform

FeatureBatches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]

# The paper's choice per architecture: (n_last_blocks, avgpool).
FEATURE_RULES = {"vit_tiny": (4, False), "vit_small": (4, False), "vit_base": (1, True)}


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


def make_linear_classifier(in_features: int, num_classes: int) -> nn.Linear:
    """nn.Linear(in_features, num_classes) initialized as the reference: weights N(0, 0.01^2), zero bias."""
    classifier = nn.Linear(in_features, num_classes)
    nn.init.normal_(classifier.weight, mean=0.0, std=0.01)
    nn.init.zeros_(classifier.bias)
    return classifier


@torch.no_grad()
def evaluate_linear(classifier: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device | str) -> dict[str, float | None]:
    """Top-1 / top-5 (%) of `classifier` on (features [B, F], labels [B]) batches; top5 None below 5 classes."""
    classifier.eval()
    correct_top1 = correct_top5 = total = num_classes = 0
    for features, labels in batches:
        logits = classifier(features.to(device))
        num_classes = logits.shape[1]
        labels = labels.to(device)
        ranking = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct_top1 += (ranking[:, 0] == labels).sum().item()
        correct_top5 += (ranking == labels[:, None]).any(dim=1).sum().item()
        total += labels.shape[0]
    if total == 0:
        raise ValueError("no validation batch to evaluate")
    return {"top1": 100.0 * correct_top1 / total, "top5": 100.0 * correct_top5 / total if num_classes >= 5 else None}


def train_linear_classifier(classifier: nn.Module, train_batches: FeatureBatches, val_batches: FeatureBatches,
                            epochs: int, lr: float, device: torch.device | str, val_every: int = 1,
                            log: Callable[[str], None] = print) -> dict:
    """Train `classifier` on features with the reference recipe; return {'best_top1', 'history'}.

    `train_batches()` / `val_batches()` are called once per epoch / evaluation and yield (features [B, F],
    labels [B]) (calling again lets the train augmentation differ per epoch). `lr` is the already-scaled rate.
    'history' has one row per epoch: epoch, lr, train_loss, and val_top1 / val_top5 when evaluated.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    classifier.to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)
    best_top1, history = 0.0, []
    for epoch in range(epochs):
        classifier.train()
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        loss_sum, seen = 0.0, 0
        for features, labels in train_batches():
            loss = F.cross_entropy(classifier(features.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * labels.shape[0], seen + labels.shape[0]
        scheduler.step()
        row["train_loss"] = loss_sum / max(seen, 1)
        if (epoch + 1) % val_every == 0 or epoch == epochs - 1:
            accuracy = evaluate_linear(classifier, val_batches(), device)
            best_top1 = max(best_top1, accuracy["top1"])
            row.update(val_top1=accuracy["top1"], val_top5=accuracy["top5"])
            log(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val top-1 {accuracy['top1']:.2f}% "
                f"(best {best_top1:.2f}%)")
        history.append(row)
    return {"best_top1": best_top1, "history": history}


def _frozen_feature_batches(backbone: nn.Module, loader: DataLoader, device: torch.device, n_last_blocks: int,
                            avgpool: bool, amp: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in loader:
        # no_grad around the forward only: a context held across `yield` would switch off autograd for the caller
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            features = linear_features(backbone, images.to(device, non_blocking=True), n_last_blocks, avgpool)
        yield features.float(), labels


def train_transform(image_size: int) -> transforms.Compose:
    """The reference's linear-probe train augmentation: RandomResizedCrop(image_size), horizontal flip, normalize."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def linear_probe(backbone: nn.Module, train_dir: str, val_dir: str, image_size: int, device: torch.device | str,
                 n_last_blocks: int = 4, avgpool: bool = False, epochs: int = 100, batch_size: int = 256,
                 base_lr: float = 0.001, num_workers: int = 8, amp: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """The full protocol on two class-folder datasets; returns `train_linear_classifier`'s result."""
    device = torch.device(device)
    train_set = ImageFolderDataset(train_dir, train_transform(image_size))
    val_set = ImageFolderDataset(val_dir, eval_transform(image_size))
    if not train_set.classes or train_set.classes != val_set.classes:
        raise ValueError(f"{train_dir} and {val_dir} must hold the same class sub-folders")
    backbone.eval().requires_grad_(False).to(device)
    feature_dim = backbone.embed_dim * (n_last_blocks + int(avgpool))
    classifier = make_linear_classifier(feature_dim, len(train_set.classes))
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size, shuffle=True, num_workers=num_workers, pin_memory=pin,
                              drop_last=False)
    val_loader = DataLoader(val_set, batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin)
    return train_linear_classifier(
        classifier,
        lambda: _frozen_feature_batches(backbone, train_loader, device, n_last_blocks, avgpool, amp),
        lambda: _frozen_feature_batches(backbone, val_loader, device, n_last_blocks, avgpool, amp),
        epochs=epochs, lr=base_lr * batch_size / 256, device=device, log=log)


@report_usage_errors
def main(argv: Sequence[str] | None = None) -> dict:
    from fastdino.hub import add_backbone_arguments, backbone_from_arguments

    rules = {**backbone_option_rules(), "--train-dir": existing_folder, "--val-dir": existing_folder,
             "--image-size": RULES["eval.image_size"], "--n-last-blocks": positive, "--epochs": RULES["optim.epochs"],
             "--batch-size": positive, "--lr": RULES["optim.lr"], "--num-workers": RULES["data.num_workers"]}
    parser = CheckedArgumentParser(description="Linear probe of a frozen DINO backbone (the DINO paper's protocol).",
                                   rules=rules)
    add_backbone_arguments(parser)
    parser.add_argument("--train-dir", required=True, help="class folders of the training images")
    parser.add_argument("--val-dir", required=True, help="class folders of the validation images (same classes)")
    parser.add_argument("--image-size", type=int, default=224, help="crop size (val: resize to size*256/224 first)")
    parser.add_argument("--n-last-blocks", type=int, default=None,
                        help="CLS tokens of this many last blocks (default: 4 for vit_small/tiny, 1 for vit_base)")
    parser.add_argument("--avgpool", choices=("true", "false"), default=None,
                        help="add the mean patch token (default: true for vit_base, false otherwise)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.001, help="learning rate for batch 256, scaled linearly")
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--amp", action="store_true", help="backbone under bf16 autocast on CUDA")
    args = parser.parse_args(argv)

    default_blocks, default_avgpool = FEATURE_RULES.get(args.arch, (4, False))
    n_last_blocks = args.n_last_blocks if args.n_last_blocks is not None else default_blocks
    avgpool = default_avgpool if args.avgpool is None else args.avgpool == "true"
    backbone = backbone_from_arguments(args)
    result = linear_probe(backbone, args.train_dir, args.val_dir, args.image_size, args.device, n_last_blocks,
                          avgpool, args.epochs, args.batch_size, args.lr, args.num_workers, args.amp)
    print(f"linear probe: best val top-1 {result['best_top1']:.2f}%")
    return result


if __name__ == "__main__":
    main()
