"""Where the Triton kernels can run: on CUDA tensors, or on CPU tensors under the Triton interpreter (tests)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors, one program at a time, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())
