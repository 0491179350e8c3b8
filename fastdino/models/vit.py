"""Vision Transformer as used by DINO (Dosovitskiy et al. 2021; Caron et al. 2021).

The parameter names and shapes are a public contract: they equal those of the reference DINO ViT and of timm's
`vit_*_patch*_224` models, so official DINO checkpoints load with `load_state_dict` unchanged.

Beyond the reference, a block can run a packed batch: crops of different resolutions concatenated into one sequence
`[1, T, D]` with per-crop lengths `seq_lens`, attention restricted to each crop (see attention.py), so that the linear
layers see one large token batch instead of one call per resolution.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastdino.models.attention import attention_probabilities, check_backend_name, dense_attention, packed_attention
from fastdino.models.drop_path import efficient_residual, plain_residual

LAYER_NORM_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention; `backend` names the attention implementation (attention.py)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = check_backend_name(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, N, D] -> q, k, v each [B, N, heads, head_dim]."""
        batch, tokens, dim = x.shape
        return self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).unbind(2)

    def forward(self, x: Tensor, seq_lens: Sequence[int] | None = None) -> Tensor:
        """x: [B, N, D] (dense) or [1, T, D] (packed, with `seq_lens`) -> same shape."""
        q, k, v = self._split_heads(x)
        if seq_lens is None:
            out = dense_attention(q, k, v, self.backend)
        else:
            out = packed_attention(q, k, v, seq_lens, self.backend)
        return self.proj(out.flatten(2))

    def attention_map(self, x: Tensor) -> Tensor:
        """Softmax attention weights [B, heads, N, N] of a dense batch x [B, N, D] (reference math)."""
        q, k, _ = self._split_heads(x)
        return attention_probabilities(q, k)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _mlp_branch(norm: nn.Module, mlp: nn.Module, x: Tensor) -> Tensor:
    return mlp(norm(x))


@functools.cache
def _compiled_mlp_branch() -> Callable[[nn.Module, nn.Module, Tensor], Tensor]:
    """One compiled function shared by all blocks: modules are arguments, so a copy of the model (a teacher made
    with deepcopy) never calls into the original's weights, and 12 blocks share one graph. Dynamic shapes because
    the token count varies with packing and drop path. Created on first use: importing the compiler is slow."""
    return torch.compile(_mlp_branch, dynamic=True)


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches.

    `efficient_drop_path` runs the branches only on kept samples (drop_path.py); `False` is the reference.
    `compile_mlp` runs the MLP branch (norm2 + MLP) through torch.compile.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        efficient_drop_path: bool = False,
        attention: str = "auto",
        compile_mlp: bool = False,
    ):
        super().__init__()
        self.compile_mlp = compile_mlp
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, attention)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_prob = drop_path
        self.residual = efficient_residual if efficient_drop_path else plain_residual

    def attention_branch(self, x: Tensor, seq_lens: Sequence[int] | None) -> Tensor:
        return self.attn(self.norm1(x), seq_lens)

    def mlp_branch(self, x: Tensor, seq_lens: Sequence[int] | None = None) -> Tensor:
        mlp_branch = _compiled_mlp_branch() if self.compile_mlp else _mlp_branch
        return mlp_branch(self.norm2, self.mlp, x)

    def forward(self, x: Tensor, seq_lens: Sequence[int] | None = None) -> Tensor:
        """x: [B, N, D] dense, or [1, T, D] packed with `seq_lens` (one entry per crop of one image)."""
        x = self.residual(x, self.attention_branch, self.drop_prob, self.training, seq_lens)
        return self.residual(x, self.mlp_branch, self.drop_prob, self.training, seq_lens)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: [B, 3, H, W] -> [B, (H/p)·(W/p), D] (row-major patch order)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


def interpolate_pos_embed(pos_embed: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """Resize a square grid of positional embeddings to grid_h × grid_w patches, the reference's way.

    pos_embed: [1, 1 + S², D] (CLS first) -> [1, 1 + grid_h·grid_w, D]. Bicubic with an explicit scale factor
    ((grid + 0.1) / S per axis; the 0.1 avoids floor() rounding a size down, DINO issue #8). The scale factor, not the
    output size, sets the sampling positions, so this differs slightly from size-based resizing; checkpoints expect
    this exact rule.
    """
    trained = pos_embed.shape[1] - 1
    side = int(math.sqrt(trained))
    if side * side != trained:
        raise ValueError(f"pos_embed holds {trained} patch positions, not a square grid")
    if grid_h == side and grid_w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos,
        scale_factor=((grid_h + 0.1) / math.sqrt(trained), (grid_w + 0.1) / math.sqrt(trained)),
        mode="bicubic",
    )
    if patch_pos.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"pos-embed interpolation produced {tuple(patch_pos.shape[-2:])}, not {(grid_h, grid_w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1)


