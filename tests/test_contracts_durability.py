"""Durability order of every atomic writer, observed: the bytes are written, flushed and fsynced before the rename
that publishes them, and the folder is fsynced after it (a power loss after return keeps the new name). A sharded
publish never leaves a moment without a complete checkpoint on disk. What the writers add: missing folders made,
text written as text, a serializer's own error passed on with nothing left behind; the saved generators continue
exactly (numpy's cached half of a normal pair included)."""
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdino import checkpoint, export, metrics, run_folder, sharded_checkpoint
from fastdino.distributed import DistributedContext


class RecordingFile:
    """A file opened by a writer under test: its writes and flushes go into the shared record."""

    def __init__(self, handle, events):
        self.handle, self.events = handle, events

    def write(self, data):
        self.events.append(("write", Path(self.handle.name).name))
        return self.handle.write(data)

    def flush(self):
        self.events.append(("flush", Path(self.handle.name).name))
        self.handle.flush()

    def fileno(self):
        return self.handle.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self.handle.__exit__(*exc_info)


@pytest.fixture
def events(monkeypatch):
    """Every write, flush, fsync, replace, rename, link and tree removal, in order, by file name (a folder's fsync as
    `fsync-dir`)."""
    record = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "rename", "link")}
    real_rmtree, real_open = shutil.rmtree, open

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        kind = "fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync"
        record.append((kind, Path(target).name))
        real["fsync"](fd)

    def moved(name):
        def move(source, destination, *args, **kwargs):
            record.append((name, Path(source).name, Path(destination).name))
            return real[name](source, destination, *args, **kwargs)
        return move

    def rmtree(path, *args, **kwargs):
        record.append(("rmtree", Path(path).name))
        return real_rmtree(path, *args, **kwargs)

    def recording_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return RecordingFile(handle, record) if "w" in mode else handle

    monkeypatch.setattr(os, "fsync", fsync)
    for name in ("replace", "rename", "link"):
        monkeypatch.setattr(os, name, moved(name))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(checkpoint, "open", recording_open, raising=False)  # the writers' own `open`
    return record


def assert_published_durably(record, target: Path) -> None:
    """The temporary of `target` was written, flushed and fsynced, then renamed onto `target`, then the folder fsynced;
    nothing was written to it after the fsync."""
    tmp = checkpoint.temporary_path(target).name
    replace = record.index(("replace", tmp, target.name))
    before = record[:replace]
    writes = [index for index, event in enumerate(before) if event[0] == "write" and event[1] == tmp]
    flush = max(index for index, event in enumerate(before) if event == ("flush", tmp))
    fsync = max(index for index, event in enumerate(before) if event == ("fsync", tmp))
    assert writes and max(writes) < flush < fsync, record
    assert ("fsync-dir", target.parent.name) in record[replace + 1:], record


STATE = {"weights": torch.arange(6.0), "step": 3}


def test_save_atomic_flushes_and_fsyncs_before_the_rename_and_the_folder_after(tmp_path, events):
    checkpoint.save_atomic(STATE, tmp_path / "checkpoint.pth")
    assert_published_durably(events, tmp_path / "checkpoint.pth")
    assert checkpoint.load(tmp_path / "checkpoint.pth")["step"] == 3


def test_a_text_file_is_published_the_same_way(tmp_path, events):
    checkpoint.write_text_atomic("one line\n", tmp_path / "results.json")
    assert_published_durably(events, tmp_path / "results.json")


@pytest.mark.parametrize("linked", [True, False], ids=["hard link", "copy"])
def test_a_numbered_copy_is_on_disk_before_its_name_is(tmp_path, monkeypatch, linked, events):
    checkpoint.save_atomic(STATE, tmp_path / "checkpoint0001.pth")
    if not linked:  # a filesystem without hard links: the bytes are copied, and must be fsynced before the rename
        monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError("no links here")))
    events.clear()
    checkpoint.copy_atomic(tmp_path / "checkpoint0001.pth", tmp_path / "checkpoint.pth")
    tmp = checkpoint.temporary_path(tmp_path / "checkpoint.pth").name
    replace = events.index(("replace", tmp, "checkpoint.pth"))
    if not linked:
        assert ("fsync", tmp) in events[:replace], events
    assert ("fsync-dir", tmp_path.name) in events[replace + 1:], events
    assert checkpoint.load(tmp_path / "checkpoint.pth")["step"] == 3


