"""Any checkpoint rebuilds its network with no architecture flags; the reference's full main_dino.py checkpoints
load; `python -m fastdino.export` writes both layouts and checks them; torch.hub builds the backbone."""
import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import tiny_config, write_image_folder
from test_hub import reference_backbone_state_dict, reference_head_state_dict, timm_features
from test_vit import reference_interpolate_pos_encoding

from fastdino import checkpoint, sharded_checkpoint
from fastdino.checkpoint import CheckpointError, UntrustedCheckpointError
from fastdino.distributed import DistributedContext
from fastdino.export import export, main as export_main, read_weights, timm_model
from fastdino.hub import describe_backbone, load_pretrained
from fastdino.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = ["model.depth=4", "model.patch_size=4", "model.pos_embed_size=16", "model.out_dim=1024",
              "model.head_hidden_dim=512", "model.head_bottleneck_dim=128", "data.global_crop_size=16",
              "data.local_crop_size=8"]


@pytest.fixture(scope="module")
def demo_like_run(tmp_path_factory):
    """A run with the demo's network (ViT-Tiny/4, 4 blocks, 16 px crops), stopped mid-epoch, in both formats."""
    root = tmp_path_factory.mktemp("demo_like")
    images = write_image_folder(root / "images")
    trainer = Trainer(tiny_config(images, root / "run", *DEMO_MODEL))
    trainer.train(stop_after_steps=3)
    trainer.save()
    sharded_checkpoint.save_sharded(trainer.state_dict(), root / "run" / sharded_checkpoint.SHARDED_DIR,
                                    DistributedContext.single())
    return root / "run", images, trainer


def pictures(image_size):
    return torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))


def features(model, image_size):
    with torch.no_grad():
        return model.eval()(pictures(image_size))


@pytest.mark.parametrize("layout", [checkpoint.LATEST, sharded_checkpoint.SHARDED_DIR])
@pytest.mark.parametrize("key", ["teacher", "student"])
def test_a_run_rebuilds_its_network_without_flags(demo_like_run, layout, key):
    run, _, trainer = demo_like_run
    model = load_pretrained(run / layout, checkpoint_key=key)
    assert describe_backbone(model.state_dict()) == {"arch": "vit_tiny", "patch_size": 4, "depth": 4, "img_size": 16}
    network = trainer.teacher if key == "teacher" else trainer.student
    assert torch.equal(features(model, 16), features(network.backbone, 16))


