"""Test settings shared by the whole suite.

Triton kernels run on the CPU through the Triton interpreter when no GPU is present; the variable must be set
before triton is first imported, hence here at collection time. The `gpu` marker selects the tests that check GPU
code paths: `bench/run_gpu.sh` runs `pytest -m gpu` on the device machine.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: checks a GPU code path when CUDA is present (run on the device machine "
                                       "by bench/run_gpu.sh; on CPU it skips or runs in the Triton interpreter)")
    config.addinivalue_line("markers", "compile: runs torch.compile, about a minute cold on a GPU (bench/run_gpu.sh "
                                       "runs these in its last stage, after every measurement)")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny tensors: torch's intra-op threads only add wake-up latency on a shared 2-core machine
    (`pytestmark = pytest.mark.usefixtures("one_cpu_thread")` in a module that wants it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
