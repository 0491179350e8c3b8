"""What a run shows at its end (fastdino.report): the random-init twin is built only where something uses it (the
kNN's baseline, the held-out pictures of a kNN's val folder), and the curves are drawn from the log."""
import pytest
from helpers import tiny_config, write_image_folder

from fastdino import report
from fastdino.run_folder import CURVES, PICTURES
from fastdino.trainer import Trainer


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", count=8)


@pytest.mark.parametrize("settings, twins", [
    (["eval.attention_images=1"], 0),  # the bundled photos only: nothing to compare with
    (["eval.final_knn=true"], 1),
    (["eval.attention_images=1", "eval.final_knn=true"], 1),  # one twin for the kNN and the held-out pictures
])
def test_the_random_init_twin_is_built_only_where_it_is_used(images, tmp_path, monkeypatch, settings, twins):
    built = []
    original = report.initial_backbone
    monkeypatch.setattr(report, "initial_backbone", lambda config: built.append(config) or original(config))
    knn = [f"eval.knn_train_path={images}", f"eval.knn_val_path={images}", "eval.knn_k=2", "eval.image_size=16"]
    config = tiny_config(images, tmp_path / "run", "eval.attention_image_size=16", *settings,
                         *(knn if "eval.final_knn=true" in settings else []))
    trainer = Trainer(config)
    trainer.train(stop_after_steps=1)
    results = report.final_report(config, trainer.teacher_backbone(), trainer.device, trainer.step)
    assert len(built) == twins
    assert (tmp_path / "run" / CURVES).is_file()
    assert (tmp_path / "run" / PICTURES).is_dir() == ("eval.attention_images=1" in settings)
    assert ("knn_top1_random_init" in results) == bool(twins)
