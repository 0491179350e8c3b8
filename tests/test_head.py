"""DINO head: explicit weight norm equals torch's, reference key names load, last-layer norm frozen."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

from fastdino.models import DINOHead
from fastdino.models.head import WeightNormLinear


def test_weight_norm_linear_equals_torch_parametrization():
    torch.manual_seed(0)
    ours = WeightNormLinear(16, 10)
    ours.weight_g.data.uniform_(0.5, 2.0)
    theirs = parametrizations.weight_norm(nn.Linear(16, 10, bias=False))
    theirs.parametrizations.weight.original0.data.copy_(ours.weight_g.data)
    theirs.parametrizations.weight.original1.data.copy_(ours.weight_v.data)
    x = torch.randn(7, 16)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs)
    grad_out = torch.randn_like(out_ours)
    grads_ours = torch.autograd.grad(out_ours, [ours.weight_g, ours.weight_v], grad_out)
    params = theirs.parametrizations.weight
    grads_theirs = torch.autograd.grad(out_theirs, [params.original0, params.original1], grad_out)
    for g_ours, g_theirs in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(g_ours, g_theirs)


def reference_head(in_dim, out_dim, use_bn, nlayers, hidden_dim, bottleneck_dim):
    """The reference head's module layout, built independently with torch's (legacy) weight_norm hook."""
    if nlayers == 1:
        mlp = nn.Linear(in_dim, bottleneck_dim)
    else:
        layers = [nn.Linear(in_dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else [])
            layers += [nn.GELU()]
        mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
    head = nn.Module()
    head.mlp = mlp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated, but it is what the reference used
        head.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    head.forward = lambda x: head.last_layer(F.normalize(head.mlp(x), dim=-1))
    return head


@pytest.mark.parametrize("use_bn, nlayers", [(False, 3), (True, 3), (False, 1), (True, 2), (False, 4)])
def test_reference_checkpoint_loads_and_gives_same_output(use_bn, nlayers):
    torch.manual_seed(0)
    reference = reference_head(24, 50, use_bn, nlayers, hidden_dim=32, bottleneck_dim=16).eval()
    ours = DINOHead(24, 50, use_bn=use_bn, nlayers=nlayers, hidden_dim=32, bottleneck_dim=16).eval()
    reference_state = reference.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference_state.items()}
    ours.load_state_dict(reference_state, strict=True)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), reference(x))


def test_last_layer_norm_frozen_at_one():
    head = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=16)
    assert not head.last_layer.weight_g.requires_grad
    assert torch.all(head.last_layer.weight_g == 1) and head.last_layer.weight_g.shape == (50, 1)
    assert head.last_layer.weight_v.shape == (50, 16)
    # with g = 1 every prototype has unit norm, so the logits are cosine similarities (|logit| <= 1)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    assert head(torch.randn(8, 24)).abs().max() <= 1 + 1e-5
    trainable = DINOHead(24, 50, norm_last_layer=False, hidden_dim=32, bottleneck_dim=16)
    assert trainable.last_layer.weight_g.requires_grad and torch.all(trainable.last_layer.weight_g == 1)


def test_init_follows_reference():
    torch.manual_seed(0)
    head = DINOHead(384, 1000, hidden_dim=512, bottleneck_dim=256)
    assert abs(head.mlp[0].weight.std().item() - 0.02) < 1e-3
    assert all(torch.count_nonzero(head.mlp[i].bias) == 0 for i in (0, 2, 4))
    # the last layer keeps nn.Linear's default init (the reference applies trunc_normal before creating it)
    bound = 1 / 256 ** 0.5
    assert head.last_layer.weight_v.abs().max() <= bound
    assert head.last_layer.weight_v.std() > 0.5 * bound / 3 ** 0.5
