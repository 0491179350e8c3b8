"""bench/bench_step.py --smoke: both contestants run, compute the same loss on the same batch, and differ only
in their switches."""
import importlib.util
import os
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_step.py"


def test_step_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "step.json"
    module.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    model = report["models"][0]
    losses = model["first_step_loss"]
    assert losses["fastdino"] == pytest.approx(losses["reference_style"], rel=1e-4)
    reference, fast = model["contestants"]["reference_style"]["fast_paths"], model["contestants"]["fastdino"]["fast_paths"]
    assert not any(reference[k] for k in ("fused_loss", "fused_ema", "packed", "sync_free_clip"))
    assert all(fast[k] for k in ("fused_loss", "fused_ema", "packed", "sync_free_clip"))
    assert model["contestants"]["fastdino"]["images_per_s"] > 0 and report["smoke"] is True and report["complete"]
    printed = capsys.readouterr().out
    assert "functional check (CPU smoke), not a measurement" in printed
    assert "images_per_s=" in printed and "speedup" not in printed


@pytest.mark.skipif(not os.environ.get("FASTDINO_REFERENCE_REPO"),
                    reason="set FASTDINO_REFERENCE_REPO to a checkout of facebookresearch/dino")
def test_reference_repository_modules_compute_the_same_first_loss(tmp_path):
    """The reference's own ViT, head, loss and schedules from the same weights and batch give the same loss as the
    reference-style contestant: the baseline the speedups are measured against is faithful."""
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "step.json"
    module.main(["--smoke", "--reference-repo", os.environ["FASTDINO_REFERENCE_REPO"], "--out", str(out)])
    losses = json.loads(out.read_text())["models"][0]["first_step_loss"]
    assert losses["reference_repo"] == pytest.approx(losses["reference_style"], rel=1e-5)
