"""A checkpoint is data, never code: a payload planted in any file of either checkpoint format is refused by every
reader, with one line naming the file, and never runs. Real checkpoints still load."""
import ast
import dataclasses
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, tiny_config, write_image_folder

from fastdino import checkpoint, hub, sharded_checkpoint
from fastdino.checkpoint import UntrustedCheckpointError
from fastdino.distributed import DistributedContext
from fastdino.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling it writes the marker file: what an attacker's object would do, made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('executed')",)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run folder in each format, after two training steps (optimizer moments, a moved center)."""
    root = tmp_path_factory.mktemp("safety")
    images = write_image_folder(root / "images")
    trainer = Trainer(tiny_config(images, root / "plain"))
    trainer.train(stop_after_steps=2)
    trainer.save()
    sharded_checkpoint.save_sharded(trainer.state_dict(), root / "sharded" / sharded_checkpoint.SHARDED_DIR,
                                    DistributedContext.single())
    return root, images


def copy_run(run, tmp_path, layout):
    root, images = run
    shutil.copytree(root / layout, tmp_path / "run")
    return tmp_path / "run", images


# ---------------------------------------------------------------------------------------------- planting
def plant_in_plain(path: Path, marker: Path, key: str) -> None:
    state = torch.load(path, weights_only=False)  # the test's own file: trusted here
    state[key] = Payload(marker)
    torch.save(state, path)


def plant_in_metadata(folder: Path, marker: Path) -> None:
    with open(folder / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)  # the test's own file: trusted here
    metadata.storage_meta = Payload(marker)
    with open(folder / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)


def plant_in_shard(folder: Path, marker: Path, entry: str, shard_file: str | None = None) -> str:
    """Replace the stored bytes of one entry (a tensor, or a non-tensor value such as the step) with a payload,
    appended to its shard file (under FSDP each rank's file holds a piece of each entry: `shard_file` picks one);
    the metadata is rewritten to point there. Returns the shard file's name."""
    with open(folder / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)
    index = next(index for index, info in metadata.storage_data.items()
                 if index.fqn == entry and shard_file in (None, info.relative_path))
    info = metadata.storage_data[index]
    shard = folder / info.relative_path
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)  # as DCP stores every entry
    blob = buffer.getvalue()
    offset = shard.stat().st_size
    with open(shard, "ab") as handle:
        handle.write(blob)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob))
    with open(folder / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    return info.relative_path


SHARDED_ENTRIES = ["student.backbone.cls_token", "step", "optimizer.param_groups.0.lr"]


def planted_sharded(run, tmp_path, where):
    folder, images = copy_run(run, tmp_path, "sharded")
    marker = tmp_path / "marker"
    dcp = folder / sharded_checkpoint.SHARDED_DIR
    if where == ".metadata":
        plant_in_metadata(dcp, marker)
        bad_file = ".metadata"
    elif where == "plain.pt":
        plant_in_plain(dcp / sharded_checkpoint.PLAIN_FILE, marker, "config")
        bad_file = sharded_checkpoint.PLAIN_FILE
    else:
        bad_file = plant_in_shard(dcp, marker, where)
    return folder, images, marker, bad_file


def assert_refused(error_text: str, bad_file: str, marker: Path) -> None:
    assert "refused" in error_text and bad_file in error_text and "builtins.exec" in error_text, error_text
    assert "nothing in it was executed" in error_text
    assert not marker.exists(), "the payload ran"


# ---------------------------------------------------------------------------------------------- training resume
def test_shard_entries_exist(run):
    """The planted entries are real entries of the format (a tensor and non-tensor values)."""
    metadata = sharded_checkpoint.read_metadata(run[0] / "sharded" / sharded_checkpoint.SHARDED_DIR)
    assert set(SHARDED_ENTRIES) <= {index.fqn for index in metadata.storage_data}


@pytest.mark.parametrize("key", ["step", "rng", "optimizer"])
def test_resume_refuses_a_payload_in_a_plain_checkpoint(run, tmp_path, key):
    folder, images = copy_run(run, tmp_path, "plain")
    marker = tmp_path / "marker"
    plant_in_plain(folder / checkpoint.LATEST, marker, key)
    with pytest.raises(UntrustedCheckpointError) as error:
        Trainer(tiny_config(images, folder))
    assert_refused(str(error.value), checkpoint.LATEST, marker)


@pytest.mark.parametrize("where", [".metadata", "plain.pt", *SHARDED_ENTRIES])
def test_resume_refuses_a_payload_in_any_file_of_a_sharded_checkpoint(run, tmp_path, where):
    folder, images, marker, bad_file = planted_sharded(run, tmp_path, where)
    with pytest.raises(UntrustedCheckpointError) as error:
        Trainer(tiny_config(images, folder))
    assert_refused(str(error.value), bad_file, marker)


def train_command(images, folder):
    return [sys.executable, str(REPO / "train.py"), f"data.path={images}", f"output_dir={folder}",
            "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.out_dim=64",
            "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "data.global_crop_size=16",
            "data.local_crop_size=8", "data.local_crops_number=2", "data.batch_size_per_gpu=4",
            "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1", "log_every=1", "monitor_every=2",
            "device=cpu"]


@pytest.mark.parametrize("layout, where", [("plain", "rng"), ("sharded", ".metadata"),
                                           ("sharded", "student.backbone.cls_token")])
def test_train_command_refuses_with_one_line(run, tmp_path, layout, where):
    if layout == "plain":
        folder, images = copy_run(run, tmp_path, "plain")
        marker, bad_file = tmp_path / "marker", checkpoint.LATEST
        plant_in_plain(folder / checkpoint.LATEST, marker, where)
    else:
        folder, images, marker, bad_file = planted_sharded(run, tmp_path, where)
    before = sorted(path.name for path in folder.rglob("*"))
    result = subprocess.run(train_command(images, folder), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert_refused(errors[0], bad_file, marker)
    assert sorted(path.name for path in folder.rglob("*")) == before, "the refused run wrote into its folder"


def torchrun(images, folder):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               *train_command(images, folder)[1:]]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=120)


