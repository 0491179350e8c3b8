"""The DINO projection head: MLP -> L2 normalization -> weight-normalized linear layer to `out_dim` prototypes."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g · v / ||v|| (norm per output row), as `torch.nn.utils.weight_norm`.

    Parameters are named `weight_g` [out, 1] and `weight_v` [out, in] like the reference's weight-norm hook, so its
    checkpoints load unchanged; here the weight is computed explicitly in `forward`.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        weight = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default init, as the reference's last layer
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(weight.norm(dim=1, keepdim=True))

    @property
    def weight(self) -> Tensor:
        """[out, in] effective weight; every row has norm |g|."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """[B, in_dim] features -> [B, out_dim] logits.

    The MLP is Linear-GELU(-Linear-GELU)*-Linear to `bottleneck_dim` (BatchNorm after each hidden Linear when
    `use_bn`); its keys are the reference's nn.Sequential indices (`mlp.0`, `mlp.2`, ...). The output of the MLP is
    L2-normalized, then projected by a weight-normalized layer whose norm g is fixed to 1 when `norm_last_layer`
    (which the DINO paper found stabilizes training).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            for layer_in in [in_dim] + [hidden_dim] * (nlayers - 2):
                layers.append(nn.Linear(layer_in, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.data.fill_(1.0)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
