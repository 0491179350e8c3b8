"""bench/run_gpu.sh, the one call a GPU lease makes: its CPU rehearsal runs every stage within the budgets and leaves
the files a GPU run leaves; a stage that fails, runs out of time or writes no JSON is recorded as such and the next
stage still runs; the GPU budgets fit the 8 minutes a lease's command has."""
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "run_gpu.sh"
HEAD = {"benchmark", "smoke", "device", "versions", "date", "git_commit"}
GPU_MINUTES, REHEARSAL_MINUTES = 8, 5


def budget_table() -> tuple[list[tuple[str, int, int]], int]:
    """The script's stages (name, GPU budget, rehearsal budget) and its setup budget, read from its text."""
    text = SCRIPT.read_text()
    stages = [(name, int(gpu), int(rehearse))
              for name, gpu, rehearse in re.findall(r'^\s*"(\w+)\s+(\d+)\s+(\d+)"', text, flags=re.M)]
    return stages, int(re.search(r"^SETUP_BUDGET=(\d+)", text, flags=re.M).group(1))


def run_script(out: Path, bin_dir: Path, timeout: float, stages: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(SCRIPT), "--rehearse", *stages], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_budgets_fit_the_lease():
    stages, setup = budget_table()
    assert [name for name, _, _ in stages][:3] == ["env", "gpu_tests", "step_vit_small_p16"]
    assert setup + sum(gpu for _, gpu, _ in stages) <= GPU_MINUTES * 60
    assert setup + sum(rehearse for _, _, rehearse in stages) <= REHEARSAL_MINUTES * 60


def test_rehearsal_runs_every_stage_and_writes_what_a_gpu_run_writes(tmp_path):
    stages, _ = budget_table()
    started = time.monotonic()
    result = run_script(tmp_path / "out", Path(sys.executable).parent, timeout=REHEARSAL_MINUTES * 60 + 60)
    wall = time.monotonic() - started
    record = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert record["mode"] == "rehearse" and record["smoke"] is True
    assert [(s["name"], s["status"]) for s in record["stages"]] == [(name, "ok") for name, _, _ in stages], \
        result.stdout[-3000:]
    assert result.returncode == 0, result.stdout[-3000:]
    assert wall < record["budget_total_s"]
    with tarfile.open(tmp_path / "out" / "run.tar.gz") as tar:
        tar.extractall(tmp_path / "files", filter="data")
    files = tmp_path / "files"
    assert json.loads((files / "stages.json").read_text()) == record
    for stage in record["stages"]:
        assert sorted(stage["files"]) == [f"{stage['name']}.json", f"{stage['name']}.log"]
        report = json.loads((files / f"{stage['name']}.json").read_text())
        assert HEAD <= set(report) and report["smoke"] is True and report["device"].startswith("cpu"), stage
        assert report["git_commit"] and report["versions"]["torch"]
        assert (files / f"{stage['name']}.log").read_text().strip()


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3: bench_env.py fails, bench_attention.py hangs, bench_data.py exits 0 without writing,
# every other stage writes a JSON at its --out; anything else is the real interpreter.
case "$1" in
  bench/bench_env.py) echo "env: planted failure"; exit 3 ;;
  bench/bench_attention.py) exec sleep 600 ;;
  bench/bench_data.py) exit 0 ;;
  bench/*) while [ "$1" != --out ]; do shift; done; echo '{"smoke": true}' >"$2"; echo "fake stage" ;;
  *) exec {python} "$@" ;;
esac
"""


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """A folder holding FAKE_PYTHON as python3, to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON.replace("{python}", sys.executable))
    (bin_dir / "python3").chmod(0o755)
    return bin_dir


def test_a_failed_hung_or_silent_stage_is_recorded_and_the_next_stage_runs(tmp_path, fake_bin):
    result = run_script(tmp_path / "out", fake_bin, timeout=120)
    record = json.loads((tmp_path / "out" / "stages.json").read_text())
    status = {stage["name"]: stage for stage in record["stages"]}
    assert status["env"]["status"] == "failed" and status["env"]["exit_code"] == 3
    attention_budget = next(rehearse for name, _, rehearse in budget_table()[0] if name == "attention")
    assert status["attention"]["status"] == "timed_out"
    assert attention_budget <= status["attention"]["seconds"] <= attention_budget + 10
    assert status["data"]["status"] == "failed" and "no readable data.json" in status["data"]["note"]
    others = [stage for name, stage in status.items() if name not in ("env", "attention", "data")]
    assert others and all(stage["status"] == "ok" for stage in others)
    assert result.returncode == 1
    with tarfile.open(tmp_path / "out" / "run.tar.gz") as tar:
        log = tar.extractfile("./attention.log").read().decode()
    assert f"stopped at its budget of {attention_budget} s" in log


def test_stages_named_on_the_command_line_run_alone(tmp_path, fake_bin):
    result = run_script(tmp_path / "out", fake_bin, timeout=60, stages=("kernels", "model"))
    record = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert [(s["name"], s["status"]) for s in record["stages"]] == [("kernels", "ok"), ("model", "ok")]
    assert result.returncode == 0
    unknown = run_script(tmp_path / "unknown", fake_bin, timeout=60, stages=("kernel",))
    assert unknown.returncode == 2 and "stages:" in unknown.stderr and not (tmp_path / "unknown").exists()
