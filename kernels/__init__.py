"""Triton kernels of fastdino, each beside its plain-PyTorch reference (imported as `fastdino.kernels`)."""