class VisionTransformer(nn.Module):
    """ViT backbone returning the CLS token after the final norm.

    Args:
        img_size: training resolution; sets the positional-embedding grid (img_size // patch_size per side).
        attention: backend name, one of attention.ATTENTION_BACKENDS.
        efficient_drop_path: run residual branches only on kept samples (same distribution as the reference).
        compile_blocks: torch.compile each block's MLP branch (the token-wise part, ~2/3 of the FLOPs; compiled with
            dynamic shapes since token counts vary with packing and drop path). Attention stays eager because the
            packed sequence lengths change from step to step. Off by default so training starts in seconds.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        attention: str = "auto",
        efficient_drop_path: bool = False,
        compile_blocks: bool = False,
        in_chans: int = 3,
    ):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim, in_chans)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        # stochastic depth grows linearly with depth, from 0 at the first block to drop_path_rate at the last
        drop_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rate, efficient_drop_path, attention, compile_blocks)
            for rate in drop_rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def prepare_tokens(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, 1 + (H/p)(W/p), D]: patch tokens after a CLS token, plus positional embeddings."""
        if images.ndim != 4:
            raise ValueError(f"expected images of shape [B, C, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {self.patch_size}")
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + interpolate_pos_embed(self.pos_embed, height // self.patch_size, width // self.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> CLS features [B, D] after the final norm."""
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])  # LayerNorm is per token, so norming only the CLS token gives the same result

    def forward_packed(self, images: Sequence[Tensor]) -> Tensor:
        """CLS features of several batches of different resolutions, run as one packed sequence per block.

        images: tensors [B_i, 3, H_i, W_i], each of one resolution -> [sum B_i, D], rows in input order. Every image
        of every tensor is its own sequence: attention never mixes them, and drop path is drawn per image.
        A single tensor needs no packing and runs the dense path.
        """
        if len(images) == 1:
            return self.forward(images[0])
        tokens = [self.prepare_tokens(batch) for batch in images]
        shapes = [t.shape[:2] for t in tokens]
        seq_lens = [length for batch, length in shapes for _ in range(batch)]
        x = torch.cat([t.flatten(0, 1) for t in tokens]).unsqueeze(0)
        for block in self.blocks:
            x = block(x, seq_lens)
        # CLS tokens by views of each resolution's part: an index tensor would have to be copied to the device
        parts = x[0].split([batch * length for batch, length in shapes])
        return self.norm(torch.cat([part.unflatten(0, shape)[:, 0] for part, shape in zip(parts, shapes)]))

    def get_last_selfattention(self, images: Tensor) -> Tensor:
        """Attention weights of the last block, [B, heads, N, N] with N = 1 + number of patches (reference math)."""
        x = self.prepare_tokens(images)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        return last.attn.attention_map(last.norm1(x))

    def get_intermediate_layers(self, images: Tensor, n: int = 1) -> list[Tensor]:
        """Normed token outputs [B, N, D] of the last `n` blocks, oldest first (as the reference)."""
        x = self.prepare_tokens(images)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.blocks) - i <= n:
                outputs.append(self.norm(x))
        return outputs


ARCHITECTURES = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def _build(arch: str, patch_size: int, drop_path_rate: float, attention: str, img_size: int, **kw) -> VisionTransformer:
    # depth / embed_dim / num_heads in kw override the architecture's, for small test and demo variants
    config = {**ARCHITECTURES[arch], **kw}
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, drop_path_rate=drop_path_rate, attention=attention, **config
    )


def vit_tiny(
    patch_size: int = 16, drop_path_rate: float = 0.0, attention: str = "auto", img_size: int = 224, **kw
) -> VisionTransformer:
    """ViT-Tiny: 192 wide, 12 blocks, 3 heads."""
    return _build("vit_tiny", patch_size, drop_path_rate, attention, img_size, **kw)


def vit_small(
    patch_size: int = 16, drop_path_rate: float = 0.0, attention: str = "auto", img_size: int = 224, **kw
) -> VisionTransformer:
    """ViT-Small: 384 wide, 12 blocks, 6 heads."""
    return _build("vit_small", patch_size, drop_path_rate, attention, img_size, **kw)


def vit_base(
    patch_size: int = 16, drop_path_rate: float = 0.0, attention: str = "auto", img_size: int = 224, **kw
) -> VisionTransformer:
    """ViT-Base: 768 wide, 12 blocks, 12 heads."""
    return _build("vit_base", patch_size, drop_path_rate, attention, img_size, **kw)


def build_vit(arch: str, **kw) -> VisionTransformer:
    """Build a ViT by name ('vit_tiny', 'vit_small', 'vit_base'); keyword arguments as the factory functions."""
    factories = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}
    if arch not in factories:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(factories)}")
    return factories[arch](**kw)
