"""Data-parallel training on 2 CPU processes (gloo): FSDP2 and DDP steps equal the single-process step on the
whole batch, sharded clipping equals the unsharded one, FSDP resume is bit-identical, the sharded checkpoint
survives a kill mid-save, and the exported teacher loads into a plain ViT.

All 2-process scenarios run in one spawn (starting Python with torch costs seconds); each writes its results
under the work folder and the tests below check them against single-process references computed here.
"""
import json
import multiprocessing
import os
import signal
import time

import helpers
import numpy as np
import pytest
import torch
import torch.distributed as dist

from fastdino import sharded_checkpoint
from fastdino.checkpoint import CheckpointError
from fastdino.distributed import DistributedContext
from fastdino.export import export_teacher
from fastdino.models import DINOHead, MultiCropWrapper, vit_tiny
from fastdino.trainer import Trainer

WORLD = 2
BATCH_PER_RANK = 4
# SGD: its update is proportional to the gradient, so a wrongly scaled or reduced gradient shows (AdamW would
# normalize most of such an error away). Sharded AdamW is elementwise on the shards; the resume test runs it.
STEP_SETTINGS = ("model.drop_path_rate=0.0", "optim.warmup_epochs=0", "optim.freeze_last_layer=0", "optim.lr=1.0",
                 "optim.optimizer=sgd", "model.depth=2", "optim.clip_grad=0.5")


def tiny_config(data_path, output_dir, *extra):
    return helpers.tiny_config(data_path, output_dir, f"data.batch_size_per_gpu={BATCH_PER_RANK}",
                               "monitor_every=0", *extra)


def fixed_batch(step, batch):
    """2 global 16² crops and 2 local 8² crops of `batch` images, the same in every process."""
    generator = torch.Generator().manual_seed(100 + step)
    sizes = (16, 16, 8, 8)
    return [torch.randn(batch, 3, size, size, generator=generator) for size in sizes]


def probe_images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------ what each rank does
def run_name(strategy, micro_batches, recomputed_blocks):
    return f"{strategy}_{micro_batches}" + (f"_recompute{recomputed_blocks}" if recomputed_blocks else "")


def scenario_step(ctx, work, data, strategy, micro_batches=1, recomputed_blocks=0):
    """Two steps on this rank's slice of fixed batches, in `micro_batches` pieces, with `recomputed_blocks` of the
    student's blocks recomputed; then the full weights, the center and the gradient reductions each step made (rank 0
    saves)."""
    from fastdino.distributed import full_state_dict

    # micro-batches with packed crops, the GPU default: FSDP2 reduce-scatters a block once per use in a backward, so
    # with one forward per crop size the last micro-batch would reduce each block twice (README)
    packed = "fast.packed=true" if micro_batches > 1 else "fast.packed=false"
    recompute = [f"distributed.activation_checkpointing={str(bool(recomputed_blocks)).lower()}",
                 f"distributed.checkpointed_blocks={recomputed_blocks}"]
    name = run_name(strategy, micro_batches, recomputed_blocks)
    trainer = Trainer(tiny_config(data, work / f"run_{name}", f"distributed.strategy={strategy}",
                                  f"data.micro_batches={micro_batches}", packed, *recompute, *STEP_SETTINGS), ctx)
    assert trainer.memory.recomputed_blocks == recomputed_blocks
    assert trainer.strategy == strategy
    reductions = count_gradient_reductions(trainer.student)
    rows = slice(ctx.rank * BATCH_PER_RANK, (ctx.rank + 1) * BATCH_PER_RANK)
    losses = []
    for step in range(2):
        crops = [crop[rows] for crop in fixed_batch(step, WORLD * BATCH_PER_RANK)]
        losses.append(ctx.mean(trainer.train_step(crops).loss.detach()).item())
    state = {"student": full_state_dict(trainer.student), "teacher": full_state_dict(trainer.teacher),
             "center": trainer.dino_loss.center.clone(), "losses": losses, "reductions": reductions}
    if ctx.is_main:
        torch.save(state, work / f"step_{name}.pt")
    return trainer


