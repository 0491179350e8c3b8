"""Test settings shared by the whole suite.

Triton kernels run on the CPU through the Triton interpreter when no GPU is present; the variable must be set
before triton is first imported, hence here at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
