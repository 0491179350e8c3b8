"""The ViT backbone: checkpoint compatibility with timm / reference DINO, pos-embed interpolation, drop path."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from fastdino.models import build_vit, vit_base, vit_small, vit_tiny
from fastdino.models.drop_path import drop_path, efficient_residual, plain_residual


def small_vit(**kw):
    """A ViT small enough for CPU tests (patch 8, 2 blocks, 48 wide)."""
    return vit_tiny(patch_size=8, img_size=32, depth=2, embed_dim=48, num_heads=3, **kw)


def random_weights(state_dict):
    """Random tensors with the shapes of `state_dict` (no need for a real init to compare two implementations)."""
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) * 0.05 + (1.0 if k.endswith("norm1.weight") else 0.0)
            for k, v in state_dict.items()}


def on_meta(build):
    """Build a model without allocating or initializing weights (fast); load real ones with assign=True."""
    with torch.device("meta"):
        return build()


@pytest.mark.parametrize("factory, timm_name, patch", [(vit_small, "vit_small_patch8_224", 8),
                                                       (vit_base, "vit_base_patch16_224", 16)])
def test_state_dict_keys_and_shapes_equal_timm(factory, timm_name, patch):
    ours = on_meta(lambda: factory(patch_size=patch)).state_dict()
    theirs = on_meta(lambda: timm.create_model(timm_name, pretrained=False, num_classes=0)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("factory, timm_name, patch, depth", [(vit_small, "vit_small_patch8_224", 8, 12),
                                                              (vit_base, "vit_base_patch16_224", 16, 2)])
def test_cls_features_equal_timm_at_224(factory, timm_name, patch, depth):
    """Same weights -> same CLS feature; ViT-S/8 in full, ViT-B/16 with 2 blocks to keep the test fast."""
    ours = on_meta(lambda: factory(patch_size=patch, depth=depth)).eval()
    theirs = on_meta(lambda: timm.create_model(timm_name, pretrained=False, num_classes=0, depth=depth)).eval()
    weights = random_weights(ours.state_dict())
    ours.load_state_dict(weights, strict=True, assign=True)
    theirs.load_state_dict(weights, strict=True, assign=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # and back: timm / reference checkpoints load as they are
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected_tokens = theirs.forward_features(images)
        torch.testing.assert_close(ours(images), theirs.forward_head(expected_tokens, pre_logits=True),
                                   rtol=1e-5, atol=1e-5)
        if depth == 2:
            tokens = ours.get_intermediate_layers(images, n=1)[0]
            torch.testing.assert_close(tokens, expected_tokens, rtol=1e-5, atol=1e-5)


def test_architectures_and_attributes():
    for name, (dim, heads) in {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}.items():
        model = build_vit(name, patch_size=16, depth=1)
        assert (model.embed_dim, model.num_heads, model.patch_size) == (dim, heads, 16)
        assert model.pos_embed.shape == (1, 1 + 14 * 14, dim)
        assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6
    with pytest.raises(ValueError, match="vit_small"):
        build_vit("vit_huge")


def test_init_follows_reference():
    torch.manual_seed(0)
    model = vit_small(patch_size=16, depth=2)
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(model.pos_embed.std().item() - 0.02) < 2e-3
    assert torch.count_nonzero(qkv.bias) == 0 and torch.count_nonzero(model.blocks[1].mlp.fc2.bias) == 0
    assert torch.all(model.norm.weight == 1) and torch.count_nonzero(model.norm.bias) == 0


def test_bad_inputs_raise_clear_errors():
    model = small_vit()
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="num_heads"):
        vit_tiny(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="attention backend"):
        vit_tiny(attention="flash")


def reference_interpolate_pos_encoding(pos_embed, h, w, patch_size):
    """Transcription of the reference DINO formula (vision_transformer.py, interpolate_pos_encoding)."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    h0, w0 = h // patch_size + 0.1, w // patch_size + 0.1
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


@pytest.mark.parametrize("img_size, patch, h, w", [(224, 16, 96, 96), (224, 8, 96, 96), (64, 8, 48, 32),
                                                   (32, 8, 16, 16), (32, 8, 64, 48)])
def test_pos_embed_interpolation_matches_reference_formula(img_size, patch, h, w):
    torch.manual_seed(0)
    model = vit_tiny(patch_size=patch, img_size=img_size, depth=1, embed_dim=24, num_heads=3)
    images = torch.randn(2, 3, h, w)
    expected = model.patch_embed(images)
    expected = torch.cat((model.cls_token.expand(2, -1, -1), expected), dim=1)
    expected = expected + reference_interpolate_pos_encoding(model.pos_embed, h, w, patch)
    assert torch.equal(model.prepare_tokens(images), expected)
    # the 0.1 rule is not the same as resizing to the target size: make sure the test can tell them apart
    grid = model.pos_embed[:, 1:].reshape(1, img_size // patch, img_size // patch, -1).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(h // patch, w // patch), mode="bicubic")
    assert not torch.allclose(by_size.permute(0, 2, 3, 1).reshape(1, -1, 24), expected[:1, 1:] - model.patch_embed(
        images[:1]))


def test_training_resolution_uses_pos_embed_unchanged():
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    tokens = model.patch_embed(images)
    expected = torch.cat((model.cls_token.expand(2, -1, -1), tokens), dim=1) + model.pos_embed
    assert torch.equal(model.prepare_tokens(images), expected)


def math_last_attention(model, images):
    """Independent recomputation of the last block's attention weights from its parameters."""
    x = model.prepare_tokens(images)
    for block in model.blocks[:-1]:
        x = block(x)
    last = model.blocks[-1]
    y = F.layer_norm(x, (model.embed_dim,), last.norm1.weight, last.norm1.bias, eps=1e-6)
    qkv = y @ last.attn.qkv.weight.T + last.attn.qkv.bias
    batch, tokens, _ = y.shape
    head_dim = model.embed_dim // model.num_heads
    q, k, _ = qkv.reshape(batch, tokens, 3, model.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)


@pytest.mark.parametrize("attention", ["math", "sdpa", "auto"])
def test_last_selfattention(attention):
    torch.manual_seed(0)
    model = small_vit(attention=attention).eval()
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        attn = model.get_last_selfattention(images)
        assert attn.shape == (2, 3, 1 + 4 * 6, 1 + 4 * 6)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 25))
        torch.testing.assert_close(attn, math_last_attention(model, images))


