"""The GPU correctness tests (`pytest -m gpu`), recorded test by test in a JSON report with the common head.

GPU run:   python bench/gpu_tests.py          -> bench/results/gpu_tests-<device>-<date>.json
CPU smoke: python bench/gpu_tests.py --smoke  (the same selection: the CUDA-only tests skip, the kernel tests run in
           the Triton interpreter; writes only --out)

The `gpu` marker (registered in tests/conftest.py) selects what CI's CPU run cannot check: the Triton kernels
compiled for the GPU in fp32 and bf16 against their references, the attention backends and packed attention against
math, packed multi-crop and compiled blocks against eager, GPU decoding, and the fast training step against
reference-style. `--marker` narrows it: the tests marked `compile` (torch.compile, about a minute each cold) run in
run_gpu.sh's last stage. The JSON is rewritten after every test (`exit_code: null` until pytest ends). Extra arguments
go to pytest. Exit code: pytest's.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import bench_device, bench_parser, new_report, write_report  # noqa: E402
from fastdino.errors import report_usage_errors  # noqa: E402


def marked_files() -> list[str]:
    """The test files that use the marker: collecting only these spares importing the whole suite."""
    return sorted(str(path) for path in (REPO / "tests").glob("test_*.py") if "mark.gpu" in path.read_text())


class OutcomeRecorder:
    """A pytest plugin that keeps each test's outcome: the setup's when it did not pass, else the call's, and an
    error when the teardown fails. `finished()` runs after each test's teardown: the report is written there."""

    def __init__(self, finished: Callable[[], object]) -> None:
        self.tests: dict[str, dict] = {}
        self.finished = finished

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = "error" if report.when == "setup" and report.failed else report.outcome
            message = report.longreprtext.strip().splitlines()[-1] if not report.passed and report.longreprtext \
                else None
            self.tests[report.nodeid] = {"outcome": outcome, "seconds": report.duration, "message": message}
        elif report.when == "teardown" and report.failed:
            self.tests[report.nodeid] = dict(self.tests.get(report.nodeid, {}), outcome="error",
                                             message=report.longreprtext.strip().splitlines()[-1])
        if report.when == "teardown":
            self.finished()

    def summary(self) -> dict[str, int]:
        outcomes = [test["outcome"] for test in self.tests.values()]
        return {name: outcomes.count(name) for name in ("passed", "failed", "error", "skipped")}


def run_tests(marker: str, pytest_args: list[str], report: dict, save: Callable[[], object]) -> int:
    """pytest -m `marker` over the marked files, into `report` (`selection`, `tests`, `summary`, then `exit_code`),
    calling save() after every test: a run cut off keeps every finished test. Returns pytest's exit code."""
    files = marked_files()
    report.update(selection=["-m", marker, *pytest_args, *(str(Path(f).relative_to(REPO)) for f in files)],
                  exit_code=None, summary={}, tests={})

    def finished() -> None:
        report.update(tests=recorder.tests, summary=recorder.summary())
        save()

    recorder = OutcomeRecorder(finished)
    exit_code = int(pytest.main(["-m", marker, "-v", "-rfEs", "-p", "no:cacheprovider", *pytest_args, *files],
                                plugins=[recorder]))
    report.update(exit_code=exit_code, tests=recorder.tests, summary=recorder.summary())
    save()
    return exit_code


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__, "CPU: the same selection, CUDA-only tests skip (the CI machine's view)")
    parser.add_argument("--marker", default="gpu",
                        help="pytest's -m expression (run_gpu.sh: 'gpu and not compile'; its last stage: 'gpu and "
                             "compile')")
    args, pytest_args = parser.parse_known_args(argv)
    device = bench_device(args.smoke)
    report = new_report("gpu_tests", device, args.smoke)
    exit_code = run_tests(args.marker, pytest_args, report,
                          lambda: write_report(report, "gpu_tests", args.out, args.smoke, quiet=True))
    print(f"gpu tests on {report['device']}{' (smoke: the CUDA-only tests skip)' if args.smoke else ''}: "
          f"{report['summary']}")
    write_report(report, "gpu_tests", args.out, args.smoke)
    if exit_code:
        raise SystemExit(exit_code)
    return report


if __name__ == "__main__":
    main()
