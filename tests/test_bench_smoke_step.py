"""bench/bench_step.py --smoke: both contestants run, compute the same loss on the same batch, differ only in their
switches, and name the implementations that ran; fastdino in micro-batches and recomputing its blocks runs too; a
contestant that runs out of memory is a row of its own and is tried again at half the batch, and the file is
rewritten after every contestant."""
import json
import os

import pytest
import torch
from helpers import load_bench

INJECTED = "CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)"


def test_step_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "step.json"
    load_bench("bench_step").main(["--smoke", "--memory-rows", "--out", str(out)])
    report = json.loads(out.read_text())
    model = report["models"][0]
    losses = model["first_step_loss"]
    assert losses["fastdino"] == pytest.approx(losses["reference_style"], rel=1e-4)
    reference, fast = model["contestants"]["reference_style"], model["contestants"]["fastdino"]
    assert not any(reference["fast_paths"][k] for k in ("fused_loss", "fused_ema", "packed", "sync_free_clip"))
    assert all(fast["fast_paths"][k] for k in ("fused_loss", "fused_ema", "packed", "sync_free_clip"))
    # what ran, not what was asked for: on the CPU packed crops take the explicit-mask path, and the row says so
    assert reference["ran"] == {"attention": ["math"], "loss": ["reference"], "ema": ["per_parameter_loop"],
                                "optimizer": ["adamw_for_loop"]}
    assert "math_explicit_mask" in fast["ran"]["attention"] and "varlen_flash" not in fast["ran"]["attention"]
    assert fast["ran"]["loss"] == ["fused_triton"] and fast["ran"]["ema"] == ["fused_triton"]
    assert fast["ran"]["optimizer"] == ["adamw_fused"]
    assert model["comparison_batch"] == 2 == reference["batch"] == fast["batch"]
    assert fast["images_per_s"] > 0 and report["smoke"] is True and report["complete"]
    # the memory rows: the same first step as fastdino's (micro-batches and recomputation change no number), each
    # with the plan's prediction for its own settings
    rows = {row["name"]: row for row in model["memory_rows"]}
    assert set(rows) == {"micro_batches_2", "recompute_all_blocks"}  # 4 micro-batches do not divide the batch of 2
    for row in rows.values():
        assert row["first_step_loss"] == pytest.approx(losses["fastdino"], rel=1e-5) and row["batch"] == 2
    assert rows["micro_batches_2"]["planned_peak_gib"] != fast["planned_peak_gib"] > 0
    printed = capsys.readouterr().out
    assert "functional check (CPU smoke), not a measurement" in printed
    assert "images_per_s=" in printed and "speedup" not in printed and "_vs_fastdino" not in printed


@pytest.mark.parametrize("reference_fits_at", [1, None], ids=["fits-at-half", "never-fits"])
def test_a_contestant_out_of_memory_is_a_row_retried_at_half_the_batch(tmp_path, monkeypatch, reference_fits_at):
    module = load_bench("bench_step")
    train_step = module.Trainer.train_step

    def running_out(trainer, crops, *args, **kwargs):  # reference-style runs out of memory above its batch
        if not trainer.fast.fused_loss and (reference_fits_at is None or crops[0].shape[0] > reference_fits_at):
            raise torch.OutOfMemoryError(INJECTED)
        return train_step(trainer, crops, *args, **kwargs)

    writes = []
    write_report = module.write_report

    def noting_write(report, *args, **kwargs):
        writes.append(json.loads(json.dumps(report)))
        return write_report(report, *args, **kwargs)

    monkeypatch.setattr(module.Trainer, "train_step", running_out)
    monkeypatch.setattr(module, "write_report", noting_write)
    out = tmp_path / "step.json"
    module.main(["--smoke", "--out", str(out)])
    model = json.loads(out.read_text())["models"][0]
    attempts = [(row["name"], row["batch"], row.get("out_of_memory", False)) for row in model["attempts"]]
    if reference_fits_at:
        assert attempts == [("fastdino", 2, False), ("reference_style", 2, True), ("reference_style", 1, False),
                            ("fastdino", 1, False)]
        assert model["comparison_batch"] == 1
        assert [row["batch"] for row in model["contestants"].values()] == [1, 1]
        assert model["first_step_loss"]["fastdino"] == pytest.approx(model["first_step_loss"]["reference_style"],
                                                                     rel=1e-4)
    else:  # down to the floor (smoke: 1): no comparison, fastdino's row still there
        assert attempts == [("fastdino", 2, False), ("reference_style", 2, True), ("reference_style", 1, True)]
        assert model["comparison_batch"] is None and list(model["contestants"]) == ["fastdino"]
    assert INJECTED in model["attempts"][1]["error"]
    # rewritten after every contestant: the file held 1, 2, ... attempts before the run ended
    counts = [len(write["models"][0]["attempts"]) for write in writes if write["models"]]
    assert set(range(1, len(attempts) + 1)) <= set(counts)


@pytest.mark.skipif(not os.environ.get("FASTDINO_REFERENCE_REPO"),
                    reason="set FASTDINO_REFERENCE_REPO to a checkout of facebookresearch/dino")
def test_reference_repository_modules_compute_the_same_first_loss(tmp_path):
    """The reference's own ViT, head, loss and schedules from the same weights and batch give the same loss as the
    reference-style contestant: the baseline the speedups are measured against is faithful."""
    out = tmp_path / "step.json"
    load_bench("bench_step").main(["--smoke", "--reference-repo", os.environ["FASTDINO_REFERENCE_REPO"],
                                   "--out", str(out)])
    losses = json.loads(out.read_text())["models"][0]["first_step_loss"]
    assert losses["reference_repo"] == pytest.approx(losses["reference_style"], rel=1e-5)
