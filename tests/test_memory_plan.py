"""The memory plan: its prediction against the allocator's measured peak on the CPU for seven configs (within 20%),
which micro-batches and recomputed blocks `auto` chooses and when it gives up, the `fastdino plan` command, and
recomputing some blocks only (the gradients of no recomputation)."""
import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_image_folder

from fastdino import memory_plan
from fastdino.config import ConfigError, load_config
from fastdino.distributed import apply_activation_checkpointing
from fastdino.memory_plan import GiB, fit, plan_memory
from fastdino.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.batch_size_per_gpu=8", "data.global_crop_size=32", "data.local_crop_size=16", "model.depth=4",
         "model.out_dim=4096"]
CONFIGS = {
    "math attention": [*SMALL, "model.attention=math"],
    "sdpa attention": [*SMALL, "model.attention=sdpa"],
    "activation-heavy": ["model.attention=math", "data.batch_size_per_gpu=16", "data.global_crop_size=48",
                         "data.local_crop_size=16", "model.depth=2", "model.out_dim=1024", "data.local_crops_number=4"],
    "2 micro-batches": [*SMALL, "model.attention=math", "data.micro_batches=2"],
    "every block recomputed": [*SMALL, "model.attention=math", "distributed.activation_checkpointing=true"],
    "ViT-S/16, SGD": [*SMALL, "model.attention=sdpa", "optim.optimizer=sgd", "model.arch=vit_small",
                      "model.patch_size=16", "data.global_crop_size=64", "data.local_crop_size=32",
                      "model.out_dim=16384"],
    "ViT-S/8, 2 of 2 blocks": ["model.attention=math", "model.arch=vit_small", "model.patch_size=8",
                               "data.global_crop_size=64", "data.local_crop_size=32", "data.batch_size_per_gpu=4",
                               "model.depth=2", "distributed.activation_checkpointing=true",
                               "distributed.checkpointed_blocks=1"],
}


