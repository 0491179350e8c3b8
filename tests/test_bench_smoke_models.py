"""The attention and model benchmarks' CPU smoke modes run end to end and write JSON only where told."""
import json

from helpers import load_bench


def test_bench_attention_smoke(tmp_path, capsys):
    out = tmp_path / "attention.json"
    report = load_bench("bench_attention").main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == report["device"] and saved["git_commit"] and saved["versions"]["torch"]
    assert saved["smoke"] is True
    assert "functional check (CPU smoke), not a measurement" in capsys.readouterr().out
    rows = saved["results"]
    assert {(row["what"], row["backend"]) for row in rows} >= {("dense_fwd_bwd", "math"), ("dense_fwd_bwd", "sdpa"),
                                                                ("multicrop_fwd_bwd", "math")}
    assert {row.get("layout") for row in rows if row["what"] == "multicrop_fwd_bwd"} == {"per_resolution", "packed"}
    assert all(row["median_ms"] > 0 and row["rel_error_vs_math"] < 1e-5 for row in rows)


def test_bench_model_smoke(tmp_path, capsys):
    out = tmp_path / "model.json"
    load_bench("bench_model").main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert saved["smoke"] is True and "functional check (CPU smoke), not a measurement" in printed
    assert "images_per_s=" in printed and "mfu=" not in printed and "speedup" not in printed
    assert saved["model_flops_per_step"] > 0 and saved["measured_matmul_tflops"] > 0
    assert [row["variant"] for row in saved["results"]] == ["reference", "per_resolution", "packed"]
    assert all(row["median_ms"] > 0 and row["images_per_s"] > 0 and row["mfu"] > 0 for row in saved["results"])
