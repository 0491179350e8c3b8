"""A training step makes no host synchronization: on a GPU, anything that makes the host wait for the device inside
`Trainer.train_step` stalls the pipeline. The only reads are the trainer's logging and monitor reads, which live
outside `train_step` (in `Trainer._train_until`).

On the CPU there is no device to wait for, so the CPU test records the operations that sync on a GPU: scalar
reads (`.item()`, `float()`, `bool()`, `if tensor:`), operations whose output size depends on the data (`nonzero`,
boolean-mask indexing, `repeat_interleave` without `output_size`, ...), and tensors made from Python data inside the
step (`torch.tensor(list)`): on a GPU those must be copied to the device, which blocks unless done from pinned memory
without blocking. The keep masks of stochastic depth are drawn from the CPU generator and copied that way (see
fastdino/models/drop_path.py); such copies, and reads with `.tolist()` or `.numpy()`, dispatch no operation on a CPU,
so the GPU test checks them with `torch.cuda.set_sync_debug_mode("error")`.
"""
import collections
import traceback
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_image_folder
from torch.utils._python_dispatch import TorchDispatchMode

from fastdino.trainer import Trainer

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense, aten.equal}
DATA_DEPENDENT_SIZE = {aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
                       aten.unique_consecutive, aten.bincount}
MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
FROM_PYTHON_DATA = {aten.lift_fresh, aten.lift_fresh_copy, aten.lift}
PROJECT = (str(Path(__file__).resolve().parents[1] / "fastdino"), str(Path(__file__).resolve().parents[1] / "kernels"))


def sync_kind(func, args, kwargs) -> str | None:
    """What makes `func(*args, **kwargs)` a host sync (or a host->device copy) on a GPU, or None."""
    packet = func.overloadpacket
    if packet in SCALAR_READS:
        return "scalar read"
    if packet in DATA_DEPENDENT_SIZE:
        return "output size read from the device"
    if func == aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if packet in MASK_INDEXING and any(
        index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1]
    ):
        return "boolean-mask indexing"
    if packet in FROM_PYTHON_DATA:
        return "tensor from Python data (a host->device copy)"
    return None


def where_in_project() -> str:
    """file:line of the innermost frame of fastdino's code, for the failure message."""
    frames = [frame for frame in traceback.extract_stack() if frame.filename.startswith(PROJECT)]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside fastdino"


class SyncRecorder(TorchDispatchMode):
    """Records every operation that would make the host wait for the device, and counts all operations."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func.overloadpacket] += 1
        kind = sync_kind(func, args, kwargs)
        if kind is not None:
            self.syncs.append(f"{func} ({kind}) at {where_in_project()}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


# two blocks: the drop-path rate grows from 0 at the first block, so a one-block model never drops anything
STEP_SETTINGS = ("model.depth=2", "model.drop_path_rate=0.1", "fast.fused_loss=true", "fast.fused_ema=true",
                 "fast.fused_adamw=true", "fast.sync_free_clip=true")


def trainer_and_crops(image_folder, output_dir, *settings):
    trainer = Trainer(tiny_config(image_folder, output_dir, *STEP_SETTINGS, *settings))
    crops, _ = next(iter(trainer.loader.epoch_iter(0)))
    trainer.train_step(crops)  # the first step creates the optimizer state
    return trainer, crops


# packed or per-resolution forward; efficient or reference stochastic depth (the dense reference, left out, draws on
# the device)
@pytest.mark.parametrize("packed, efficient", [("true", "true"), ("false", "true"), ("true", "false")])
def test_step_makes_no_host_sync(image_folder, tmp_path, packed, efficient):
    trainer, crops = trainer_and_crops(image_folder, tmp_path, f"fast.packed={packed}",
                                       f"fast.efficient_drop_path={efficient}")
    assert trainer.fast.packed == (packed == "true") and trainer.fast.fused_loss and trainer.fast.fused_ema
    for monitors in (False, True):  # the monitors are read outside train_step
        recorder = SyncRecorder()
        with recorder:
            output = trainer.train_step(crops, monitors=monitors)
        assert recorder.syncs == [], f"monitors={monitors}: " + "\n".join(recorder.syncs)
        assert recorder.ops[aten.rand] > 0, "stochastic depth did not run"
        if efficient == "true":
            assert recorder.ops[aten.index_add] > 0, "the efficient drop path did not run"
        assert (output.teacher_entropy is not None) == monitors


@pytest.mark.parametrize("planted, kind", [
    (lambda x: x.sum().item(), "scalar read"),
    (lambda x: float(x[0]), "scalar read"),
    (lambda x: bool(x.any()), "scalar read"),
    (lambda x: x.nonzero(), "output size"),
    (lambda x: x[x > 0], "boolean-mask indexing"),
    (lambda x: torch.repeat_interleave(x, torch.tensor([1, 2, 1])), "Python data"),
    (lambda x: torch.repeat_interleave(x, torch.full((3,), 2)), "without output_size"),
    (lambda x: torch.tensor([0, 2], device=x.device), "Python data"),
], ids=["item", "float", "bool", "nonzero", "mask-index", "lengths-from-list", "repeat-interleave", "tensor-from-list"])
def test_recorder_catches_each_kind(planted, kind):
    recorder = SyncRecorder()
    with recorder:
        planted(torch.arange(3.0))
    assert any(kind in sync for sync in recorder.syncs), recorder.syncs


def test_recorder_passes_sync_free_forms():
    values = torch.arange(3.0)
    recorder = SyncRecorder()
    with recorder:
        torch.repeat_interleave(values, torch.full((3,), 2), output_size=6)
        values.repeat_interleave(2)
        torch.argsort(values > 0, stable=True)[:2]
        values.index_select(0, torch.arange(2))
    assert recorder.syncs == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_make_no_host_sync(image_folder, tmp_path):
    trainer, crops = trainer_and_crops(image_folder, tmp_path, "device=cuda", "data.loader=torch", "fast.packed=true",
                                       "fast.efficient_drop_path=true")
    trainer.train_step(crops, monitors=True)  # caches of the paths taken with monitors
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for monitors in (False, True, False):
            trainer.train_step(crops, monitors=monitors)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(trainer.dino_loss.center).all()
