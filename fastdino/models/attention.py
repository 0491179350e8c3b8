"""Scaled dot-product attention with interchangeable backends.

Every backend computes the same function, softmax(q kᵀ / sqrt(head_dim)) v; `math` is the reference (the formula
written out, as in the original DINO code), `sdpa` is PyTorch's fused `scaled_dot_product_attention`, `xformers` is
xformers' memory-efficient kernel (CUDA only). `auto` picks xformers when it is installed and runs on the tensors'
device, PyTorch SDPA on other accelerators, and plain math on the CPU.

Two layouts are supported:
- dense: a batch of equal-length sequences, q/k/v `[B, N, heads, head_dim]`;
- packed: sequences of different lengths concatenated along the token axis, q/k/v `[1, T, heads, head_dim]` with
  `seq_lens` summing to T; each sequence attends only to itself (a block-diagonal mask). xformers takes the lengths
  directly (`BlockDiagonalMask`); `sdpa` on CUDA in fp16/bf16 uses PyTorch's variable-length flash attention
  (`torch.nn.attention.varlen.varlen_attn`, the same block-diagonal function); otherwise (CPU, fp32, `math`) the mask
  is built explicitly, chunk by chunk so that the mask and the score matrix stay small whatever the number of tokens.

The lengths are host integers; what the device needs of them is built without a host sync (this runs in every block
of every training step): per-token values from runs of equal lengths (one per crop resolution) with Python-scalar
arguments, and the sequence starts of the varlen kernels copied from pinned memory without blocking.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "math")

# Largest number of tokens whose block-diagonal mask is built at once by the sdpa/math packed path; a chunk always
# holds whole sequences, so a single sequence longer than this is still processed in one piece.
PACKED_CHUNK_TOKENS = 4096


@functools.cache
def xformers_error() -> str | None:
    """Why xformers' memory-efficient attention does not run on the current CUDA device; None when it runs.

    xformers may be installed without a working C++/CUDA extension (or without a GPU at all), so importing it is not
    enough: a tiny attention call is tried once and the answer is cached. The exception's text is kept, so that
    a benchmark can say why a fast path was left off rather than fall back in silence.
    """
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        return None
    except Exception as error:  # any failure (ImportError, missing kernels, unsupported GPU): its text is the answer
        return f"{type(error).__name__}: {error}"


def xformers_usable() -> bool:
    """True when xformers imports and its memory-efficient attention runs on the current CUDA device."""
    return xformers_error() is None


@functools.cache
def varlen_attention_error(device_index: int) -> str | None:
    """Why PyTorch's variable-length flash attention does not run on this CUDA device; None when it runs (tried
    once, cached; the exception's text is kept, as for xformers_error)."""
    try:
        q = torch.zeros(8, 1, 64, device=torch.device("cuda", device_index), dtype=torch.bfloat16)
        _torch_varlen_attention(q[None], q[None], q[None], [5, 3])
        return None
    except Exception as error:  # missing op, unsupported GPU architecture, no CUDA: its text is the answer
        return f"{type(error).__name__}: {error}"


def torch_varlen_usable(device_index: int) -> bool:
    """True when PyTorch's variable-length flash attention runs on this CUDA device."""
    return varlen_attention_error(device_index) is None


def _torch_varlen_attention(q: Tensor, k: Tensor, v: Tensor, seq_lens: Sequence[int]) -> Tensor:
    """Block-diagonal attention with PyTorch's flash varlen kernel; q, k, v [1, T, heads, head_dim] fp16/bf16."""
    from torch.nn.attention.varlen import varlen_attn

    starts = to_device_async(torch.tensor([0, *itertools.accumulate(seq_lens)], dtype=torch.int32), q.device)
    longest = max(seq_lens)
    out = varlen_attn(q[0].contiguous(), k[0].contiguous(), v[0].contiguous(), starts, starts, longest, longest)
    return out.unsqueeze(0)