def test_the_run_folders_text_files_and_the_log_rewrite_are_published_durably(tmp_path, events):
    from fastdino.config import Config

    run_folder.write_resolved_config(tmp_path, Config())
    assert_published_durably(events, tmp_path / run_folder.RESOLVED_CONFIG)
    run_folder.write_run_info(tmp_path, {"step": 0})
    assert_published_durably(events, tmp_path / run_folder.RUN_INFO)
    (tmp_path / run_folder.METRICS_LOG).write_text(json.dumps({"step": 1}) + "\n")
    events.clear()
    metrics.add_to_row(tmp_path, 1, {"knn_top1": 50.0})
    assert_published_durably(events, tmp_path / run_folder.METRICS_LOG)


@pytest.mark.parametrize("name", ["backbone.safetensors", "backbone.pth"])
def test_an_export_is_published_durably(tmp_path, events, name):
    export.write_weights({"cls_token": torch.zeros(1, 1, 4)}, tmp_path / name)
    assert_published_durably(events, tmp_path / name)
    assert torch.equal(export.read_weights(tmp_path / name)["cls_token"], torch.zeros(1, 1, 4))


def sharded_state(step: int) -> dict:
    return {"student": {"w": torch.full((4,), float(step))}, "step": step, "rng": [], "config": {"seed": step}}


def saved_step(path: Path) -> int:
    return int(sharded_checkpoint.read_unsharded(path, ("step",))["step"])


def test_a_sharded_publish_always_leaves_a_complete_checkpoint_and_ends_durable(tmp_path, monkeypatch, events):
    """Observed after every rename and tree removal of the second save: the newest complete checkpoint on disk is
    the previous one until the new one is in place, never none; the staging folder is fsynced before it is
    published, the run folder after."""
    target = tmp_path / sharded_checkpoint.SHARDED_DIR
    single = DistributedContext.single()
    sharded_checkpoint.save_sharded(sharded_state(1), target, single)
    seen = []

    def observed(function):
        def call(*args, **kwargs):
            result = function(*args, **kwargs)
            if Path(args[0]).parent == tmp_path:  # the run folder's own entries, not DCP's files inside
                found = sharded_checkpoint.find_sharded_checkpoint(target)
                assert found is not None, f"no complete checkpoint after {function.__name__}{args}"
                seen.append(saved_step(found))
            return result
        return call

    monkeypatch.setattr(os, "rename", observed(os.rename))
    monkeypatch.setattr(shutil, "rmtree", observed(shutil.rmtree))
    events.clear()
    sharded_checkpoint.save_sharded(sharded_state(2), target, single)
    assert seen and seen[-1] == 2 and set(seen) <= {1, 2}, seen
    staging, old = (path.name for path in sharded_checkpoint._staging_paths(target))
    publish = events.index(("rename", staging, target.name))
    assert ("fsync-dir", staging) in events[:publish], events
    assert ("rename", target.name, old) in events[:publish], events
    assert ("fsync-dir", tmp_path.name) in events[publish + 1:], events
    assert saved_step(target) == 2 and not (tmp_path / old).exists() and not (tmp_path / staging).exists()


def test_a_numbered_sharded_copy_is_on_disk_before_its_name_is(tmp_path, events):
    target, copy = tmp_path / sharded_checkpoint.SHARDED_DIR, tmp_path / "checkpoint0001_dcp"
    sharded_checkpoint.save_sharded(sharded_state(1), target, DistributedContext.single(), copies=(copy,))
    staging = sharded_checkpoint._staging_paths(copy)[0].name
    publish = events.index(("rename", staging, copy.name))
    files = sorted(path.name for path in copy.iterdir())
    assert {("fsync", name) for name in files} | {("fsync-dir", staging)} <= set(events[:publish]), events
    assert ("fsync-dir", tmp_path.name) in events[publish + 1:], events
    assert saved_step(copy) == 1


def test_a_writer_makes_missing_folders_writes_text_as_text_and_passes_a_serializers_own_error_on(tmp_path):
    checkpoint.write_text_atomic("é\n", tmp_path / "a" / "b" / "note.txt")
    assert (tmp_path / "a" / "b" / "note.txt").read_text() == "é\n"

    def unserializable(state, handle):
        raise RuntimeError("cannot serialize this")

    with pytest.raises(RuntimeError, match="^cannot serialize this$"):
        checkpoint.save_atomic(STATE, tmp_path / "x.pth", unserializable)
    assert os.listdir(tmp_path) == ["a"], "nothing left of the failed write"


def test_the_generators_continue_where_they_were_saved_even_mid_gaussian_pair():
    np.random.seed(0)
    np.random.standard_normal()  # numpy's legacy normal draws pairs: the second one is now cached
    state = checkpoint.capture_rng_state()
    expected = np.random.standard_normal(3)
    np.random.seed(1)
    checkpoint.restore_rng_state(state)
    assert np.array_equal(np.random.standard_normal(3), expected)
