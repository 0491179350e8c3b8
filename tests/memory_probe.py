"""Measure one training step's peak memory on the CPU, in a fresh process (run as a script by test_memory_plan.py):
the bytes of every tensor alive when the step starts (weights, buffers, optimizer state, the batch), plus the
highest count of the CPU allocator's live bytes during the step, as the profiler's memory events report it. Prints
{"measured": bytes, "planned": bytes} as JSON."""
import json
import sys
import tempfile
from pathlib import Path

import torch
from helpers import tiny_config, write_image_folder
from torch.profiler import ProfilerActivity, profile

from fastdino.memory_plan import plan_memory
from fastdino.trainer import Trainer


def live_bytes(tensors) -> int:
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())


def main(overrides: list[str]) -> None:
    work = Path(tempfile.mkdtemp())
    images = write_image_folder(work / "images", count=16)
    trainer = Trainer(tiny_config(images, work / "run", "model.drop_path_rate=0", "optim.epochs=8", *overrides))
    data = trainer.config.data
    generator = torch.Generator().manual_seed(0)
    sizes = [data.global_crop_size] * 2 + [data.local_crop_size] * data.local_crops_number

    def batch():
        return [torch.randn(data.batch_size_per_gpu, 3, size, size, generator=generator) for size in sizes]

    for _ in range(2):  # the optimizer state exists from the first step on
        trainer.train_step(batch())
    crops = batch()
    trainer.optimizer.zero_grad(set_to_none=True)  # the profiler does not see blocks made before it freed
    state = [value for moments in trainer.optimizer.state.values() for value in moments.values()
             if isinstance(value, torch.Tensor)]
    before = live_bytes([*trainer.student.parameters(), *trainer.teacher.parameters(), *trainer.student.buffers(),
                         *trainer.teacher.buffers(), *state, *crops])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        trainer.train_step(crops)
    trace = work / "trace.json"
    profiler.export_chrome_trace(str(trace))
    peak = max(event["args"]["Total Allocated"] for event in json.loads(trace.read_text())["traceEvents"]
               if event.get("name") == "[memory]")
    config = trainer.config
    planned = plan_memory(config, kernel="math" if config.model.attention == "math" else "flash", compute_bytes=4,
                          recomputed_blocks=trainer.memory.recomputed_blocks)
    print(json.dumps({"measured": before + peak, "planned": planned.total}))


if __name__ == "__main__":
    main(sys.argv[1:])
