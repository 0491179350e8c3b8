"""The kernel benchmark's CPU smoke mode runs end to end, checks fused == reference, writes only where told, and
rewrites its file after every row (a stage cut off keeps the rows it measured)."""
import json

import pytest
from helpers import load_bench


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bench_kernels_smoke(tmp_path, capsys, monkeypatch):
    bench = load_bench("bench_kernels")
    written, write_report = [], bench.write_report

    def noting_write(report, *args, **kwargs):
        written.append(len(report["results"]))
        return write_report(report, *args, **kwargs)

    monkeypatch.setattr(bench, "write_report", noting_write)
    out = tmp_path / "kernels.json"
    report = bench.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == report["device"] and saved["device"].startswith("cpu") and saved["smoke"] is True
    printed = capsys.readouterr().out
    assert "functional check (CPU smoke), not a measurement" in printed
    assert "median_ms=" in printed and "speedup" not in printed and "fraction" not in printed
    assert saved["versions"]["triton"] and saved["git_commit"] and saved["complete"]
    variants = {(row["what"], row["variant"], row["dtype"]) for row in saved["results"]}
    assert ("dino_loss_fwd_bwd", "fused", "bfloat16") in variants
    assert "reference_compiled" not in {variant for _, variant, _ in variants}, "torch.compile: the last stage's"
    assert {"reference_loop", "foreach", "fused"} <= {row["variant"] for row in saved["results"]
                                                       if row["what"] == "teacher_ema"}
    assert all(row["median_ms"] > 0 and row["floor_bytes"] > 0 for row in saved["results"])
    # written after every row, each printed as it came
    assert written[:-1] == list(range(1, len(saved["results"]) + 1))
    assert printed.count("what=") == len(saved["results"])
