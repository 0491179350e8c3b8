"""Attention backends compute the same function; the packed (block-diagonal) path equals per-sequence attention."""
import math

import pytest
import torch

from fastdino.models.attention import (
    block_diagonal_mask,
    dense_attention,
    packed_attention,
    resolve_backend,
    xformers_usable,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def formula_attention(q, k, v):
    """softmax(q kᵀ / sqrt(d)) v for one batch of [B, N, heads, d] tensors, written out independently."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def random_qkv(batch, tokens, heads=3, head_dim=16, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, tokens, heads, head_dim, generator=generator, dtype=dtype, device=device)
            .requires_grad_() for _ in range(3)]


def values_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grad_out = torch.ones_like(out).mul_(torch.linspace(-1, 1, out.shape[1], device=out.device)[None, :, None, None])
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_dense_backends_equal_formula_values_and_grads(backend):
    q, k, v = random_qkv(2, 17, seed=1)
    got = values_and_grads(lambda *t: dense_attention(*t, backend=backend), q, k, v)
    expected = values_and_grads(formula_attention, q, k, v)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def per_sequence_attention(q, k, v, seq_lens):
    """Each packed sequence on its own, then concatenated: what the block-diagonal mask must give."""
    parts = [formula_attention(*(t[:, s:s + n] for t in (q, k, v)))
             for s, n in zip(torch.tensor([0] + seq_lens[:-1]).cumsum(0).tolist(), seq_lens)]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("chunk_tokens", [4096, 20])  # 20 splits the packed sequence into several mask chunks
def test_packed_equals_per_sequence(backend, chunk_tokens):
    seq_lens = [17, 17, 5, 5, 5, 9, 1, 17]
    q, k, v = random_qkv(1, sum(seq_lens), seed=2)
    got = values_and_grads(lambda *t: packed_attention(*t, seq_lens, backend=backend, chunk_tokens=chunk_tokens),
                           q, k, v)
    expected = values_and_grads(lambda *t: per_sequence_attention(*t, seq_lens), q, k, v)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_block_diagonal_mask_brute_force():
    seq_lens = [3, 1, 4]
    owner = [i for i, n in enumerate(seq_lens) for _ in range(n)]
    expected = torch.tensor([[a == b for b in owner] for a in owner])
    assert torch.equal(block_diagonal_mask(seq_lens), expected)


def test_packed_rejects_wrong_shape():
    q, k, v = random_qkv(1, 10)
    with pytest.raises(ValueError, match="sum\\(seq_lens\\)"):
        packed_attention(q, k, v, [4, 4])


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "math"
    assert resolve_backend("sdpa", cpu) == "sdpa"
    with pytest.raises(ValueError, match="auto, xformers, sdpa, math"):
        resolve_backend("flash", cpu)
    with pytest.raises(RuntimeError, match="xformers"):
        resolve_backend("xformers", cpu)


@pytest.mark.gpu
@needs_cuda
def test_auto_on_cuda_prefers_xformers_when_usable():
    expected = "xformers" if xformers_usable() else "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == expected


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["xformers", "sdpa"])
def test_cuda_backends_match_math_in_bf16(backend):
    if backend == "xformers" and not xformers_usable():
        pytest.skip("xformers not usable on this GPU")
    q, k, v = random_qkv(4, 197, heads=6, head_dim=64, dtype=torch.bfloat16, device="cuda", seed=3)
    expected = values_and_grads(formula_attention, *(t.float().detach().requires_grad_() for t in (q, k, v)))
    got = values_and_grads(lambda *t: dense_attention(*t, backend=backend), q, k, v)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)
    seq_lens = [197, 197, 37, 37, 37, 50]
    q, k, v = random_qkv(1, sum(seq_lens), heads=6, head_dim=64, dtype=torch.bfloat16, device="cuda", seed=4)
    expected = values_and_grads(lambda *t: per_sequence_attention(*t, seq_lens),
                                *(t.float().detach().requires_grad_() for t in (q, k, v)))
    got = values_and_grads(lambda *t: packed_attention(*t, seq_lens, backend=backend), q, k, v)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)
