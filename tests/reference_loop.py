"""A transcription of the reference main_dino.py's training loop (facebookresearch/dino: `train_dino`,
`train_one_epoch`, `utils.get_params_groups`, `utils.cosine_scheduler`, `utils.clip_gradients`,
`utils.cancel_gradients_last_layer`, `utils.restart_from_checkpoint`, the `save_dict`), single process on the CPU,
written independently of fastdino: it makes and resumes checkpoints in the reference's format for the tests.

The networks are the reference's layout built from other parts: timm's transformer blocks, the reference's
position-embedding interpolation (tests/test_vit.py), a head with torch's legacy `weight_norm` hook as the reference's
(tests/test_head.py, `weight_g` registered before `weight_v`), and the reference's DINOLoss (tests/test_loss_module.py).
The student sits in a DDP-like `module` wrapper, so its keys carry `module.`. Deviations, all numerically neutral or
shape-only: the depth and head widths are the caller's (a tiny ViT), there is no stochastic depth (the tests set
drop_path_rate 0), and with use_fp16 the GradScaler runs on the CPU without autocast (scaling by powers of two is
exact in float32), which is what gives the checkpoint its real `fp16_scaler` entry.
"""
import argparse
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from test_head import reference_head
from test_loss_module import ReferenceDINOLoss
from test_vit import reference_interpolate_pos_encoding
from timm.models.vision_transformer import Block

WIDTHS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


def reference_args(**changes) -> argparse.Namespace:
    """main_dino.py's args with its parser's defaults, plus what `init_distributed_mode` adds, then `changes`."""
    args = argparse.Namespace(
        arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True, momentum_teacher=0.996,
        use_bn_in_head=False, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
        use_fp16=True, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64, epochs=100,
        freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-6, optimizer="adamw", drop_path_rate=0.1,
        global_crops_scale=(0.4, 1.0), local_crops_number=8, local_crops_scale=(0.05, 0.4),
        data_path="/path/to/imagenet/train/", output_dir=".", saveckp_freq=20, seed=0, num_workers=10,
        dist_url="env://", local_rank=0, rank=0, world_size=1, gpu=0)
    for name, value in changes.items():
        assert hasattr(args, name), name
        setattr(args, name, value)
    return args


class ReferenceViT(nn.Module):
    """vision_transformer.VisionTransformer's parameters in its registration order, and its forward (CLS token)."""

    def __init__(self, arch: str, patch_size: int, depth: int, img_size: int = 224):
        super().__init__()
        embed_dim, heads = WIDTHS[arch]
        self.patch_size = patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(embed_dim, heads, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(embed_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(len(x), -1, -1), tokens), dim=1)
        tokens = tokens + reference_interpolate_pos_encoding(self.pos_embed, x.shape[-2], x.shape[-1],
                                                             self.patch_size)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