@pytest.mark.parametrize("name", CONFIGS)
def test_the_plan_is_within_20_percent_of_the_measured_peak(name):
    done = subprocess.run([sys.executable, str(REPO / "tests" / "memory_probe.py"), *CONFIGS[name]],
                          capture_output=True, text=True, cwd=REPO / "tests",
                          env={**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"})
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.8 <= figures["planned"] / figures["measured"] <= 1.2, figures


def test_auto_takes_the_fewest_micro_batches_then_the_fewest_recomputed_blocks():
    config = load_config(None, ["model.arch=vit_small", "data.batch_size_per_gpu=64", "model.depth=12"])
    options = dict(kernel="flash", compute_bytes=2)

    def total(micro, recomputed=0):
        trial = copy.deepcopy(config)
        trial.data.micro_batches = micro
        return plan_memory(trial, recomputed_blocks=recomputed, **options).total

    micro, recomputed = [1, 2, 4, 8, 16, 32, 64], list(range(13))
    assert total(1) > total(2) > total(4) > total(64) > total(64, 1) > total(64, 12)
    # recomputing the top block saves nothing once every block below it is recomputed: 11 of 12 peak as 12 do
    fewest_for_all = min(count for count in recomputed if total(64, count) <= total(64, 12))
    for budget, expected in [(total(1), (1, 0)), (total(2), (2, 0)), (total(2) * 1.0001, (2, 0)),
                             (total(64), (64, 0)), (total(64, 1), (64, 1)), (total(64, 12), (64, fewest_for_all))]:
        chosen = fit(config, budget / 0.9, micro, recomputed, **options)  # a 10% margin
        assert (chosen.micro_batches, chosen.recomputed_blocks) == expected, budget
    assert fit(config, total(2) * 0.9999 / 0.9, micro, [0], **options).micro_batches == 4  # the boundary, just below
    assert fit(config, total(64, 12) * 0.999 / 0.9, micro, recomputed, **options) is None


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", count=16)


def test_a_trainer_with_auto_uses_what_fits_and_says_so(images, tmp_path, monkeypatch, caplog):
    # activations that outweigh the weights: halving the micro-batch lowers the peak
    config = tiny_config(images, tmp_path / "run", "data.batch_size_per_gpu=8", "data.micro_batches=auto",
                         "distributed.activation_checkpointing=auto", "data.global_crop_size=48", "model.depth=2")
    options = dict(kernel="math", compute_bytes=4)
    whole, halves = copy.deepcopy(config), copy.deepcopy(config)
    whole.data.micro_batches, halves.data.micro_batches = 1, 2
    assert plan_memory(halves, **options).total < plan_memory(whole, **options).total
    budget = plan_memory(halves, **options).total / 0.9
    monkeypatch.setattr(memory_plan, "device_memory_bytes", lambda device: budget)
    with caplog.at_level(logging.INFO, logger="fastdino"):
        trainer = Trainer(config)
    assert (trainer.memory.micro_batches, trainer.memory.recomputed_blocks) == (2, 0)
    assert any(record.getMessage().startswith("8 images a process as 2 micro-batches, 0 blocks recomputed (auto: "
                                              "predicted peak") for record in caplog.records)
    trainer.train(stop_after_steps=1)
    monkeypatch.setattr(memory_plan, "device_memory_bytes", lambda device: 1000.0)
    with pytest.raises(ConfigError, match=r"^data.batch_size_per_gpu=8: predicted not to fit .* even at 1 image\(s\) "
                                          r"a micro-batch with 2 blocks recomputed"):
        Trainer(tiny_config(images, tmp_path / "other", "data.batch_size_per_gpu=8", "data.micro_batches=auto",
                            "distributed.activation_checkpointing=auto", "model.depth=2"))


def test_set_values_are_used_as_set_without_a_plan(images, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_plan, "device_memory_bytes", lambda device: 1000.0)  # would fit nothing
    trainer = Trainer(tiny_config(images, tmp_path / "run", "data.batch_size_per_gpu=8", "data.micro_batches=4",
                                  "distributed.activation_checkpointing=true"))
    assert (trainer.memory.micro_batches, trainer.memory.recomputed_blocks, trainer.memory.reason) == (4, 1, "as set")


def test_the_plan_command_prints_every_term_and_what_fits():
    done = subprocess.run([sys.executable, "-m", "fastdino", "plan", "configs/vit_base_p8.yaml",
                           "data.batch_size_per_gpu=64", "--memory", "80GiB"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("vit_base patch 8, 64 images a process as 1 micro-batch, 2 x 224 + 10 x 96 px crops, "
                               "bf16, flash attention")
    terms = {line.split("  ")[0] for line in lines[1:-3]}
    assert {"student weights", "saved activations", "head and loss", "optimizer state"} <= terms
    config = load_config(REPO / "configs/vit_base_p8.yaml", ["data.batch_size_per_gpu=64"])
    expected = plan_memory(config, kernel="flash", compute_bytes=2, fused_loss=True).total / GiB
    assert lines[-3].split()[:2] == ["total", f"{expected:.2f}"]
    assert lines[-2] == ("fits in 80 GiB" if expected <= 80 else "does not fit in 80 GiB")
    assert lines[-1].startswith("auto (10% margin): ")
    refused = subprocess.run([sys.executable, "-m", "fastdino", "plan", "configs/vit_base_p8.yaml", "--memory", "80"],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 0  # a bare number is GiB
    for bad in ("80x", "-1GiB", "0"):
        refused = subprocess.run([sys.executable, "-m", "fastdino", "plan", "configs/vit_base_p8.yaml", f"--memory={bad}"],
                                 capture_output=True, text=True, cwd=REPO)
        assert refused.returncode == 2 and refused.stderr == f"error: --memory={bad}: must be a size such as 80GiB\n"


@pytest.mark.parametrize("count, recomputed", [(1, [0]), (2, [0, 2]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (0, [0, 1, 2, 3])])
def test_some_blocks_recompute_spread_evenly_with_the_gradients_of_none(count, recomputed):
    from fastdino.models import DINOHead, MultiCropWrapper, vit_tiny

    torch.manual_seed(0)
    plain = MultiCropWrapper(vit_tiny(patch_size=8, depth=4, img_size=16, drop_path_rate=0.0),
                             DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16), packed=True)
    recomputing = copy.deepcopy(plain)
    apply_activation_checkpointing(recomputing.backbone, count)
    calls = [0] * 4
    for index, block in enumerate(recomputing.backbone.blocks):
        block.mlp.register_forward_pre_hook(lambda *args, index=index: calls.__setitem__(index, calls[index] + 1))
    crops = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size)) for size in (16, 16, 8)]
    plain(crops).square().mean().backward()
    loss = recomputing(crops).square().mean()
    loss.backward()
    assert [index for index, calls_made in enumerate(calls) if calls_made == 2] == recomputed  # packed: 1 forward
    for (name, expected), actual in zip(plain.named_parameters(), recomputing.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.compile
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the blocks is a CUDA path")
def test_some_blocks_recompute_under_compiled_blocks_with_the_gradients_of_none():
    from fastdino.models import DINOHead, MultiCropWrapper, vit_tiny

    def network(compiled: bool):
        torch.manual_seed(0)
        return MultiCropWrapper(vit_tiny(patch_size=8, depth=4, img_size=16, drop_path_rate=0.0,
                                         compile_blocks=compiled), DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16),
                                packed=True).cuda()

    plain, recomputing = network(False), network(True)
    recomputing.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(recomputing.backbone, 2)
    crops = [torch.randn(2, 3, size, size, device="cuda", generator=torch.Generator("cuda").manual_seed(size))
             for size in (16, 16, 8)]
    plain(crops).square().mean().backward()
    recomputing(crops).square().mean().backward()
    for (name, expected), actual in zip(plain.named_parameters(), recomputing.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)