def count_gradient_reductions(student) -> list[int]:
    """A list that grows by one for each collective that reduces gradients: DDP's bucket all-reduces (a comm hook),
    FSDP2's reduce-scatters (the torch.distributed calls it makes)."""
    calls = []
    if isinstance(student, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counted_hook(state, bucket):
            calls.append(1)
            return allreduce_hook(state, bucket)

        student.register_comm_hook(None, counted_hook)
        return calls
    for name in ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter"):  # the first is torch >= 2.12's
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return calls


def scenario_export(ctx, work, trainer):
    """Teacher features and logits inside the FSDP model, and the two exports (rank 0 saves)."""
    features = {}
    hook = trainer.teacher.backbone.register_forward_hook(lambda module, args, output: features.update(cls=output))
    with torch.no_grad():
        logits = trainer.teacher([probe_images()])
    hook.remove()
    export_teacher(trainer, work / "backbone.pth")
    export_teacher(trainer, work / "teacher.pth", include_head=True)
    if ctx.is_main:
        torch.save({"features": features["cls"], "logits": logits}, work / "inside.pt")


def scenario_clip(ctx, work):
    """Per-parameter clipping on FSDP-sharded gradients against the reference loop on the full gradients."""
    import copy

    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fastdino.distributed import apply_fsdp
    from fastdino.optim import clip_gradients_, clip_gradients_reference_

    torch.manual_seed(0)
    plain = MultiCropWrapper(vit_tiny(patch_size=8, depth=2, img_size=16), DINOHead(192, 64, hidden_dim=32,
                                                                                   bottleneck_dim=16))
    sharded = apply_fsdp(copy.deepcopy(plain), ctx.mesh(), MixedPrecisionPolicy())
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plain([images]).square().mean().backward()
    sharded([images[ctx.rank * 2:(ctx.rank + 1) * 2]]).square().mean().backward()
    full_norms = torch.stack([p.grad.norm() for p in plain.parameters() if p.grad is not None])
    max_norm = full_norms.median().item()  # about half of the parameters get clipped
    norms = clip_gradients_(sharded, max_norm)
    reference_norms = torch.tensor(clip_gradients_reference_(plain, max_norm))
    grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters() if p.grad is not None}
    if ctx.is_main:
        expected = {name: p.grad for name, p in plain.named_parameters() if p.grad is not None}
        torch.save({"norms": norms, "reference_norms": reference_norms, "grads": grads, "expected": expected,
                    "max_norm": max_norm}, work / "clip.pt")


def scenario_resume(ctx, work, data):
    """FSDP: 8 steps straight through, against 3 steps, a stop, a new Trainer that resumes, and 5 more."""
    from fastdino.distributed import local_tensor

    settings = ("distributed.strategy=fsdp", "data.batch_size_per_gpu=2", "checkpoint_every=1")
    straight = Trainer(tiny_config(data, work / "straight", *settings), ctx)
    straight.train()
    first = Trainer(tiny_config(data, work / "resumed", *settings), ctx)
    first.train(stop_after_steps=3)
    second = Trainer(tiny_config(data, work / "resumed", *settings), ctx)
    resumed_at = second.step
    second.train()

    def local(trainer):  # this rank's shards, compared bit for bit
        return {
            "student": {k: v.to_local() for k, v in trainer.student.state_dict().items()},
            "teacher": {k: v.to_local() for k, v in trainer.teacher.state_dict().items()},
            "optimizer": {name: {key: local_tensor(value) for key, value in moments.items()}
                          for name, moments in trainer.state_dict()["optimizer"]["state"].items()},
            "center": trainer.dino_loss.center,
        }

    torch.save({"straight": local(straight), "resumed": local(second), "steps": (straight.step, second.step),
                "resumed_at": resumed_at}, work / f"resume_rank{ctx.rank}.pt")


