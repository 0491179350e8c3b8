"""The `fastdino` command: one entry point for training, evaluation, export and the benchmarks.

Each subcommand is the `main` of the module that owns it, so `fastdino eval knn ...` and
`python -m fastdino.eval.knn ...` are the same command with the same options.
"""
from __future__ import annotations

import ast
import importlib
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from fastdino import __version__
from fastdino.errors import UsageError, report_usage_errors

# command words -> (module whose main runs it, one line for `fastdino --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fastdino.train", "pretrain a ViT with DINO (`fastdino train --help` lists every setting)"),
    "eval knn": ("fastdino.eval.knn", "weighted kNN top-1/top-5 of a checkpoint's frozen features"),
    "eval linear": ("fastdino.eval.linear", "linear probe on frozen features, the paper's protocol"),
    "eval attention": ("fastdino.eval.attention", "per-head self-attention pictures of a checkpoint"),
    "plan": ("fastdino.memory_plan", "a config's predicted peak memory per process, term by term, and what fits"),
    "export": ("fastdino.export", "a checkpoint's backbone (reference or timm layout) or whole run (reference-run)"),
}
GROUPS = ("eval", "bench")  # first words shared by several commands
# The benchmarks are scripts of a checkout (they write under bench/results/), not part of the installed package.
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def benchmarks() -> dict[str, Path]:
    """{name: script} of the checkout's `bench/bench_<name>.py` files (empty outside a checkout)."""
    return {path.stem.removeprefix("bench_"): path for path in sorted(BENCH_DIR.glob("bench_*.py"))}


def _first_docstring_line(script: Path) -> str:
    return (ast.get_docstring(ast.parse(script.read_text())) or "").split("\n\n")[0].replace("\n", " ")


def usage(group: str = "") -> str:
    """`fastdino --help`: every command with one line; `fastdino eval --help` or `fastdino bench --help` (`group`):
    that group's commands."""
    meanings = {words: meaning for words, (_, meaning) in COMMANDS.items()}
    meanings["bench NAME"] = "a benchmark of the checkout's bench/ folder against its baseline:"
    width = max(map(len, meanings)) + 4
    lines = ["usage: fastdino COMMAND [options]   (`fastdino COMMAND --help` for its options; `fastdino --version`)",
             "", "commands:"]
    for words, meaning in meanings.items():
        if group in ("", words.split()[0]):
            lines.append(f"  {words:<{width}}{meaning}")
    if group in ("", "bench"):
        lines += [f"  {'  ' + name:<{width}}{_first_docstring_line(script)}" for name, script in benchmarks().items()]
    return "\n".join(lines)


def _run_benchmark(words: list[str]) -> int:
    """`fastdino bench NAME [options]` (`words`: NAME and its options; `fastdino bench` alone is its --help)."""
    scripts = benchmarks()
    if not scripts:
        raise UsageError(f"fastdino bench needs a checkout of fastdino: no bench/ folder at {BENCH_DIR}")
    if words[0] not in scripts:
        raise UsageError(f"fastdino bench NAME: {words[0]!r} is not one of {', '.join(scripts)}")
    sys.argv = [f"fastdino bench {words[0]}", *words[1:]]
    runpy.run_path(str(scripts[words[0]]), run_name="__main__")  # the script ends with its own sys.exit
    return 0


@report_usage_errors
def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help"):
        print(usage())
        return 0
    if words == ["--version"]:
        print(f"fastdino {__version__}")
        return 0
    if words[0] in GROUPS and words[1:] in ([], ["-h"], ["--help"]):  # a group alone lists it, as `fastdino` alone
        print(usage(words[0]))
        return 0
    if words[0] == "bench":
        return _run_benchmark(words[1:])
    command = " ".join(words[:2]) if words[0] == "eval" else words[0]
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}: one of {', '.join([*COMMANDS, 'bench'])} (see fastdino --help)")
    sys.argv[0] = f"fastdino {command}"  # the subcommand's --help and errors name it as typed
    result = importlib.import_module(COMMANDS[command][0]).main(words[len(command.split()):])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
