"""The one rule that keeps smoke and CPU figures from reading as measurements (bench.common.print_rows): a label
above the figures, and speed ratios only from a full-size GPU run."""
import importlib.util
from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "bench" / "common.py"
spec = importlib.util.spec_from_file_location("bench_common", COMMON)
common = importlib.util.module_from_spec(spec)
spec.loader.exec_module(common)
RATIO_FIELDS, is_measurement, print_rows = common.RATIO_FIELDS, common.is_measurement, common.print_rows

ROW = {"variant": "fused", "median_ms": 1.5, "speedup_vs_reference": 3.0, "mfu": 0.4}
FIELDS = {"variant": "", "median_ms": ".1f", "speedup_vs_reference": ".2f", "mfu": ".1%"}


def head(smoke: bool, device: str) -> dict:
    return {"smoke": smoke, "device": device, "git_commit": "abc"}


def printed(report: dict, capsys) -> str:
    print_rows(report, [ROW], FIELDS)
    return capsys.readouterr().out


def test_smoke_and_cpu_runs_are_labelled_functional_checks_without_ratios(capsys):
    for report, where in ((head(True, "cpu-x86_64"), "CPU smoke"), (head(False, "cpu-x86_64"), "CPU"),
                          (head(True, "NVIDIA H200"), "smoke")):
        out = printed(report, capsys)
        assert not is_measurement(report)
        assert out.startswith(f"functional check ({where}), not a measurement")
        assert "median_ms=1.5" in out and "speedup" not in out and "mfu" not in out


def test_a_full_gpu_run_prints_its_ratios_as_a_measurement(capsys):
    report = head(False, "NVIDIA H200")
    out = printed(report, capsys)
    assert is_measurement(report) and out.startswith("measurement on NVIDIA H200 (commit abc)")
    assert "speedup_vs_reference=3.00" in out and "mfu=40.0%" in out
    assert {"speedup_vs_reference_style", "overhead_vs_single_device", "dali_speedup"} <= RATIO_FIELDS
