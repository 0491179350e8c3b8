"""Every allow-list, tested with near misses: a payload that names a neighbour of what is allowed (another attribute
of an allowed module, another class of an allowed package) is refused, names what it holds and never runs; what the
list allows still loads. The exec/system payloads of test_checkpoint_safety.py are refused by any allow-list. Each
refusal names the file and, in one line, what stopped the loader."""
import argparse
import io
import pickle
import re

import numpy as np
import pytest
import torch

from fastdino import checkpoint, hub, sharded_checkpoint
from fastdino.checkpoint import UntrustedCheckpointError
from fastdino.eval import knn
from fastdino.reference_run import read_reference_checkpoint


class SavesAFile:
    """Unpickling it calls torch.save (torch.serialization.save, a neighbour of the allowed torch dtypes): the file it
    would write makes a run of the payload visible."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return torch.save, ({"ran": True}, str(self.marker))


def near_misses(marker):
    """(payload, the global the refusal must name): neighbours of what some allow-list lets through."""
    return [
        (SavesAFile(marker), "torch.serialization.save"),  # torch.float32, torch.Size are allowed
        (np.arange(3.0), "_reconstruct"),  # numpy scalars and dtypes are allowed, arrays are not
        (np.dtypes.ObjectDType, "numpy.dtypes.ObjectDType"),  # the numeric dtype classes are allowed
        (argparse.ArgumentParser, "argparse.ArgumentParser"),  # argparse.Namespace is allowed
    ]


def assert_refused(error, name, marker):
    text = str(error.value)
    assert "refused" in text and name in text and "nothing in it was executed" in text, text
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("case", range(4), ids=["torch.save", "ndarray", "ObjectDType", "ArgumentParser"])
def test_the_reference_allow_list_refuses_its_neighbours(tmp_path, case):
    """hub's list (reference checkpoints, reference runs): a main_dino.py checkpoint whose args hold a neighbour."""
    marker = tmp_path / "marker"
    payload, name = near_misses(marker)[case]
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {"cls_token": torch.zeros(1, 1, 4)}, "args": argparse.Namespace(lr=payload)}, path)
    with pytest.raises(UntrustedCheckpointError) as error:
        hub.load_checkpoint_file(path)
    assert_refused(error, name, marker)
    with pytest.raises(UntrustedCheckpointError) as error:
        read_reference_checkpoint(path)
    assert_refused(error, name, marker)


def test_the_reference_allow_list_still_reads_what_main_dino_writes(tmp_path):
    """Numpy scalars (the schedules' lr), their dtypes and the Namespace: the near misses above are refused for
    what they are, not because everything numpy or argparse is."""
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(arch="vit_small", lr=np.float64(5e-4), ints=np.int64(3), flag=np.bool_(True))
    torch.save({"teacher": {"cls_token": torch.zeros(1, 1, 4)}, "args": args,
                "optimizer": {"param_groups": [{"lr": np.float32(0.5)}]}}, path)
    content = hub.load_checkpoint_file(path)
    assert content["args"] == args and content["optimizer"]["param_groups"][0]["lr"] == np.float32(0.5)


@pytest.mark.parametrize("case", range(4), ids=["torch.save", "ndarray", "ObjectDType", "ArgumentParser"])
def test_plain_checkpoints_and_plain_pt_refuse_even_what_reference_files_may_hold(tmp_path, case):
    """fastdino's own files (checkpoint.pth, a sharded checkpoint's plain.pt) allow no global beyond torch's own."""
    marker = tmp_path / "marker"
    payload, name = near_misses(marker)[case]
    for value, global_name in ((payload, name), (argparse.Namespace(seed=0), "argparse.Namespace"),
                               (np.float64(0.5), "scalar")):
        folder = tmp_path / "dcp"
        folder.mkdir(exist_ok=True)
        torch.save({"rng": [], "config": {"optim": {"lr": value}}}, folder / sharded_checkpoint.PLAIN_FILE)
        with pytest.raises(UntrustedCheckpointError) as error:
            sharded_checkpoint.read_plain(folder)
        assert_refused(error, global_name, marker)
        torch.save({"step": 1, "config": value}, tmp_path / checkpoint.LATEST)
        with pytest.raises(UntrustedCheckpointError) as error:
            checkpoint.load(tmp_path / checkpoint.LATEST)
        assert_refused(error, global_name, marker)