class MultiCropWrapper(nn.Module):
    """utils.MultiCropWrapper: one backbone call per run of equal-resolution crops, the head once."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        sizes = torch.tensor([crop.shape[-1] for crop in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        start, output = 0, torch.empty(0)
        for end in ends:
            output = torch.cat((output, self.backbone(torch.cat(crops[start:end]))))
            start = end
        return self.head(output)


class DDP(nn.Module):
    """What DistributedDataParallel adds to the state dict: the `module.` prefix."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, crops):
        return self.module(crops)


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """utils.cosine_scheduler."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def get_params_groups(model: nn.Module) -> list[dict]:
    """utils.get_params_groups."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class ReferenceLoop:
    """train_dino's state and one iteration of train_one_epoch; `save` writes its save_dict, `restart_from` is
    utils.restart_from_checkpoint (stricter: every key must be used)."""

    def __init__(self, args: argparse.Namespace, steps_per_epoch: int, depth: int = 1, hidden_dim: int = 32,
                 bottleneck_dim: int = 16, seed: int = 0):
        assert args.drop_path_rate == 0, "the transcription has no stochastic depth"
        torch.manual_seed(seed)
        self.args, self.steps_per_epoch = args, steps_per_epoch

        def network(norm_last_layer: bool) -> MultiCropWrapper:
            backbone = ReferenceViT(args.arch, args.patch_size, depth)
            head = reference_head(WIDTHS[args.arch][0], args.out_dim, args.use_bn_in_head, 3, hidden_dim,
                                  bottleneck_dim)
            head.last_layer.weight_g.data.fill_(1)
            head.last_layer.weight_g.requires_grad = not norm_last_layer
            return MultiCropWrapper(backbone, head)

        self.student = DDP(network(args.norm_last_layer))
        teacher = network(True)
        self.teacher = DDP(teacher) if args.use_bn_in_head else teacher
        self.teacher_without_ddp = teacher
        teacher.load_state_dict(self.student.module.state_dict())
        for param in self.teacher.parameters():
            param.requires_grad = False
        temps = np.concatenate((np.linspace(args.warmup_teacher_temp, args.teacher_temp,
                                            args.warmup_teacher_temp_epochs),
                                np.ones(args.epochs - args.warmup_teacher_temp_epochs) * args.teacher_temp))
        self.dino_loss = ReferenceDINOLoss(args.out_dim, args.local_crops_number + 2, temps)
        self.dino_loss.center = torch.zeros(1, args.out_dim)  # the reference's float32 buffer
        self.optimizer = torch.optim.AdamW(get_params_groups(self.student))
        self.fp16_scaler = torch.amp.GradScaler("cpu") if args.use_fp16 else None
        total_batch = args.batch_size_per_gpu * args.world_size
        self.lr_schedule = cosine_scheduler(args.lr * total_batch / 256.0, args.min_lr, args.epochs, steps_per_epoch,
                                            warmup_epochs=args.warmup_epochs)
        self.wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
        self.momentum_schedule = cosine_scheduler(args.momentum_teacher, 1, args.epochs, steps_per_epoch)
        self.start_epoch = 0

    def train_step(self, images: list[torch.Tensor], it: int) -> float:
        """One iteration `it` (global) of train_one_epoch; returns loss.item()."""
        args, optimizer, scaler = self.args, self.optimizer, self.fp16_scaler
        epoch = it // self.steps_per_epoch
        for i, param_group in enumerate(optimizer.param_groups):
            param_group["lr"] = self.lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = self.wd_schedule[it]
        teacher_output = self.teacher(images[:2])
        student_output = self.student(images)
        loss = self.dino_loss(student_output, teacher_output, epoch)
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            if args.clip_grad:
                clip_gradients(self.student, args.clip_grad)
            cancel_gradients_last_layer(epoch, self.student, args.freeze_last_layer)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                clip_gradients(self.student, args.clip_grad)
            cancel_gradients_last_layer(epoch, self.student, args.freeze_last_layer)
            scaler.step(optimizer)
            scaler.update()
        with torch.no_grad():
            m = self.momentum_schedule[it]
            for param_q, param_k in zip(self.student.module.parameters(), self.teacher_without_ddp.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return loss.item()

    def save(self, path, epoch: int) -> None:
        """The save_dict written after epoch `epoch` (so its 'epoch' is the next one)."""
        save_dict = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "epoch": epoch + 1, "args": self.args,
                     "dino_loss": {"center": self.dino_loss.center}}
        if self.fp16_scaler is not None:
            save_dict["fp16_scaler"] = self.fp16_scaler.state_dict()
        torch.save(save_dict, path)

    def restart_from(self, path) -> None:
        """utils.restart_from_checkpoint with main_dino.py's objects; torch.load as on the reference's torch (a file
        the test wrote or exported, so trusted here)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        for key, module in (("student", self.student), ("teacher", self.teacher)):
            message = module.load_state_dict(checkpoint[key], strict=False)
            assert not message.missing_keys and not message.unexpected_keys, (key, message)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.fp16_scaler is not None and "fp16_scaler" in checkpoint:
            self.fp16_scaler.load_state_dict(checkpoint["fp16_scaler"])
        assert set(checkpoint["dino_loss"]) == {"center"}
        self.dino_loss.center = checkpoint["dino_loss"]["center"].clone()
        self.start_epoch = checkpoint["epoch"]


def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """utils.clip_gradients: each parameter's gradient norm capped separately."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """utils.cancel_gradients_last_layer."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None