def test_two_rank_checkpoint_with_a_payload_in_rank_1s_shard_is_refused_by_torchrun_and_one_process(run, tmp_path):
    folder, images = tmp_path / "run", run[1]
    assert torchrun(images, folder).returncode == 0  # FSDP over 2 ranks: one shard file per rank
    dcp = folder / sharded_checkpoint.SHARDED_DIR
    assert sorted(path.name for path in dcp.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    marker = tmp_path / "marker"  # in rank 1's rows of a teacher weight
    assert plant_in_shard(dcp, marker, "teacher.backbone.blocks.0.attn.qkv.weight", "__1_0.distcp") == "__1_0.distcp"
    result = torchrun(images, folder)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr  # rank 0 says it; rank 1 stops quietly
    assert_refused(errors[0], "__1_0.distcp", marker)
    with pytest.raises(UntrustedCheckpointError) as error:  # the same folder, continued by one process
        Trainer(tiny_config(images, folder))
    assert_refused(str(error.value), "__1_0.distcp", marker)


# ---------------------------------------------------------------------------------------------- other readers
@pytest.fixture
def reference_format_checkpoint(run, tmp_path):
    """A full checkpoint laid out as the reference main_dino.py writes it, with a payload in its `args`."""
    trained = checkpoint.load(run[0] / "plain" / checkpoint.LATEST)
    path, marker = tmp_path / "reference.pth", tmp_path / "marker"
    teacher = {key: value for key, value in trained["teacher"].items()}
    torch.save({"student": {f"module.{key}": value for key, value in trained["student"].items()},
                "teacher": teacher, "epoch": 1, "args": Payload(marker)}, path)
    return path, marker


def test_hub_and_export_refuse(reference_format_checkpoint, tmp_path):
    path, marker = reference_format_checkpoint
    with pytest.raises(UntrustedCheckpointError) as error:
        hub.load_pretrained(path, "vit_tiny", patch_size=8, depth=1, img_size=16)
    assert_refused(str(error.value), path.name, marker)
    with pytest.raises(UntrustedCheckpointError):
        hub.export_backbone(path, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists() and not marker.exists()


@pytest.mark.parametrize("command", ["knn", "linear", "attention"])
def test_eval_commands_refuse_with_one_line(reference_format_checkpoint, run, tmp_path, command):
    path, marker = reference_format_checkpoint
    images = run[1]
    arguments = {"knn": ["--train-dir", str(images), "--val-dir", str(images)],
                 "linear": ["--train-dir", str(images), "--val-dir", str(images), "--epochs", "1"],
                 "attention": ["--out-dir", str(tmp_path / "pictures")]}[command]
    result = subprocess.run(
        [sys.executable, "-m", f"fastdino.eval.{command}", "--checkpoint", str(path), "--arch", "vit_tiny",
         "--patch-size", "8", "--device", "cpu", *arguments],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert_refused(result.stderr, path.name, marker)


def test_knn_feature_cache_is_read_as_data(tmp_path):
    from fastdino.eval import knn

    marker = tmp_path / "marker"
    cache = tmp_path / "features.pt"
    torch.save({"features": torch.zeros(2, 3), "labels": Payload(marker)}, cache)
    with pytest.raises(UntrustedCheckpointError):
        checkpoint.load(cache)
    source = Path(knn.__file__).read_text()
    assert "torch.load" not in source and "checkpoint_io.load(path" in source
    assert not marker.exists()


# The safe loaders' own raw reads, each named: the one place a file is unpickled, the allow-listed unpickler of DCP's
# metadata (and its use), and DCP's reader that the data-only reader extends.
RAW_READS = {"fastdino/checkpoint.py": ["torch.load(source, map_location=map_location, weights_only=True)"],
             "fastdino/sharded_checkpoint.py": ["class _MetadataUnpickler(pickle.Unpickler)",
                                                "_MetadataUnpickler(handle, source)",
                                                "class _DataOnlyReader(dcp.FileSystemReader)"]}
UNPICKLERS = ("torch.load", "torch.serialization.load", "pickle.load", "pickle.loads", "np.load", "numpy.load")


def raw_reads(tree):
    """The calls and classes of a module that could unpickle a file without an allow-list, as source text."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            yield from (f"class {node.name}({ast.unparse(base)})" for base in node.bases
                        if ast.unparse(base).endswith(("Unpickler", "FileSystemReader")))
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
            if (name in UNPICKLERS or name.endswith(("Unpickler", "FileSystemReader"))
                    or keywords.get("weights_only") == "False"
                    or (name.endswith("dcp.load") and "storage_reader" not in keywords)):
                yield ast.unparse(node)


def test_no_reader_bypasses_the_safe_loaders():
    """Every place that reads a checkpoint goes through fastdino.checkpoint.load or the sharded safe reader; the
    loaders' own files too, but for their named raw reads (each exactly once)."""
    offenders = {}
    for path in [*REPO.glob("fastdino/**/*.py"), *REPO.glob("bench/*.py"), *REPO.glob("kernels/*.py"),
                 REPO / "train.py", REPO / "hubconf.py"]:
        name = str(path.relative_to(REPO))
        found = sorted(raw_reads(ast.parse(path.read_text())))
        if found != sorted(RAW_READS.get(name, [])):
            offenders[name] = found
    assert not offenders


# ---------------------------------------------------------------------------------------------- real files load
def test_real_checkpoints_of_both_formats_still_load(run, tmp_path):
    for layout in ("plain", "sharded"):
        folder, images = copy_run(run, tmp_path / layout, layout)
        assert Trainer(tiny_config(images, folder)).step == 2


def test_reference_checkpoint_without_payload_loads(run, tmp_path):
    import argparse

    trained = checkpoint.load(run[0] / "plain" / checkpoint.LATEST)
    path = tmp_path / "reference.pth"
    torch.save({"teacher": trained["teacher"], "epoch": 1, "args": argparse.Namespace(arch="vit_tiny")}, path)
    model = hub.load_pretrained(path, "vit_tiny", patch_size=8, depth=1, img_size=224)
    expected = hub.backbone_state_dict(trained["teacher"])
    assert all(torch.equal(model.state_dict()[key], value) for key, value in expected.items())
