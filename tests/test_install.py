"""The installed fastdino is the one Python imports from any working directory, the folder that holds the checkout
included.

A checkout cloned as `fastdino/` is, seen from its parent folder, a directory named like the package but without an
`__init__.py`. Python's path finder takes such a directory in the working directory for a namespace package, and
an editable install whose import hook comes after the path finder then loses to it: `fastdino.data` resolved to the
checkout's `data/` folder (`cannot import name 'IMAGENET_MEAN' from 'fastdino.data'`) and `fastdino.train` to the
checkout's `train.py` script. setup.py's editable install puts the hook ahead of the path finder.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ("fastdino", "fastdino.data", "fastdino.train", "fastdino.kernels", "fastdino.eval.knn")
WHERE = ("import importlib.util; "
         f"print('\\n'.join(str(importlib.util.find_spec(name).origin) for name in {MODULES!r}))")

try:
    importlib.metadata.distribution("fastdino")
except importlib.metadata.PackageNotFoundError:
    pytestmark = pytest.mark.skip(reason="fastdino is not installed in this Python (`make install` installs it)")


def python(*arguments, cwd):
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def parent_of_a_checkout(tmp_path):
    """A folder holding `fastdino/`, the checkout's top level (linked) as `make demo` leaves it: with `data/`."""
    checkout = tmp_path / "fastdino"
    checkout.mkdir()
    for entry in REPO.iterdir():
        if not entry.name.startswith("."):
            (checkout / entry.name).symlink_to(entry)
    if not (checkout / "data").exists():
        (checkout / "data" / "demo").mkdir(parents=True)
    return tmp_path


def test_the_package_is_the_installed_one_beside_a_checkout_named_fastdino(parent_of_a_checkout, tmp_path_factory):
    elsewhere = python("-c", WHERE, cwd=tmp_path_factory.mktemp("elsewhere"))
    assert elsewhere.returncode == 0, elsewhere.stderr
    beside = python("-c", WHERE, cwd=parent_of_a_checkout)
    assert beside.returncode == 0, beside.stderr
    assert beside.stdout.splitlines() == elsewhere.stdout.splitlines()
    assert not any(line.startswith(str(parent_of_a_checkout)) for line in beside.stdout.splitlines())


def test_python_m_fastdino_runs_from_the_folder_that_holds_the_checkout(parent_of_a_checkout):
    result = python("-m", "fastdino", "--help", cwd=parent_of_a_checkout)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fastdino COMMAND")
    result = python("-m", "fastdino", "eval", "knn", "--help", cwd=parent_of_a_checkout)  # imports fastdino.data
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
