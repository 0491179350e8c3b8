"""The `fastdino` command: installed with the package, one line per command in its help, every training setting
with its default and meaning in `fastdino train --help`, and each subcommand the same command as its module's."""
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_config_validation import config_keys

import fastdino
from fastdino import cli
from fastdino.config import Config, get_value
from fastdino.rules import show
from fastdino.settings_help import settings

REPO = Path(__file__).resolve().parents[1]
FASTDINO = Path(sys.executable).parent / "fastdino"  # the console script `pip install` puts beside python


def run(*arguments, command=(str(FASTDINO),)):
    return subprocess.run([*command, *arguments], capture_output=True, text=True, cwd=REPO)


def test_the_console_script_is_installed_and_lists_every_command():
    assert FASTDINO.is_file(), "setup.py's console_scripts entry point must install `fastdino`"
    result = run("--help")
    assert result.returncode == 0
    listed = {line.strip().split("  ")[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert {"train", "eval knn", "eval linear", "eval attention", "export", "bench NAME"} <= listed
    benchmarks = {path.stem.removeprefix("bench_") for path in (REPO / "bench").glob("bench_*.py")}
    assert benchmarks and benchmarks <= listed, "every benchmark of bench/ is listed"
    assert run("--help", command=(sys.executable, "-m", "fastdino")).stdout == result.stdout


def help_text(capsys, monkeypatch, *words):
    """`fastdino WORDS --help`, in this process, with the wrapping undone."""
    monkeypatch.setattr(sys, "argv", ["fastdino"])
    with pytest.raises(SystemExit) as stop:
        cli.main([*words, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_train_help_lists_every_setting_with_its_default_and_meaning(capsys, monkeypatch):
    rows = {key: (default, meaning) for key, default, meaning in settings()}
    assert set(rows) == set(config_keys())
    assert all(meaning for _, meaning in rows.values()), [key for key, (_, m) in rows.items() if not m]
    text = help_text(capsys, monkeypatch, "train")
    assert text.startswith("usage: fastdino train ")
    for key in config_keys():
        default = show(get_value(Config(), key))
        assert f"{key} = {default} " in text, key
    # the meaning is the comment beside the field in config.py, word for word
    source = (REPO / "fastdino" / "config.py").read_text()
    clip_comment = re.search(r"clip_grad: float = 3\.0  # (.*)", source).group(1)
    assert f"optim.clip_grad = 3.0 {clip_comment}" in text


@pytest.mark.parametrize("command, option, default", [
    (["eval", "knn"], "--k", "[10, 20, 100, 200]"), (["eval", "knn"], "--temperature", "0.07"),
    (["eval", "attention"], "--keep", "0.6"), (["eval", "linear"], "--lr", "0.001"),
    (["export"], "--format", "reference")])
def test_eval_and_export_help_show_their_defaults(command, option, default, capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, *command)
    assert text.startswith(f"usage: fastdino {' '.join(command)} ")
    assert re.search(rf"{re.escape(option)} \S+ [^-]*?\(default: {re.escape(default)}\)", text), text


@pytest.mark.parametrize("command, module", [(["eval", "knn"], "fastdino.eval.knn"),
                                             (["eval", "linear"], "fastdino.eval.linear"),
                                             (["export"], "fastdino.export")])
def test_a_subcommand_is_its_modules_command(command, module, tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "missing.pth")
    arguments = ([missing, "--out", str(tmp_path / "x.pth")] if command == ["export"] else
                 ["--checkpoint", missing, "--train-dir", str(tmp_path), "--val-dir", str(tmp_path)])
    monkeypatch.setattr(sys, "argv", ["fastdino"])
    errors = []
    for call in (lambda: cli.main([*command, *arguments]), lambda: importlib.import_module(module).main(arguments)):
        with pytest.raises(SystemExit) as stop:
            call()
        assert stop.value.code == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and errors[0].count("\n") == 1 and "missing.pth" in errors[0]


def test_bench_runs_the_checkouts_script_and_unknown_words_are_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fastdino"])
    for words, message in ((["bench", "step", "--steps", "0"], "error: --steps=0: must be > 0\n"),
                           (["bench", "nope"], "'nope' is not one of"), (["evaluate"], "unknown command 'evaluate'"),
                           (["eval", "nope"], "unknown command 'eval nope'")):
        with pytest.raises(SystemExit) as stop:
            cli.main(words)
        error = capsys.readouterr().err
        assert stop.value.code == 2 and message in error and error.count("\n") == 1, (words, error)


@pytest.mark.parametrize("group", ["eval", "bench"])
def test_a_command_group_help_lists_its_commands(group):
    result = run(group, "--help")
    assert result.returncode == 0 and result.stderr == ""
    listed = {line.strip().split("  ")[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    expected = ({"eval knn", "eval linear", "eval attention"} if group == "eval" else
                {"bench NAME", *(path.stem.removeprefix("bench_") for path in (REPO / "bench").glob("bench_*.py"))})
    assert listed == expected


@pytest.mark.parametrize("group", ["eval", "bench"])
def test_a_command_group_alone_lists_its_commands_as_fastdino_alone_does(group, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fastdino"])
    assert cli.main([group]) == 0 and cli.main([]) == 0  # `fastdino` alone lists every command, exit code 0
    assert capsys.readouterr().out == f"{cli.usage(group)}\n{cli.usage()}\n"


def test_version_is_setup_pys_as_installed():
    result = run("--version")
    setup_version = re.search(r'\bversion="([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert result.returncode == 0 and result.stdout == f"fastdino {setup_version}\n", result
    assert fastdino.__version__ == importlib.metadata.version("fastdino") == setup_version
    # a checkout imported without being installed (torch.hub's source="local") still imports, and says so
    uninstalled = run("-c", "import importlib.metadata as m\ndef missing(name): raise m.PackageNotFoundError(name)\n"
                            "m.version = missing\nimport fastdino\nprint(fastdino.__version__)",
                      command=(sys.executable,))
    assert uninstalled.returncode == 0 and uninstalled.stdout == "unknown (not installed)\n", uninstalled
