"""bench/run_gpu.sh, the one call a GPU lease makes: its CPU rehearsal runs every stage within the budgets and leaves
the files a GPU run leaves; a stage that fails, runs out of time or writes no JSON is recorded as such and the next
stage still runs; a run killed at any moment has returned every row and test it finished; it starts from a path
through a symbolic link with the package not installed (as on the device machine); GPU mode needs the commit and
sets the allocator; the stages run in order of value with the GPU budgets inside the 8 minutes a lease's command
has."""
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "run_gpu.sh"
HEAD = {"benchmark", "smoke", "device", "device_memory_gib", "versions", "date", "git_commit"}
GPU_MINUTES, REHEARSAL_MINUTES = 8, 5


def budget_table() -> tuple[list[tuple[str, int, int]], int]:
    """The script's stages (name, GPU budget, rehearsal budget) and its setup budget, read from its text."""
    text = SCRIPT.read_text()
    stages = [(name, int(gpu), int(rehearse))
              for name, gpu, rehearse in re.findall(r'^\s*"(\w+)\s+(\d+)\s+(\d+)"', text, flags=re.M)]
    return stages, int(re.search(r"^SETUP_BUDGET=(\d+)", text, flags=re.M).group(1))


def run_script(out: Path, bin_dir: Path, timeout: float, stages: tuple[str, ...] = (), mode: str = "--rehearse",
               script: Path = SCRIPT, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run(["bash", str(script), *([mode] if mode else []), *stages], env=env, capture_output=True,
                          text=True, timeout=timeout)


def unpacked(out: Path, into: Path) -> Path:
    with tarfile.open(out / "run.tar.gz") as tar:
        tar.extractall(into, filter="data")
    return into


def test_stages_run_in_order_of_value_within_the_lease():
    stages, setup = budget_table()
    names = [name for name, _, _ in stages]
    # the environment and the tests, the ViT-S/16 step, then the kernels, before the larger models
    assert names[:6] == ["env", "gpu_tests", "step_vit_small_p16", "kernels", "step_vit_small_p8", "step_vit_base_p8"]
    assert names[-1] == "compile", "every torch.compile variant (about a minute each cold) runs last"
    assert dict((name, gpu) for name, gpu, _ in stages)["env"] >= 45
    assert setup + sum(gpu for _, gpu, _ in stages) < GPU_MINUTES * 60
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
    files = unpacked(tmp_path / "out", tmp_path / "files")
    assert json.loads((files / "stages.json").read_text()) == record
    for stage in record["stages"]:
        assert sorted(stage["files"]) == [f"{stage['name']}.json", f"{stage['name']}.log"]
        report = json.loads((files / f"{stage['name']}.json").read_text())
        assert HEAD <= set(report) and report["smoke"] is True and report["device"].startswith("cpu"), stage
        assert report["git_commit"] and report["versions"]["torch"] and report["device_memory_gib"] > 0
        assert (files / f"{stage['name']}.log").read_text().strip()


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3: bench_env.py fails, bench_attention.py hangs, bench_data.py exits 0 without writing,
# every other stage writes a JSON at its --out naming the allocator setting; anything else is the real interpreter.
case "$1" in
  bench/bench_env.py) echo "env: planted failure"; exit 3 ;;
  bench/bench_attention.py) exec sleep 600 ;;
  bench/bench_data.py) exit 0 ;;
  bench/*) while [ "$1" != --out ]; do shift; done
           printf '{"smoke": true, "alloc_conf": "%s"}' "${PYTORCH_CUDA_ALLOC_CONF:-}" >"$2"; echo "fake stage" ;;
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
    result = run_script(tmp_path / "out", fake_bin, timeout=150)
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


def test_gpu_mode_needs_the_commit_and_sets_the_allocator(tmp_path, fake_bin):
    environment = {key: value for key, value in os.environ.items() if key != "FASTDINO_GIT_COMMIT"}
    refused = subprocess.run(["bash", str(SCRIPT), "kernels"], capture_output=True, text=True, timeout=60,
                             env=dict(environment, OUT=str(tmp_path / "refused"),
                                      PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}"))
    assert refused.returncode == 2 and not (tmp_path / "refused").exists()
    assert "FASTDINO_GIT_COMMIT=" in refused.stderr and "git rev-parse HEAD" in refused.stderr
    result = run_script(tmp_path / "out", fake_bin, timeout=60, stages=("kernels",), mode="",
                        FASTDINO_GIT_COMMIT="0123abc")
    assert result.returncode == 0, result.stderr
    report = json.loads((unpacked(tmp_path / "out", tmp_path / "files") / "kernels.json").read_text())
    assert report["alloc_conf"] == "expandable_segments:True"


def test_starts_through_a_symbolic_link_with_the_package_not_installed(tmp_path):
    """As on the device machine: python3 without fastdino installed (here: the venv's packages on PYTHONPATH, its
    site hooks off), the repository reached through a link, so that the logical and physical paths differ."""
    bin_dir, site_packages = tmp_path / "bin", next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -S "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    (tmp_path / "checkout").symlink_to(SCRIPT.parents[1], target_is_directory=True)
    result = run_script(tmp_path / "out", bin_dir, timeout=120, stages=("kernels",),
                        script=tmp_path / "checkout" / "bench" / "run_gpu.sh", PYTHONPATH=str(site_packages))
    record = json.loads((tmp_path / "out" / "stages.json").read_text())
    files = unpacked(tmp_path / "out", tmp_path / "files")
    assert "fastdino.kernels mapped through" in (files / "setup.log").read_text()
    assert record["stages"][0]["status"] == "ok", (files / "kernels.log").read_text()[-3000:]
    assert result.returncode == 0


def session_processes(session: int) -> list[int]:
    """The live processes of session `session` (one a test started, so all its own; zombies are already dead)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(session: int) -> None:
    """SIGKILL to every process of the session at once, as a lease's end does: no trap runs."""
    while pids := session_processes(session):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def entries(path: Path, key: str) -> int:
    """How many rows or tests the stage JSON at `path` holds (0 when there is none yet)."""
    try:
        return len(json.loads(path.read_text())[key])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("stage, key, kill_at", [("kernels", "results", 3), ("gpu_tests", "tests", 4)])
def test_a_run_killed_at_any_moment_has_returned_every_finished_row_and_test(tmp_path, stage, key, kill_at):
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    env = dict(os.environ, OUT=str(out), TMPDIR=str(scratch),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.Popen(["bash", str(SCRIPT), "--rehearse", stage], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 150
    try:
        while (written := next(scratch.glob(f"*/run/{stage}.json"), None)) is None or \
                entries(written, key) < kill_at:
            assert run.poll() is None, f"the stage ended before {kill_at} of its {key} were written"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        kill_session(run.pid)
        run.wait()
    finished = entries(written, key)  # the stage's own file as the kill left it
    record = json.loads((out / "stages.json").read_text())
    assert [(s["name"], s["status"]) for s in record["stages"]] == [(stage, "running")]
    files = unpacked(out, tmp_path / "files")
    assert json.loads((files / "stages.json").read_text()) == record
    # all but at most the one whose packing the kill cut short
    assert entries(files / f"{stage}.json", key) >= max(finished - 1, kill_at - 1)
    assert (files / f"{stage}.log").read_text().strip()
