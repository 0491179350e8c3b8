"""bench/bench_memory.py --smoke: every row runs in a process of its own, computes what it names (its micro-batches
and recomputed blocks), and carries the plan's prediction beside the measured peak."""
import json

from helpers import load_bench


def test_memory_benchmark_smoke(tmp_path, capsys):
    module = load_bench("bench_memory")
    out = tmp_path / "memory.json"
    module.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == list(module.ROWS) and report["cpu_figures"] and report["smoke"]
    assert [(row["micro_batches"], row["recomputed_blocks"]) for row in rows.values()] == [(1, 0), (2, 0), (4, 0),
                                                                                           (1, 2)]
    for row in rows.values():
        assert 0.8 <= row["planned_peak_gib"] / row["peak_memory_gib"] <= 1.25, row
    assert rows["whole_batch"]["peak_memory_vs_whole_batch"] == 1.0
    assert "functional check (CPU smoke)" in capsys.readouterr().out
