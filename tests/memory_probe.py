"""Measure one training step's peak memory on the CPU, in a fresh process (run as a script by test_memory_plan.py;
another Trainer built earlier in the same process would free its blocks while the profiler counts): the allocator's
peak as bench.common.cpu_peak_bytes measures it, after two steps (the optimizer state exists from the first).
Prints {"measured": bytes, "planned": bytes} as JSON."""
import json
import sys
import tempfile
from pathlib import Path

import torch
from helpers import tiny_config, write_image_folder

from bench.common import cpu_peak_bytes, training_state
from fastdino.memory_plan import planned_for
from fastdino.trainer import Trainer


def main(overrides: list[str]) -> None:
    work = Path(tempfile.mkdtemp())
    images = write_image_folder(work / "images", count=16)
    trainer = Trainer(tiny_config(images, work / "run", "model.drop_path_rate=0", "optim.epochs=8", *overrides))
    data = trainer.config.data
    generator = torch.Generator().manual_seed(0)
    sizes = [data.global_crop_size] * 2 + [data.local_crop_size] * data.local_crops_number

    def batch():
        return [torch.randn(data.batch_size_per_gpu, 3, size, size, generator=generator) for size in sizes]

    for _ in range(2):
        trainer.train_step(batch())
    crops = batch()
    trainer.optimizer.zero_grad(set_to_none=True)  # freed before the profiler starts, which cannot see it freed
    measured = cpu_peak_bytes(lambda: trainer.train_step(crops), [*training_state(trainer), *crops])
    print(json.dumps({"measured": measured, "planned": planned_for(trainer).total}))


if __name__ == "__main__":
    main(sys.argv[1:])
