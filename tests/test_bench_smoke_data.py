"""bench/bench_data.py --smoke runs end to end and writes a well-formed JSON report."""
import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_data.py"


def test_bench_data_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--smoke", "--out", str(tmp_path)])
    runpy.run_path(str(BENCH), run_name="__main__")
    [result_file] = tmp_path.glob("data-*.json")
    report = json.loads(result_file.read_text())
    assert report["smoke"] is True and report["benchmark"] == "data"
    printed = capsys.readouterr().out
    assert "functional check (CPU smoke), not a measurement" in printed and "dali_speedup" not in printed
    assert {"device", "date", "git_commit", "versions", "settings"} <= set(report)
    torchvision = report["results"]["torchvision"]
    assert torchvision["images_per_s"] > 0 and torchvision["images"] == 3 * 4
    dali = report["results"]["dali"]
    assert "skipped" in dali or (dali["images_per_s"] > 0 and dali["images"] == 3 * 4)
    if "skipped" not in dali:
        assert report["results"]["dali_speedup"] > 0