def test_a_knn_feature_cache_holding_a_neighbour_is_refused(tmp_path):
    marker = tmp_path / "marker"
    weights, folder = tmp_path / "teacher.pth", tmp_path / "images"
    weights.write_bytes(b"weights"), folder.mkdir()
    args = argparse.Namespace(cache_dir=str(tmp_path / "cache"), arch="vit_tiny", patch_size=8,
                              checkpoint_key="teacher", image_size=16, amp=False, checkpoint=str(weights))
    settings = {"arch": "vit_tiny", "patch_size": 8, "checkpoint_key": "teacher", "image_size": 16, "amp": False,
                "num_samples": 2}
    path = knn._cache_path(tmp_path / "cache", str(weights), str(folder), settings)
    path.parent.mkdir()
    for payload, name in near_misses(marker):
        torch.save({"features": torch.zeros(2, 3), "labels": payload}, path)
        with pytest.raises(UntrustedCheckpointError) as error:
            knn._cached_dataset_features(None, [0, 1], args, torch.device("cpu"), str(folder))
        assert_refused(error, name, marker)


# DCP's .metadata: its own dataclasses and enums, torch dtypes, torch.Size, layouts and paths are allowed
METADATA_NEAR_MISSES = [
    ("torch", "load"),  # torch.float32 is allowed
    ("torch", "Tensor"),  # a class of torch that is not a dtype
    ("torch.serialization", "load"),  # torch.serialization._get_layout is allowed
    ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),  # a class of DCP that is no record
    ("torch.distributed.checkpoint.state_dict_loader", "load"),  # a function of DCP
    ("torch.distributed.checkpoint", "load"),  # the package itself, without the trailing dot
    ("pathlib", "Path"),  # pathlib.PosixPath is allowed
    ("os", "system"),
]


@pytest.mark.parametrize("module, name", METADATA_NEAR_MISSES, ids=[".".join(pair) for pair in METADATA_NEAR_MISSES])
def test_dcp_metadata_refuses_the_neighbours_of_its_allowed_classes(tmp_path, module, name):
    (tmp_path / ".metadata").write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"q\x00.")
    with pytest.raises(UntrustedCheckpointError) as error:
        sharded_checkpoint.read_metadata(tmp_path)
    assert f"{module}.{name}" in str(error.value) and ".metadata" in str(error.value)


def test_dcp_metadata_allows_what_dcp_writes(tmp_path):
    """Each kind the list allows, named the same way: a DCP record class, a dtype, torch.Size, a layout, a path."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorProperties

    found = [sharded_checkpoint._metadata_global(*pair) for pair in [
        ("torch.distributed.checkpoint.metadata", "Metadata"), ("torch", "float32"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties")]]
    assert found[:3] == [Metadata, torch.float32, torch.Size] and found[5] is TensorProperties
    assert all(value is not None for value in found)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={})))
    assert isinstance(sharded_checkpoint.read_metadata(tmp_path), Metadata)


def test_each_refusal_names_the_file_and_what_stopped_the_loader(tmp_path):
    files = {"print.pth": {"f": print}, "namespace.pth": {"f": argparse.Namespace()}}  # a builtin, a dotted global
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    for name, content in {"garbage.pth": b"not a checkpoint", "empty.pth": b"",
                          "legacy.pth": pickle.dumps({"a": 1}, protocol=2)}.items():
        (tmp_path / name).write_bytes(content)
    refusals = {}
    for name in [*files, "garbage.pth", "empty.pth", "legacy.pth", "missing.pth"]:
        with pytest.raises(checkpoint.CheckpointError) as refused:
            checkpoint.load(tmp_path / name)
        refusals[name] = str(refused.value).replace(str(tmp_path / name), "FILE")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.load(io.BytesIO(b""), name="given.pth")  # a stream is named as the caller says
    assert str(refused.value) == "given.pth is not a readable checkpoint (EOFError)"
    for name, kind in (("print.pth", "builtins.print"), ("namespace.pth", "argparse.Namespace")):
        assert refusals.pop(name).startswith(f"refused FILE: it holds a pickled object of type {kind}, ")
    assert re.fullmatch(r"FILE is not a readable checkpoint \(the safe loader stopped at: Unsupported operand \d+\); "
                        "nothing in it was executed", refusals.pop("garbage.pth"))
    assert refusals == {"empty.pth": "FILE is not a readable checkpoint (EOFError)",
                        "legacy.pth": "FILE is not a readable checkpoint (Invalid magic number; corrupt file?)",
                        "missing.pth": "checkpoint file not found: FILE"}


def test_a_checkpoint_loads_where_map_location_says(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "c.pth")
    assert checkpoint.load(tmp_path / "c.pth", map_location="meta")["w"].is_meta
