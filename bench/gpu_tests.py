"""The GPU correctness tests (`pytest -m gpu`), recorded test by test in a JSON report with the common head.

GPU run:   python bench/gpu_tests.py          -> bench/results/gpu_tests-<device>-<date>.json
CPU smoke: python bench/gpu_tests.py --smoke  (the same selection: the CUDA-only tests skip, the kernel tests run in
           the Triton interpreter; writes only --out)

The `gpu` marker (registered in tests/conftest.py) selects what CI's CPU run cannot check: the Triton kernels
compiled for the GPU in fp32 and bf16 against their references, the attention backends and packed attention against
math, packed multi-crop and compiled blocks against eager, GPU decoding, and the fast training step against
reference-style. Extra arguments go to pytest. Exit code: pytest's.
"""
from __future__ import annotations

import sys
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
    error when the teardown fails."""

    def __init__(self) -> None:
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = "error" if report.when == "setup" and report.failed else report.outcome
            message = report.longreprtext.strip().splitlines()[-1] if not report.passed and report.longreprtext \
                else None
            self.tests[report.nodeid] = {"outcome": outcome, "seconds": report.duration, "message": message}
        elif report.when == "teardown" and report.failed:
            self.tests[report.nodeid] = dict(self.tests.get(report.nodeid, {}), outcome="error",
                                             message=report.longreprtext.strip().splitlines()[-1])


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__, "CPU: the same selection, CUDA-only tests skip (the CI machine's view)")
    args, pytest_args = parser.parse_known_args(argv)
    device = bench_device(args.smoke)
    report = new_report("gpu_tests", device, args.smoke)
    recorder = OutcomeRecorder()
    files = marked_files()
    exit_code = int(pytest.main(["-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider", *pytest_args, *files],
                                plugins=[recorder]))
    outcomes = [test["outcome"] for test in recorder.tests.values()]
    summary = {name: outcomes.count(name) for name in ("passed", "failed", "error", "skipped")}
    report.update(selection=["-m", "gpu", *pytest_args, *(str(Path(f).relative_to(REPO)) for f in files)],
                  exit_code=exit_code, summary=summary, tests=recorder.tests)
    print(f"gpu tests on {report['device']}{' (smoke: the CUDA-only tests skip)' if args.smoke else ''}: {summary}")
    write_report(report, "gpu_tests", args.out, args.smoke)
    if exit_code:
        raise SystemExit(exit_code)
    return report


if __name__ == "__main__":
    main()
