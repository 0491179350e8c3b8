"""Every default a user relies on without writing it, run through `fastdino ...` (the console script's `cli.main`)
without the option: export and eval take the teacher, export writes the reference layout, kNN and the linear probe
see 224 px crops with the reference's k, temperature, epochs, lr, batch and feature rule, attention draws the bundled
photos at 480 px into attention_maps/ with 60% of the mass kept, plan plans one GPU under CUDA and no memory, train
without --config trains the reference's settings, a benchmark without --smoke is a GPU run and a smoke run without
--out writes nothing. Each checked against the documented value, not against the parser that sets it."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, write_image_folder
from PIL import Image
from torchvision import datasets, transforms

from fastdino import checkpoint, cli
from fastdino import train as train_command
from fastdino.config import Config
from fastdino.data import demo_dataset
from fastdino.eval import attention, knn, linear
from fastdino.eval.attention import save_attention_maps
from fastdino.hub import export_backbone, load_pretrained
from fastdino.models import vit_tiny
from fastdino.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
# the reference's eval transform (eval_knn.py, eval_linear.py): Resize(256, bicubic), CenterCrop(224), ImageNet stats
REFERENCE_EVAL = transforms.Compose([
    transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224),
    transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def fastdino(*words):
    """`fastdino WORDS` in this process, as the console script runs it."""
    return cli.main([str(word) for word in words])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run's checkpoint.pth, its trainer (whose teacher and student differ) and a folder of 10 images."""
    root = tmp_path_factory.mktemp("defaults")
    images = write_image_folder(root / "images", count=10)
    trainer = Trainer(tiny_config(images, root / "run"))
    trainer.train(stop_after_steps=3)
    trainer.save()
    teacher, student = trainer.teacher.backbone.state_dict(), trainer.student.backbone.state_dict()
    assert any(not torch.equal(teacher[key], student[key]) for key in teacher), "no teacher/student difference"
    return root / "run" / checkpoint.LATEST, trainer, images


def reference_features(backbone, folder):
    """L2-normalized CLS features and labels of `folder` through the reference's transform, in ImageFolder order."""
    dataset = datasets.ImageFolder(str(folder), REFERENCE_EVAL)
    with torch.no_grad():
        features = backbone.eval()(torch.stack([image for image, _ in dataset]))
    return F.normalize(features, dim=1), torch.tensor(dataset.targets)


def test_export_without_options_writes_the_teachers_backbone_in_the_reference_layout(run, tmp_path, capsys):
    path, trainer, _ = run
    fastdino("export", path, "--out", tmp_path / "backbone.pth")
    written = torch.load(tmp_path / "backbone.pth", weights_only=True)
    teacher = trainer.teacher.backbone.state_dict()
    assert written.keys() == teacher.keys()
    assert all(torch.equal(written[key], teacher[key]) for key in teacher), "not the teacher's weights"
    assert capsys.readouterr().out.endswith(" in the reference layout; loaded back strictly into timm's "
                                            "VisionTransformer and fastdino's ViT, same features\n")


def test_knn_without_options_takes_the_teachers_224_px_features_with_the_references_k_and_temperature(
        run, tmp_path, capsys, monkeypatch):
    path, trainer, images = run
    votes = []

    def noting_classify(*arguments, k, temperature, **options):
        votes.append((k, temperature))
        return classify(*arguments, k=k, temperature=temperature, **options)

    classify = knn.knn_classify
    monkeypatch.setattr(knn, "knn_classify", noting_classify)
    val = write_image_folder(tmp_path / "val", count=2)
    fastdino("eval", "knn", "--checkpoint", path, "--train-dir", images, "--val-dir", val, "--num-workers", 0,
             "--device", "cpu", "--cache-dir", tmp_path / "cache")
    cached = torch.load(next((tmp_path / "cache").glob("features-images-*.pt")), weights_only=True)
    train_features, train_labels = reference_features(trainer.teacher.backbone, images)
    assert torch.equal(cached["labels"], train_labels)
    assert torch.allclose(cached["features"], train_features, atol=1e-5), "not the teacher's 224 px features"
    # k 10, 20, 100, 200 at temperature 0.07: only 10 fits 10 train images, the others are skipped and said so
    assert votes == [(10, 0.07)]
    printed = [line for line in capsys.readouterr().out.splitlines() if "-NN:" in line or "skipped" in line]
    assert printed[0].startswith("10-NN: top-1 ") and printed[1:] == [
        f"k={k} skipped: only 10 train images" for k in (20, 100, 200)], printed