def test_a_run_at_small_crops_holds_the_reference_parameters(tmp_path):
    """By default the position embedding is the reference's 224 px grid whatever the crop size: a run on 16 px crops
    exports weights that timm's ViT at img_size=224 (the reference's shape) loads strictly, with the same features at
    224 px and, through the reference's interpolation formula, at the 16 px training crop."""
    images = write_image_folder(tmp_path / "images")
    trainer = Trainer(tiny_config(images, tmp_path / "run"))
    assert trainer.config.data.global_crop_size == 16 and trainer.config.model.pos_embed_size == 224
    trainer.train(stop_after_steps=2)
    trainer.save()
    export(tmp_path / "run" / checkpoint.LATEST, tmp_path / "teacher.pth", "reference")
    weights = read_weights(tmp_path / "teacher.pth")
    ours = trainer.teacher.backbone
    for img_size in (224, 16):
        reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1, patch_size=8,
                                      img_size=224).eval()
        reference.load_state_dict(weights, strict=True)
        if img_size != 224:  # the reference interpolates per crop; timm would resize by size, a different rule
            grid = reference_interpolate_pos_encoding(weights["pos_embed"], img_size, img_size, 8)
            reference.pos_embed = torch.nn.Parameter(grid)
            reference.patch_embed.img_size, reference.patch_embed.grid_size = (img_size,) * 2, (img_size // 8,) * 2
        with torch.no_grad():
            expected = reference.forward_features(pictures(img_size))[:, 0]
        torch.testing.assert_close(features(ours, img_size), expected, rtol=1e-4, atol=1e-5)


def test_a_flag_that_contradicts_the_file_is_one_line(demo_like_run):
    run, images, _ = demo_like_run
    result = subprocess.run([sys.executable, "-m", "fastdino.eval.knn", "--checkpoint", str(run / checkpoint.LATEST),
                             "--patch-size", "16", "--train-dir", str(images), "--val-dir", str(images),
                             "--device", "cpu", "--image-size", "16", "--k", "3", "--num-workers", "0"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {run / checkpoint.LATEST} holds a vit_tiny backbone with patch size 4 "
                                     "and depth 4, not patch_size=16; leave out the flag, or pass the matching "
                                     "checkpoint")


def test_knn_command_takes_a_sharded_folder_with_no_flags(demo_like_run):
    run, images, _ = demo_like_run
    outputs = []
    for source in (run / checkpoint.LATEST, run / sharded_checkpoint.SHARDED_DIR):
        result = subprocess.run([sys.executable, "-m", "fastdino.eval.knn", "--checkpoint", str(source),
                                 "--train-dir", str(images), "--val-dir", str(images), "--device", "cpu",
                                 "--image-size", "16", "--k", "3", "--num-workers", "0"],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr
        outputs.append([line for line in result.stdout.splitlines() if line.startswith("3-NN")])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 1


# ------------------------------------------------------------------------ the reference's full checkpoints
def reference_full_checkpoint(path, steps=3):
    """A checkpoint laid out as main_dino.py saves it, after real optimizer steps whose lr and weight decay were set
    from numpy schedules (so the optimizer groups hold numpy floats), with its argparse args and fp16 scaler."""
    backbone = reference_backbone_state_dict(seed=5)
    student = {**{f"module.backbone.{k}": v.clone() for k, v in backbone.items()},
               **reference_head_state_dict("module.head.")}
    parameters = [torch.nn.Parameter(value.clone()) for value in student.values()]
    optimizer = torch.optim.AdamW([{"params": parameters[::2]}, {"params": parameters[1::2], "weight_decay": 0.0}])
    lr_schedule, wd_schedule = np.linspace(1e-4, 5e-4, steps), np.linspace(0.04, 0.06, steps)
    for step in range(steps):
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[step]
            if index == 0:
                group["weight_decay"] = wd_schedule[step]
        sum((p ** 2).sum() for p in parameters).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert isinstance(optimizer.state_dict()["param_groups"][0]["lr"], np.floating)
    torch.save({"student": student, "teacher": {f"backbone.{k}": v for k, v in backbone.items()},
                "optimizer": optimizer.state_dict(), "epoch": 3,
                "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=32, lr=np.float64(5e-4)),
                "dino_loss": {"center": torch.zeros(1, 32)},
                "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                "growth_interval": 2000, "_growth_tracker": 7}}, path)
    return backbone


def test_a_real_reference_checkpoint_loads_without_flags(tmp_path):
    backbone = reference_full_checkpoint(tmp_path / "checkpoint.pth")
    model = load_pretrained(tmp_path / "checkpoint.pth")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(images)
    assert torch.allclose(ours, timm_features(backbone, images), atol=1e-5)


def test_numpy_arrays_are_still_refused(tmp_path):
    torch.save({"teacher": reference_backbone_state_dict(seed=5), "extra": np.zeros(3)}, tmp_path / "c.pth")
    with pytest.raises(UntrustedCheckpointError, match="numpy"):
        load_pretrained(tmp_path / "c.pth")


# ------------------------------------------------------------------------ export
@pytest.mark.parametrize("name", ["teacher.safetensors", "teacher.pth"])
@pytest.mark.parametrize("format", ["reference", "timm"])
def test_export_round_trips_and_loads_into_timm(demo_like_run, tmp_path, name, format):
    run, _, trainer = demo_like_run
    line = export(run / sharded_checkpoint.SHARDED_DIR, tmp_path / name, format)
    assert line.startswith(f"wrote {tmp_path / name}: the teacher backbone") and "same features" in line
    written = read_weights(tmp_path / name)
    (tmp_path / "any_file").write_bytes(b"")  # the permissions this user's files get (umask)
    assert (tmp_path / name).stat().st_mode & 0o777 == (tmp_path / "any_file").stat().st_mode & 0o777
    if name.endswith(".safetensors"):
        with open(tmp_path / name, "rb") as handle:  # a safetensors file: JSON header, no pickle
            assert handle.read(9)[8:9] == b"{"
    independent = timm_model({"arch": "vit_tiny", "patch_size": 4, "depth": 4, "img_size": 16})
    independent.load_state_dict(written, strict=True)
    assert torch.allclose(features(independent, 16), features(trainer.teacher.backbone, 16), atol=1e-5)


def test_export_command_prints_what_it_wrote(demo_like_run, tmp_path):
    run, _, _ = demo_like_run
    result = subprocess.run([sys.executable, "-m", "fastdino.export", str(run / checkpoint.LATEST), "--out",
                             str(tmp_path / "student.pth"), "--checkpoint-key", "student"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'student.pth'}: the student backbone")
    assert "vit_tiny, patch 4, depth 4, 16 px position grid" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "fastdino.export", str(run / checkpoint.LATEST), "--out",
                          str(tmp_path / "x.pth"), "--format", "onnx"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--format" in bad.stderr


@pytest.mark.parametrize("name, format", [("x.onnx", "reference"), ("x", "timm"), ("x.onnx", "reference-run")])
def test_a_suffix_export_does_not_write_is_refused_before_writing(demo_like_run, tmp_path, capsys, name, format):
    """`--out x.onnx` wrote a PyTorch pickle under that name: refused, one line listing the suffixes written."""
    run, _, _ = demo_like_run
    with pytest.raises(SystemExit) as stop:
        export_main([str(run / checkpoint.LATEST), "--out", str(tmp_path / "out" / name), "--format", format])
    error = capsys.readouterr().err
    accepted = ".pth or .pt (a PyTorch pickle)"
    if format != "reference-run":  # a reference run is main_dino.py's pickle, never safetensors
        accepted = f".safetensors (safetensors), {accepted}"
    assert stop.value.code == 2 and error.count("\n") == 1 and error.endswith(f"; name the file {accepted}\n"), error
    assert error.startswith(f"error: --out {tmp_path / 'out' / name}: fastdino export --format {format} does not "
                            f"write {'.onnx' if name.endswith('.onnx') else 'a name without suffix'}")
    assert not (tmp_path / "out").exists()


def test_a_pt_name_is_a_pytorch_pickle(demo_like_run, tmp_path):
    run, _, trainer = demo_like_run
    export(run / checkpoint.LATEST, tmp_path / "teacher.pt", "timm")
    independent = timm_model({"arch": "vit_tiny", "patch_size": 4, "depth": 4, "img_size": 16})
    independent.load_state_dict(torch.load(tmp_path / "teacher.pt", weights_only=True), strict=True)
    assert torch.allclose(features(independent, 16), features(trainer.teacher.backbone, 16), atol=1e-5)


def test_an_incomplete_sharded_folder_is_one_line(tmp_path):
    (tmp_path / "checkpoint_dcp").mkdir()
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint \\(no .metadata or plain.pt\\)$"):
        load_pretrained(tmp_path / "checkpoint_dcp")


def test_a_run_folder_given_as_checkpoint_names_the_checkpoint_in_it(demo_like_run):
    run, _, _ = demo_like_run
    with pytest.raises(CheckpointError, match=f"; a run folder\\? pass {run / checkpoint.LATEST}$"):
        load_pretrained(run)


def test_torch_hub_builds_and_loads_the_backbone(demo_like_run):
    run, _, trainer = demo_like_run
    model = torch.hub.load(str(REPO), "vit_tiny", patch_size=4, weights=str(run / checkpoint.LATEST),
                           source="local")
    assert torch.equal(features(model, 16), features(trainer.teacher.backbone, 16))
    from_the_file = torch.hub.load(str(REPO), "vit_tiny", weights=str(run / checkpoint.LATEST), source="local")
    assert torch.equal(features(from_the_file, 16), features(model, 16))  # no patch_size: the file's
    random_init = torch.hub.load(str(REPO), "vit_small", patch_size=8, source="local")
    assert random_init.patch_embed.proj.weight.shape == (384, 3, 8, 8)
    assert torch.hub.load(str(REPO), "vit_small", source="local").patch_embed.patch_size == 16  # the reference's


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_a_checkpoint_key_with_reference_run_is_refused_before_anything_is_written(demo_like_run, tmp_path, capsys,
                                                                                    key):
    run, _, _ = demo_like_run
    out = tmp_path / "ref.pth"
    with pytest.raises(SystemExit) as exit_code:
        export_main([str(run / checkpoint.LATEST), "--out", str(out), "--format", "reference-run",
                     "--checkpoint-key", key])
    assert exit_code.value.code == 2 and not out.exists()
    assert capsys.readouterr().err == (f"error: --checkpoint-key {key}: --format reference-run writes the whole run, "
                                       "teacher and student; leave the key out\n")