def test_intermediate_layers():
    torch.manual_seed(0)
    model = small_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        layers = model.get_intermediate_layers(images, n=2)
        assert len(layers) == 2 and layers[0].shape == (2, 17, 48)
        torch.testing.assert_close(layers[-1][:, 0], model(images))
        first_block_only = model.norm(model.blocks[0](model.prepare_tokens(images)))
        torch.testing.assert_close(layers[0], first_block_only)


# ---- stochastic depth ----

def linear_branch(weight):
    """A residual branch whose output does not depend on which other samples are present."""
    return lambda x, seq_lens: torch.tanh(x @ weight)


def test_drop_path_rate_schedule():
    model = vit_tiny(depth=4, drop_path_rate=0.3)
    torch.testing.assert_close(torch.tensor([b.drop_prob for b in model.blocks]), torch.linspace(0, 0.3, 4))


@pytest.mark.parametrize("seq_lens", [None, [5, 3, 3, 5, 2]])
def test_efficient_drop_path_exact_when_nothing_dropped(seq_lens):
    torch.manual_seed(0)
    x = torch.randn(1, 18, 8) if seq_lens else torch.randn(4, 5, 8)
    branch = linear_branch(torch.randn(8, 8))
    expected = x + branch(x, seq_lens)
    for rate, training in [(0.0, True), (0.3, False)]:
        assert torch.equal(efficient_residual(x, branch, rate, training, seq_lens), expected)
        assert torch.equal(plain_residual(x, branch, rate, training, seq_lens), expected)


def test_efficient_drop_path_equals_reference_for_same_seed():
    # both draw floor(keep_prob + U) from the CPU generator: with one seed they drop the same rows
    weight = torch.randn(8, 8)
    branch = linear_branch(weight)
    for seed in range(5):
        x = torch.randn(16, 5, 8, requires_grad=True)
        torch.manual_seed(seed)
        reference = x + drop_path(branch(x, None), 0.4, training=True)
        (grad_reference,) = torch.autograd.grad(reference.square().sum(), x)
        torch.manual_seed(seed)
        efficient = efficient_residual(x, branch, 0.4, True, None)
        (grad_efficient,) = torch.autograd.grad(efficient.square().sum(), x)
        torch.testing.assert_close(efficient, reference)
        torch.testing.assert_close(grad_efficient, grad_reference)


def per_sample_max_abs(seq_lens, x):
    """[num_samples] max |x| over each sample (a row of a dense batch or a sequence of a packed one)."""
    if seq_lens is None:
        return x.flatten(1).abs().amax(1)
    return torch.stack([part.abs().max() for part in x[0].split(seq_lens)])


@pytest.mark.parametrize("residual", [plain_residual, efficient_residual])
@pytest.mark.parametrize("seq_lens", [None, [3, 5, 2, 4, 3, 3]])
def test_drop_path_distribution(residual, seq_lens):
    """Each sample is x or x + branch(x)/keep_prob; kept with probability keep_prob, independently of the others."""
    torch.manual_seed(0)
    drop_prob, draws = 0.25, 500
    x = torch.randn(1, 20, 4) if seq_lens else torch.randn(6, 3, 4)
    branch = linear_branch(torch.randn(4, 4))
    kept_out = x + branch(x, seq_lens) / (1 - drop_prob)
    outs = [residual(x, branch, drop_prob, True, seq_lens) for _ in range(draws)]
    kept = torch.stack([per_sample_max_abs(seq_lens, out - kept_out) < 1e-6 for out in outs]).float()
    dropped = torch.stack([per_sample_max_abs(seq_lens, out - x) == 0 for out in outs]).float()
    assert torch.all(kept + dropped == 1)
    standard_error = math.sqrt(0.75 * 0.25 / draws)
    assert torch.all((kept.mean(0) - 0.75).abs() < 4 * standard_error)
    # independence: pairs kept together at rate keep_prob²
    both = (kept[:, 0] * kept[:, 1]).mean().item()
    assert abs(both - 0.75 ** 2) < 4 * math.sqrt(0.5625 * 0.4375 / draws)
    # expectation equals the deterministic residual x + branch(x)
    torch.testing.assert_close(torch.stack(outs).mean(0), x + branch(x, seq_lens), atol=0.15, rtol=0)
