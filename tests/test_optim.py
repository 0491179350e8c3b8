"""Parameter groups, per-parameter clipping and last-layer freezing against the reference's loops."""
import copy

import pytest
import torch
from torch import nn

from fastdino.optim import (
    build_optimizer,
    cancel_last_layer_gradients_,
    clip_gradients_,
    clip_gradients_reference_,
    parameter_groups,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.fc = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.last_layer = nn.Linear(8, 3, bias=False)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        return self.last_layer(self.norm(self.fc(x + self.cls_token[0, 0])))


def test_parameter_groups_as_the_reference():
    model = Tiny()
    regularized, not_regularized = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in regularized["params"]) == ["cls_token", "fc.weight", "last_layer.weight"]
    assert sorted(names[id(p)] for p in not_regularized["params"]) == ["fc.bias", "norm.bias", "norm.weight"]
    assert not_regularized["weight_decay"] == 0.0


@pytest.mark.parametrize("clip", [0.05, 3.0])
def test_clip_equals_the_per_tensor_loop(clip):
    torch.manual_seed(0)
    model = Tiny()
    model(torch.randn(16, 4) * 5).square().sum().backward()
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    norms = clip_gradients_(model, clip)
    expected = clip_gradients_reference_(twin, clip)
    torch.testing.assert_close(norms, torch.tensor(expected), rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    clipped = [p.grad.norm().item() for p in model.parameters() if p.grad is not None]
    assert max(clipped) <= clip * (1 + 1e-5)


def test_a_cancelled_last_layer_gets_no_update():
    """While frozen (`StepSchedule.last_layer_frozen`, tested with the schedules) the last layer keeps its weights."""
    model = Tiny()
    model(torch.randn(2, 4)).sum().backward()
    cancel_last_layer_gradients_(model)
    assert model.last_layer.weight.grad is None and model.fc.weight.grad is not None
    before = model.last_layer.weight.clone()
    optimizer = build_optimizer(model)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    optimizer.step()
    assert torch.equal(model.last_layer.weight, before)
    assert optimizer.param_groups[0]["weight_decay"] != 0 and optimizer.param_groups[1]["weight_decay"] == 0
