"""Config loading: recipes parse, overrides keep their types, bad keys and values fail with clear messages."""
from pathlib import Path

import pytest

from fastdino.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_the_reference_main_dino_defaults():
    config = Config()
    assert (config.model.arch, config.model.patch_size, config.model.out_dim) == ("vit_small", 16, 65536)
    assert config.model.norm_last_layer and not config.model.use_bn_in_head
    assert (config.dino.momentum_teacher, config.dino.teacher_temp, config.dino.warmup_teacher_temp) == (
        0.996, 0.04, 0.04)
    assert (config.optim.lr, config.optim.min_lr, config.optim.warmup_epochs) == (0.0005, 1e-6, 10)
    assert (config.optim.weight_decay, config.optim.weight_decay_end, config.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (config.data.local_crops_number, config.data.global_crops_scale) == (8, (0.4, 1.0))
    assert (config.optim.freeze_last_layer, config.model.drop_path_rate, config.optim.epochs) == (1, 0.1, 100)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    config = load_config(path)
    assert config_from_dict(config_to_dict(config)) == config


def test_recipes_have_the_paper_settings():
    config = load_config(Path(__file__).parent.parent / "configs" / "vit_small_p8.yaml")
    assert (config.model.arch, config.model.patch_size, config.data.local_crops_number) == ("vit_small", 8, 10)
    assert (config.dino.teacher_temp, config.dino.warmup_teacher_temp_epochs) == (0.07, 30)


def test_overrides_keep_types():
    config = load_config(None, ["optim.lr=1e-3", "data.path=/x", "fast.packed=true", "model.depth=4",
                                "data.local_crops_scale=[0.1, 0.3]", "output_dir=runs/a"])
    assert config.optim.lr == 0.001 and isinstance(config.optim.lr, float)
    assert config.data.path == "/x" and config.fast.packed is True and config.model.depth == 4
    assert config.data.local_crops_scale == (0.1, 0.3) and config.output_dir == "runs/a"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr': did you mean 'optim.lr'?"),
        ("nope=1", "unknown config key 'nope'"),
        ("optim.lr=fast", "optim.lr=fast: expected a finite number"),
        ("optim.epochs=1.5", "optim.epochs=1.5: expected an integer"),
        ("fast.fused_loss=maybe", "expected true, false or auto"),
        ("model.arch=vit_huge", "must be one of vit_tiny, vit_small, vit_base"),
        ("data.global_crops_scale=[0.5]", "expected a list of 2 numbers"),
        ("data.local_crops_scale=[0.5, 0.1]", "0 < low <= high <= 1"),
        ("lr", "not of the form key=value"),
    ],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
