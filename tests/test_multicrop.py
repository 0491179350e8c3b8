"""Multi-crop wrapper: per-resolution (reference) and packed forwards give the same logits and gradients."""
import copy

import pytest
import torch

from fastdino.models import DINOHead, MultiCropWrapper, group_by_resolution, vit_tiny

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_wrapper(packed, attention="auto", drop_path_rate=0.0, efficient_drop_path=False, seed=0):
    torch.manual_seed(seed)
    backbone = vit_tiny(patch_size=8, img_size=32, depth=2, embed_dim=48, num_heads=3, attention=attention,
                        drop_path_rate=drop_path_rate, efficient_drop_path=efficient_drop_path)
    head = DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16)
    return MultiCropWrapper(backbone, head, packed=packed)


def make_crops(n_global, n_local, batch=3, global_size=32, local_size=16, device="cpu", dtype=torch.float32):
    generator = torch.Generator(device=device).manual_seed(1)
    sizes = [global_size] * n_global + [local_size] * n_local
    return [torch.randn(batch, 3, s, s, generator=generator, device=device, dtype=dtype) for s in sizes]


def logits_and_grads(wrapper, crops):
    logits = wrapper(crops)
    weights = torch.linspace(-1, 1, logits.numel(), device=logits.device).reshape(logits.shape)
    (logits.float() * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in wrapper.named_parameters() if p.grad is not None}
    return logits, grads


def assert_grads_close(grads, expected, tolerance):
    """Largest difference relative to the largest gradient of each tensor (sums over many rows with cancellation
    make element-wise relative errors meaningless for near-zero entries)."""
    assert grads.keys() == expected.keys()
    for name in grads:
        scale = expected[name].abs().max().clamp_min(1e-12)
        error = ((grads[name] - expected[name]).abs().max() / scale).item()
        assert error < tolerance, f"{name}: relative error {error:.2e}"


def test_per_resolution_equals_one_call_per_crop():
    wrapper = make_wrapper(packed=False).eval()
    crops = make_crops(2, 4)
    with torch.no_grad():
        expected = wrapper.head(torch.cat([wrapper.backbone(crop) for crop in crops]))
        torch.testing.assert_close(wrapper(crops), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
@pytest.mark.parametrize("n_local", [0, 2, 10])
def test_packed_equals_per_resolution(n_local, attention):
    reference = make_wrapper(packed=False, attention=attention)
    packed = make_wrapper(packed=True, attention=attention)
    packed.load_state_dict(reference.state_dict())
    crops = make_crops(2, n_local)
    expected_logits, expected_grads = logits_and_grads(reference, crops)
    logits, grads = logits_and_grads(packed, crops)
    assert logits.shape == (3 * (2 + n_local), 64)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, expected_grads, 1e-4)


def test_packed_mixed_resolution_order_and_non_square():
    """Resolutions need not be sorted: a run of equal sizes is one group, rows stay in input order."""
    reference, packed = make_wrapper(packed=False).eval(), make_wrapper(packed=True).eval()
    generator = torch.Generator().manual_seed(2)
    crops = [torch.randn(2, 3, h, w, generator=generator) for h, w in [(32, 32), (16, 16), (16, 16), (32, 24)]]
    assert [g.shape[0] for g in group_by_resolution(crops)] == [2, 4, 2]
    with torch.no_grad():
        torch.testing.assert_close(packed(crops), reference(crops), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("efficient", [False, True])
def test_packed_with_drop_path_is_exact_in_eval(efficient):
    reference = make_wrapper(packed=False, drop_path_rate=0.5).eval()
    packed = make_wrapper(packed=True, drop_path_rate=0.5, efficient_drop_path=efficient).eval()
    crops = make_crops(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(packed(crops), reference(crops), rtol=1e-5, atol=1e-5)


def test_packed_efficient_drop_path_trains():
    """Training mode: a forward + backward works with some crops dropped and gives finite gradients."""
    wrapper = make_wrapper(packed=True, drop_path_rate=0.5, efficient_drop_path=True).train()
    torch.manual_seed(3)
    logits, grads = logits_and_grads(wrapper, make_crops(2, 4))
    assert logits.shape == (18, 64) and torch.isfinite(logits).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_single_tensor_and_bad_input():
    wrapper = make_wrapper(packed=False).eval()
    crop = make_crops(1, 0)[0]
    with torch.no_grad():
        torch.testing.assert_close(wrapper(crop), wrapper([crop]))
    with pytest.raises(ValueError, match="empty"):
        wrapper([])
    with pytest.raises(ValueError, match="forward_packed"):
        MultiCropWrapper(torch.nn.Identity(), torch.nn.Identity(), packed=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n_local", [2, 10])
def test_packed_equals_per_resolution_bf16_cuda(n_local):
    reference = make_wrapper(packed=False).cuda()
    packed = copy.deepcopy(reference)
    packed.packed = True
    crops = make_crops(2, n_local, batch=4, global_size=64, local_size=32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected_logits, expected_grads = logits_and_grads(reference, crops)
        logits, grads = logits_and_grads(packed, crops)
    torch.testing.assert_close(logits.float(), expected_logits.float(), rtol=3e-2, atol=3e-2)
    assert_grads_close(grads, expected_grads, 5e-2)


@pytest.mark.gpu
@pytest.mark.compile
@needs_cuda
def test_compiled_blocks_match_eager_cuda():
    eager = make_wrapper(packed=True, efficient_drop_path=True).cuda()
    compiled_backbone = vit_tiny(patch_size=8, img_size=32, depth=2, embed_dim=48, num_heads=3,
                                 efficient_drop_path=True, compile_blocks=True).cuda()
    compiled_backbone.load_state_dict(eager.backbone.state_dict())
    compiled = MultiCropWrapper(compiled_backbone, copy.deepcopy(eager.head), packed=True)
    crops = make_crops(2, 4, device="cuda")
    expected_logits, expected_grads = logits_and_grads(eager, crops)
    logits, grads = logits_and_grads(compiled, crops)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert_grads_close(grads, expected_grads, 1e-3)