def test_linear_without_options_runs_the_references_protocol(tmp_path, monkeypatch):
    """The probe itself is tested with these values given (test_linear.py); here: the command passes the reference's
    eval_linear.py defaults (ViT-S/Ti rule: CLS of the last 4 blocks, no pooled patch token) when none is typed."""
    torch.manual_seed(0)
    backbone = export_backbone(vit_tiny(patch_size=8, depth=4, img_size=16), tmp_path / "backbone.pth")
    folder = write_image_folder(tmp_path / "images", count=2)
    given = {}

    def probe(network, train_dir, val_dir, image_size, device, **options):
        given.update(options, image_size=image_size, network=network)
        return {"best_top1": 50.0}

    monkeypatch.setattr(linear, "linear_probe", probe)
    fastdino("eval", "linear", "--checkpoint", backbone, "--train-dir", folder, "--val-dir", folder)
    network = given.pop("network")
    assert given == dict(image_size=224, n_last_blocks=4, avgpool=False, epochs=100, batch_size=128, base_lr=0.001,
                         num_workers=linear.EVAL_WORKERS, amp=False, seed=0, output_dir=None)
    assert all(torch.equal(value, network.state_dict()[key]) for key, value in load_pretrained(backbone)
               .state_dict().items())


def test_attention_without_options_draws_the_bundled_photos_at_480_px_keeping_60_percent(run, tmp_path,
                                                                                         monkeypatch):
    path, trainer, _ = run
    photo = demo_dataset.demo_attention_images()[0]  # one of them: each takes seconds at 480 px
    monkeypatch.setattr(demo_dataset, "demo_attention_images", lambda: [photo])
    drawn = []

    def noting_save(backbone, image, out_dir, image_size, name, keep):
        drawn.append((name, image, out_dir, image_size, keep, backbone.state_dict()))
        return save_attention_maps(backbone, image, out_dir, image_size, name, keep)

    monkeypatch.setattr(attention, "save_attention_maps", noting_save)
    monkeypatch.chdir(tmp_path)
    fastdino("eval", "attention", "--checkpoint", path)
    [(name, image, out_dir, image_size, keep, weights)] = drawn
    assert (name, image, out_dir, image_size, keep) == (*photo, "attention_maps", 480, 0.6)
    teacher = trainer.teacher.backbone.state_dict()
    assert all(torch.equal(weights[key], teacher[key]) for key in teacher), "not the teacher's weights"
    with Image.open(tmp_path / "attention_maps" / f"{name}.png") as picture:
        assert min(picture.size) == 480, picture.size  # the reference's size, patch 8


def test_plan_without_options_plans_one_cuda_process_and_no_memory(capsys):
    fastdino("plan", "configs/vit_small_p16.yaml")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(", bf16, flash attention, strategy none over 1 process"), lines[0]
    assert lines[-1].startswith("total ") and not any(line.startswith(("fits in", "does not fit in", "auto ("))
                                                     for line in lines), lines


def test_train_without_a_config_trains_the_references_settings(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(config):
        raise Stop(config)

    monkeypatch.setattr(train_command, "check_runnable", stop)
    with pytest.raises(Stop) as stopped:
        fastdino("train", f"data.path={tmp_path}")
    expected = Config()
    expected.data.path = str(tmp_path)
    assert stopped.value.args[0] == expected


def test_a_benchmark_without_smoke_is_a_gpu_run_and_a_smoke_run_without_out_writes_nothing(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fastdino"])
    results = sorted((REPO / "bench" / "results").rglob("*"))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as stop:
            fastdino("bench", "env")
        assert stop.value.code == 2
        assert capsys.readouterr().err == "error: no CUDA device: run with --smoke for the CPU check\n"
    fastdino("bench", "env", "--smoke")  # the cheapest benchmark; the options are every benchmark's (bench_parser)
    assert "wrote" not in capsys.readouterr().out
    assert sorted((REPO / "bench" / "results").rglob("*")) == results