def _scenarios(ctx, work, data):
    fsdp_trainer = scenario_step(ctx, work, data, "fsdp")
    scenario_export(ctx, work, fsdp_trainer)
    scenario_step(ctx, work, data, "ddp")
    for strategy in ("fsdp", "ddp"):
        scenario_step(ctx, work, data, strategy, micro_batches=2)
    scenario_step(ctx, work, data, "fsdp", micro_batches=2, recomputed_blocks=1)  # 1 of the 2 blocks
    scenario_clip(ctx, work)
    scenario_resume(ctx, work, data)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs every 2-process scenario once; returns (work folder, image folder)."""
    work = tmp_path_factory.mktemp("distributed")
    data = helpers.write_image_folder(work / "images")
    helpers.run_on_two_ranks(_scenarios, work, data)
    return work, data


# ------------------------------------------------------------------ checks against single-process references
def single_process_reference(data, output_dir):
    """The same two steps in one process on the whole batch (world size 1, batch 2b)."""
    trainer = Trainer(tiny_config(data, output_dir, "distributed.strategy=none",
                                  f"data.batch_size_per_gpu={WORLD * BATCH_PER_RANK}", *STEP_SETTINGS))
    losses = [trainer.train_step(fixed_batch(step, WORLD * BATCH_PER_RANK)).loss.item() for step in range(2)]
    return trainer, losses


@pytest.fixture(scope="module")
def reference(two_ranks, tmp_path_factory):
    _, data = two_ranks
    return single_process_reference(data, tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("strategy, micro_batches, recomputed_blocks",
                         [("fsdp", 1, 0), ("ddp", 1, 0), ("fsdp", 2, 0), ("ddp", 2, 0), ("fsdp", 2, 1)])
def test_two_ranks_step_equals_one_rank_on_the_whole_batch(strategy, micro_batches, recomputed_blocks, two_ranks,
                                                           reference):
    work, _ = two_ranks
    trainer, losses = reference
    got = torch.load(work / f"step_{run_name(strategy, micro_batches, recomputed_blocks)}.pt")
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    for network in ("student", "teacher"):
        expected = getattr(trainer, network).state_dict()
        assert got[network].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[network][name], value, rtol=1e-5, atol=2e-6, msg=f"{network}.{name}")
    # meaningful only if the steps moved the weights: student and teacher started equal
    student, teacher = trainer.student.state_dict(), trainer.teacher.state_dict()
    assert sum(not torch.equal(student[name], teacher[name]) for name in student) > len(student) // 2
    torch.testing.assert_close(got["center"], trainer.dino_loss.center, rtol=1e-5, atol=1e-7)
    assert trainer.dino_loss.center.abs().sum() > 0


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_micro_batches_reduce_gradients_once_per_step(strategy, two_ranks):
    work, _ = two_ranks
    whole, split = (torch.load(work / f"step_{run_name(strategy, micro, 0)}.pt")["reductions"] for micro in (1, 2))
    assert len(whole) > 0 and len(split) == len(whole)


def test_sharded_per_parameter_clipping_equals_unsharded(two_ranks):
    work, _ = two_ranks
    got = torch.load(work / "clip.pt")
    torch.testing.assert_close(got["norms"], got["reference_norms"], rtol=1e-5, atol=1e-7)
    clipped = (got["reference_norms"] > got["max_norm"]).sum().item()
    assert 0 < clipped < len(got["reference_norms"])  # some clipped, some not
    assert got["grads"].keys() == got["expected"].keys()
    for name, grad in got["grads"].items():
        expected = got["expected"][name]  # fp32 sums in another order: tolerance relative to the tensor's scale
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=name)


def test_fsdp_stop_and_resume_is_bit_identical(two_ranks):
    work, _ = two_ranks
    for rank in range(WORLD):
        got = torch.load(work / f"resume_rank{rank}.pt")
        assert got["steps"] == (8, 8) and got["resumed_at"] == 3
        straight, resumed = got["straight"], got["resumed"]
        for part in ("student", "teacher"):
            for name, value in straight[part].items():
                assert torch.equal(value, resumed[part][name]), f"rank {rank}: {part}.{name} differs"
        assert straight["optimizer"].keys() == resumed["optimizer"].keys()
        for name, moments in straight["optimizer"].items():
            for key, value in moments.items():
                assert torch.equal(value, resumed["optimizer"][name][key]), f"rank {rank}: optimizer {name}.{key}"
        assert torch.equal(straight["center"], resumed["center"])
    def rows(run):
        lines = (work / run / "log.jsonl").read_text().splitlines()
        return [(row["step"], row["loss"]) for row in map(json.loads, lines)]

    assert rows("straight") == rows("resumed") and len(rows("straight")) == 8  # same data order, same losses
    assert (work / "resumed" / sharded_checkpoint.SHARDED_DIR / ".metadata").is_file()
    assert not (work / "resumed" / "checkpoint.pth").exists()


def test_exported_teacher_loads_into_a_plain_vit(two_ranks):
    work, _ = two_ranks
    inside = torch.load(work / "inside.pt")
    backbone = vit_tiny(patch_size=8, depth=2)  # the reference's 224 px position grid, whatever the crop size
    backbone.load_state_dict(torch.load(work / "backbone.pth", weights_only=True), strict=True)
    network = MultiCropWrapper(vit_tiny(patch_size=8, depth=2),
                               DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16))
    network.load_state_dict(torch.load(work / "teacher.pth", weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(backbone(probe_images()), inside["features"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(network([probe_images()]), inside["logits"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ atomic sharded checkpoints (one process)
def _save_then_hang(path, state, started):
    """Child: write a big sharded checkpoint; stop forever just before publishing it."""
    def hang(*args):
        started.set()
        time.sleep(600)

    sharded_checkpoint._publish = hang
    sharded_checkpoint.save_sharded(state, path, DistributedContext.single())


@pytest.mark.parametrize("kill_while", ["writing", "publishing"])
def test_kill_during_sharded_save_keeps_previous_checkpoint(tmp_path, kill_while):
    path = tmp_path / sharded_checkpoint.SHARDED_DIR
    previous = {"weights": torch.arange(10.0), "step": 1, "rng": [{"seed": 1}]}
    sharded_checkpoint.save_sharded(previous, path, DistributedContext.single())
    big = {"weights": torch.randn(32, 1024, 1024), "step": 2, "rng": [{"seed": 2}]}
    started = multiprocessing.get_context("fork").Event()
    writer = multiprocessing.get_context("fork").Process(target=_save_then_hang, args=(path, big, started))
    writer.start()
    staging = tmp_path / f".{path.name}.tmp"
    deadline = time.time() + 60
    ready = (lambda: staging.is_dir()) if kill_while == "writing" else started.is_set
    while not ready() and time.time() < deadline:
        time.sleep(0.002)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert staging.is_dir(), "the writer never started writing"
    found = sharded_checkpoint.find_resume_checkpoint(tmp_path)
    assert found == path
    loaded = sharded_checkpoint.load_sharded(found, {"weights": torch.zeros(10), "step": 0})
    assert loaded["step"] == 1 and torch.equal(loaded["weights"], previous["weights"])
    assert loaded["rng"] == previous["rng"]


def test_save_cut_between_renames_resumes_from_the_previous(tmp_path):
    path = tmp_path / sharded_checkpoint.SHARDED_DIR
    sharded_checkpoint.save_sharded({"weights": torch.ones(3), "step": 5, "rng": []}, path, DistributedContext.single())
    os.rename(path, tmp_path / f".{path.name}.old")  # the first rename of the next save happened, the second did not
    found = sharded_checkpoint.find_resume_checkpoint(tmp_path)
    assert found == tmp_path / f".{path.name}.old"
    assert sharded_checkpoint.load_sharded(found, {"weights": torch.zeros(3), "step": 0})["step"] == 5
    sharded_checkpoint.save_sharded({"weights": torch.ones(3), "step": 6, "rng": []}, path, DistributedContext.single())
    assert sharded_checkpoint.find_resume_checkpoint(tmp_path) == path
    assert not (tmp_path / f".{path.name}.old").exists()


def test_incomplete_directory_is_refused(tmp_path):
    (tmp_path / "broken").mkdir()
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        sharded_checkpoint.load_sharded(tmp_path / "broken", {})


# ------------------------------------------------------------------ activation checkpointing (one process)
def test_activation_checkpointing_keeps_names_and_gradients():
    import copy

    from fastdino.distributed import apply_activation_checkpointing

    torch.manual_seed(0)
    plain = MultiCropWrapper(vit_tiny(patch_size=8, depth=2, img_size=16, drop_path_rate=0.0),
                             DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16))
    recomputing = copy.deepcopy(plain)
    apply_activation_checkpointing(recomputing.backbone)
    assert [n for n, _ in recomputing.named_parameters()] == [n for n, _ in plain.named_parameters()]
    calls = []
    # a pre-hook: the recomputation stops early, once the last stored tensor it needs is rebuilt
    recomputing.backbone.blocks[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    crops = fixed_batch(0, 2)
    plain(crops).square().mean().backward()
    loss = recomputing(crops).square().mean()
    forward_calls = len(calls)  # one per crop resolution
    loss.backward()
    assert forward_calls == 2 and len(calls) == 4  # the backward ran the block again instead of storing it
    for (name, expected), actual in zip(plain.named_parameters(), recomputing.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------ the benchmark's CPU smoke mode
def test_bench_fsdp_smoke(tmp_path):
    bench = helpers.load_bench("bench_fsdp")
    report = bench.main(["--smoke", "--out", str(tmp_path / "fsdp.json")])
    assert not dist.is_initialized()  # the benchmark's world of one is gone again
    saved = json.loads((tmp_path / "fsdp.json").read_text())
    assert saved["device"] == report["device"] and saved["device"].startswith("cpu")
    variants = {row["variant"]: row for row in saved["results"]}
    assert set(variants) == set(bench.VARIANTS) and variants["fsdp"]["sharded"] and not variants["ddp"]["sharded"]
    assert all(row["step_ms"] > 0 for row in variants.values())
    memory = saved["memory"]["tiny"]
    # student weights + grads + two AdamW moments + teacher weights, all fp32: 5 x 4 bytes per parameter
    assert memory["bytes_per_parameter"] == pytest.approx(20, abs=0.1)
    per_gpu = {row["world_size"]: row["fsdp_state_gib_per_gpu"] for row in memory["projection"]}
    assert per_gpu[8] == pytest.approx(per_gpu[1] / 8)