def to_device_async(host: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on `device`, copied without blocking the host.

    A plain `.to(cuda)` from pageable memory waits until the stream has finished all the work queued before it (a host
    sync); from pinned memory with non_blocking the copy is only queued behind that work (xformers' masks do the same).
    """
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def per_token(values: Tensor, seq_lens: Sequence[int]) -> Tensor:
    """Per-sequence `values` [n, ...] repeated over each sequence's tokens -> [sum(seq_lens), ...], on values' device.

    Built run by run, with the lengths as Python scalars: `repeat_interleave` with a tensor of lengths would need
    the lengths on the device (an upload) and the output size from it (a sync). A packed multi-crop batch holds one
    run per crop resolution, so this is a few small ops.
    """
    pieces, first = [], 0
    for length, run in itertools.groupby(seq_lens):
        count = sum(1 for _ in run)
        pieces.append(values[first:first + count].repeat_interleave(length, dim=0))
        first += count
    return torch.cat(pieces)


def check_backend_name(backend: str) -> str:
    """Return `backend` if it is a known backend name, else raise a ValueError listing the valid ones."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to the concrete one used for tensors on `device` ('xformers', 'sdpa' or 'math')."""
    check_backend_name(backend)
    if backend == "auto":
        if device.type == "cuda" and xformers_usable():
            return "xformers"
        return "math" if device.type == "cpu" else "sdpa"
    if backend == "xformers" and not (device.type == "cuda" and xformers_usable()):
        raise RuntimeError(
            f"attention backend 'xformers' requested for tensors on {device}, but xformers' memory-efficient "
            "attention is not usable there (it needs CUDA and a working xformers build); use 'auto', 'sdpa' or 'math'"
        )
    return backend


def packed_kernel(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """What `packed_attention` runs for `backend` on tensors of `device` and `dtype`: 'xformers' (its block-diagonal
    bias), 'varlen_flash' (PyTorch's variable-length flash attention: sdpa on CUDA in fp16/bf16 where it runs), else
    'sdpa_mask' or 'math_mask' (an explicit block-diagonal mask: a reference path, not a fast one)."""
    backend = resolve_backend(backend, device)
    if backend == "xformers":
        return backend
    flash_shape = head_dim % 8 == 0 and head_dim <= 256
    if (backend == "sdpa" and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_shape
            and torch_varlen_usable(device.index or 0)):
        return "varlen_flash"
    return f"{backend}_mask"


def attention_probabilities(q: Tensor, k: Tensor) -> Tensor:
    """Softmax attention weights of the reference formula.

    q, k: `[B, N, heads, head_dim]` -> `[B, heads, N, N]` (rows sum to 1), in the input dtype.
    """
    scale = q.shape[-1] ** -0.5
    scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)) * scale
    return scores.softmax(dim=-1)


def _math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Reference attention on `[B, N, heads, head_dim]` tensors; `mask` `[N, N]` bool, True = may attend."""
    scale = q.shape[-1] ** -0.5
    scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.transpose(1, 2)).transpose(1, 2)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """Attention over a batch of equal-length sequences.

    q, k, v: `[B, N, heads, head_dim]` -> `[B, N, heads, head_dim]`, same dtype as q.
    """
    backend = resolve_backend(backend, q.device)
    if backend == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q, k, v)
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, None)
    return _math_attention(q, k, v, None)


def block_diagonal_mask(seq_lens: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """`[T, T]` bool mask, True where query and key tokens belong to the same sequence (T = sum(seq_lens))."""
    sequence_id = per_token(torch.arange(len(seq_lens), device=device), seq_lens)
    return sequence_id[:, None] == sequence_id[None, :]


def _chunks_of_whole_sequences(seq_lens: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split `seq_lens` into consecutive runs of at most `max_tokens` tokens (at least one sequence per run)."""
    chunks: list[list[int]] = [[]]
    tokens_in_chunk = 0
    for length in seq_lens:
        if chunks[-1] and tokens_in_chunk + length > max_tokens:
            chunks.append([])
            tokens_in_chunk = 0
        chunks[-1].append(length)
        tokens_in_chunk += length
    return chunks


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_lens: Sequence[int],
    backend: str = "auto",
    chunk_tokens: int = PACKED_CHUNK_TOKENS,
) -> Tensor:
    """Attention over sequences of different lengths packed into one: each sequence attends only to itself.

    q, k, v: `[1, T, heads, head_dim]` with `sum(seq_lens) == T` -> `[1, T, heads, head_dim]`.
    """
    if q.shape[0] != 1 or sum(seq_lens) != q.shape[1]:
        raise ValueError(
            f"packed attention expects q of shape [1, sum(seq_lens), heads, head_dim]; got {tuple(q.shape)} "
            f"with sum(seq_lens) = {sum(seq_lens)}"
        )
    kernel = packed_kernel(backend, q.device, q.dtype, q.shape[-1])
    if kernel == "xformers":
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        bias = BlockDiagonalMask.from_seqlens(list(seq_lens), device=q.device)
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    if kernel == "varlen_flash":
        return _torch_varlen_attention(q, k, v, seq_lens)
    attend = _sdpa_attention if kernel == "sdpa_mask" else _math_attention
    outputs, start = [], 0
    for chunk in _chunks_of_whole_sequences(seq_lens, chunk_tokens):
        end = start + sum(chunk)
        mask = block_diagonal_mask(chunk, q.device)
        outputs.append(attend(q[:, start:end], k[:, start:end], v[:, start:end], mask))
        start = end
    return torch.cat(outputs, dim=1)
