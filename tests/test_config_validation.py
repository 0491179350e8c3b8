"""Every bad setting is one clear line, before anything heavy: every config key has a bad value here that must be
refused as `key=value: what is allowed`, the machine and data checks of fastdino.preflight refuse what cannot run
(and only that), and the commands (train.py, the eval commands, a benchmark) turn each into one line and exit 2."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_image_folder

import fastdino.data.dali
from fastdino import preflight
from fastdino.config import RULES, Config, ConfigError, get_value, load_config
from fastdino.builders import resolve_device, resolve_fast_paths, resolve_precision

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
NEEDS_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA refuses")
KNN = ["eval.final_knn=true", "eval.knn_train_path=/a", "eval.knn_val_path=/b"]

# (key, bad value as typed and as the message shows it, fragment of what is allowed, overrides set before it)
BAD = [
    ("model.arch", "vit_huge", "must be one of vit_tiny, vit_small, vit_base", []),
    ("model.patch_size", "0", "must be > 0", []),
    ("model.pos_embed_size", "0", "must be > 0", []),
    ("model.pos_embed_size", "100", "must be a multiple of model.patch_size (16)", []),
    ("model.depth", "0", "must be > 0, or null", []),
    ("model.depth", "2.5", "expected an integer or null", []),
    ("model.out_dim", "0", "must be > 0", []),
    ("model.norm_last_layer", "maybe", "expected true or false", []),
    ("model.use_bn_in_head", "1", "expected true or false", []),
    ("model.head_hidden_dim", "-1", "must be > 0", []),
    ("model.head_bottleneck_dim", "0", "must be > 0", []),
    ("model.head_nlayers", "0", "must be > 0", []),
    ("model.drop_path_rate", "1.0", "must be in [0, 1)", []),
    ("model.drop_path_rate", "-0.1", "must be in [0, 1)", []),
    ("model.attention", "flash", "must be one of auto, xformers, sdpa, math", []),
    ("data.path", "[1]", "expected a string", []),
    ("data.loader", "pil", "must be one of auto, dali, gpu_decode, torch", []),
    ("data.global_crops_scale", "[0.5, 0.1]", "0 < low <= high <= 1", []),
    ("data.global_crops_scale", "[0.5]", "expected a list of 2 numbers", []),
    ("data.local_crops_scale", "[0.0, 0.4]", "0 < low <= high <= 1", []),
    ("data.local_crops_scale", "[0.05, 1.5]", "0 < low <= high <= 1", []),
    ("data.local_crops_number", "-1", "must be >= 0", []),
    ("data.global_crop_size", "0", "must be > 0", []),
    ("data.global_crop_size", "100", "must be a multiple of model.patch_size (16)", []),
    ("data.local_crop_size", "90", "must be a multiple of model.patch_size (16)", []),
    ("data.batch_size_per_gpu", "0", "must be > 0", []),
    ("data.micro_batches", "0", "must be > 0, or auto (the fewest that fit the device's memory)", []),
    ("data.micro_batches", "some", "must be > 0, or auto (the fewest that fit the device's memory)", []),
    ("data.micro_batches", "true", "expected an integer or a string", []),
    ("data.micro_batches", "3", "must divide data.batch_size_per_gpu (64) into equal micro-batches", []),
    ("data.num_workers", "-1", "must be >= 0 (0: load in the training process)", []),
    ("optim.optimizer", "lamb", "must be one of adamw, sgd", []),
    ("optim.lr", "-0.001", "must be > 0", []),
    ("optim.lr", "nan", "expected a finite number", []),
    ("optim.min_lr", "-1e-06", "must be >= 0", []),
    ("optim.warmup_epochs", "-1", "must be >= 0", []),
    ("optim.warmup_epochs", "101", "must be <= optim.epochs (100)", []),
    ("optim.weight_decay", "-0.1", "must be >= 0", []),
    ("optim.weight_decay_end", "-0.4", "must be >= 0", []),
    ("optim.clip_grad", "-3.0", "must be >= 0 (0: off)", []),
    ("optim.freeze_last_layer", "-1", "must be >= 0", []),
    ("optim.freeze_last_layer", "101", "must be <= optim.epochs (100)", []),
    ("optim.epochs", "0", "must be > 0", []),
    ("optim.epochs", "1.5", "expected an integer", []),
    ("dino.momentum_teacher", "1.5", "must be in [0, 1]", []),
    ("dino.warmup_teacher_temp", "0.0", "must be > 0", []),
    ("dino.teacher_temp", "-0.04", "must be > 0", []),
    ("dino.warmup_teacher_temp_epochs", "-1", "must be >= 0", []),
    ("dino.warmup_teacher_temp_epochs", "101", "must be <= optim.epochs (100)", []),
    ("dino.student_temp", "0.0", "must be > 0", []),
    ("dino.center_momentum", "-0.1", "must be in [0, 1]", []),
    ("fast.fused_loss", "maybe", "expected true, false or auto", []),
    ("fast.fused_ema", "1", "expected true, false or auto", []),
    ("fast.packed", "fast", "expected true, false or auto", []),
    ("fast.efficient_drop_path", "null", "expected true, false or auto", []),
    ("fast.fused_adamw", "2", "expected true, false or auto", []),
    ("fast.sync_free_clip", "sometimes", "expected true, false or auto", []),
    ("fast.compile", "[true]", "expected true, false or auto", []),
    ("eval.knn_train_path", "[a]", "expected a string", []),
    ("eval.knn_train_path", "''", "must name a folder of class folders (eval.final_knn=true", ["eval.final_knn=true"]),
    ("eval.knn_val_path", "''", "(eval.knn_every_epochs=2 evaluates on it)",
     ["eval.knn_every_epochs=2", "eval.knn_train_path=/a"]),
    ("eval.knn_every_epochs", "-1", "must be >= 0 (0: off)", []),
    ("eval.knn_k", "0", "must be > 0", []),
    ("eval.knn_temperature", "0.0", "must be > 0", []),
    ("eval.image_size", "0", "must be > 0", []),
    ("eval.image_size", "100", "must be a multiple of model.patch_size (16)", KNN),
    ("eval.final_knn", "maybe", "expected true or false", []),
    ("eval.attention_images", "-1", "must be >= 0 (0: off)", []),
    ("eval.attention_image_size", "0", "must be > 0", []),
    ("eval.attention_image_size", "8", "must be >= model.patch_size (16)", ["eval.attention_images=2"]),
    ("distributed.strategy", "zero", "must be one of auto, fsdp, ddp, none", []),
    ("distributed.activation_checkpointing", "sometimes", "expected true, false or auto", []),
    ("distributed.checkpointed_blocks", "-1", "must be >= 0 (0: all blocks)", []),
    ("distributed.checkpointed_blocks", "13", "must be <= the model's 12 blocks", []),
    ("distributed.checkpointed_blocks", "3", "must be <= the model's 2 blocks", ["model.depth=2"]),
    ("guard.action", "halt", "must be one of warn, stop", []),
    ("guard.action", "stop", "needs monitor_every > 0 (the guard reads the monitors)", ["monitor_every=0"]),
    ("guard.band", "0.5", "must be in (0, 0.5)", []),
    ("guard.drift", "0.0", "must be in (0, 1]", []),
    ("guard.patience", "-1", "must be >= 0 (0: at the first reading that shows it)", []),
    ("output_dir", "[a, b]", "expected a string", []),
    ("seed", "-1", "must be >= 0", []),
    ("device", "gpu", "must be one of auto, cuda, cpu", []),
    ("precision", "fp8", "must be one of auto, bf16, fp16, fp32", []),
    ("log_every", "0", "must be > 0", []),
    ("monitor_every", "-5", "must be >= 0 (0: off)", []),
    ("checkpoint_every", "-1", "must be >= 0 (0: at epoch ends only)", []),
    ("saveckp_freq", "-20", "must be >= 0 (0: off)", []),
    ("resume", "maybe", "expected true or false", []),
    ("resume_from.path", "/no/such/checkpoint.pth", "must be an existing file (a checkpoint.pth of main_dino.py)", []),
    ("resume_from.trust_reference_args", "maybe", "expected true or false", []),
    ("resume_from.trust_reference_args", "true", "needs resume_from.path", []),
]

# Values at the edge of what is allowed: a rule must not be stricter than its message says.
GOOD = [
    "model.depth=null", "model.drop_path_rate=0", "data.local_crops_number=0", "data.num_workers=0",
    "data.global_crops_scale=[1, 1]", "optim.min_lr=0", "optim.warmup_epochs=100", "optim.weight_decay=0",
    "optim.clip_grad=0", "optim.freeze_last_layer=0", "dino.momentum_teacher=1", "dino.center_momentum=0",
    "dino.warmup_teacher_temp_epochs=100", "eval.knn_every_epochs=0", "eval.attention_images=0", "seed=0",
    "monitor_every=0", "checkpoint_every=0", "saveckp_freq=0", "optim.lr=1e-3", "fast.packed=auto",
    "guard.drift=1", "guard.patience=0",
]


def config_keys(section: object = Config(), prefix: str = "") -> list[str]:
    """Every settable key of the config, found by walking the dataclasses."""
    keys = []
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        nested = dataclasses.is_dataclass(value)
        keys += config_keys(value, f"{prefix}{field.name}.") if nested else [prefix + field.name]
    return keys


def test_every_key_has_a_bad_value_case():
    missing = sorted(set(config_keys()) - {key for key, *_ in BAD})
    assert not missing, f"keys without a bad-value case in BAD: {missing}"


def test_every_rule_belongs_to_a_key():
    assert set(RULES) <= set(config_keys()), "a misspelt key in RULES would never be checked"


@pytest.mark.parametrize("key, value, allowed, before", BAD, ids=[f"{case[0]}={case[1]}" for case in BAD])
def test_bad_value_is_one_line_naming_key_value_and_what_is_allowed(key, value, allowed, before):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*before, f"{key}={value}"])
    message = str(error.value)
    assert message.startswith(f"{key}={value}: ") and allowed in message and "\n" not in message


@pytest.mark.parametrize("key, value, allowed", [case[:3] for case in BAD if not case[3]][:12])
def test_bad_value_in_a_config_file_reads_the_same(key, value, allowed, tmp_path):
    section, _, name = key.rpartition(".")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n" if section else f"{name}: {value}\n")
    with pytest.raises(ConfigError, match="^" + (f"{key}={value}: ").replace("[", r"\[")):
        load_config(path)


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=lambda path: path.name if path else "defaults")
def test_defaults_and_recipes_pass_every_rule(path):
    config = load_config(path)
    for key, rule in RULES.items():
        assert rule.allows(get_value(config, key)), f"{path}: {key}"


def test_values_at_the_edge_of_the_rules_are_accepted():
    load_config(None, GOOD)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr': did you mean 'optim.lr'?"),
    ("model.lr=0.1", "unknown config key 'model.lr': did you mean 'optim.lr'?"),
    ("mdoel.arch=vit_tiny", "unknown config key 'mdoel.arch': did you mean 'model.arch'?"),
    ("optim.learning_rate=0.1", "unknown config key 'optim.learning_rate': the keys of optim are optim.optimizer, "),
    ("nothing=1", "unknown config key 'nothing': valid keys are model.*, data.*, "),
    ("optim.lr", "override 'optim.lr' is not of the form key=value"),
    ("optim.lr=[1,", "optim.lr=[1,: the value is not valid YAML"),
    ("optim=3", "optim=3: expected a mapping of its keys"),
])
def test_unknown_keys_and_malformed_overrides(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("content, message", [
    ("- a\n- b\n", "holds a list, not a mapping of settings"),
    ("just text\n", "holds a single string, not a mapping"),
    ("optim: {lr: [1,\n", "is not valid YAML: "),
    ("optim:\n  lr: 1\n lr2: 2\n", "is not valid YAML: "),
])
def test_config_file_that_is_not_a_mapping_of_settings(content, message, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"config file {path} {message}") and "\n" not in str(error.value)


def test_config_file_missing_or_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist$"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is not a file$"):
        load_config(tmp_path)


# ------------------------------------------------------------------ preflight: machine and data

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), count=8)


@NEEDS_CPU_ONLY
@pytest.mark.parametrize("setting, message", [
    ("device=cuda", "device=cuda needs a CUDA GPU (none found); use device=auto or cpu"),
    ("precision=fp16", "precision=fp16 needs a CUDA GPU (none found); use precision=bf16 or fp32"),
    ("fast.fused_loss=true", "fast.fused_loss=true needs a CUDA GPU (none found); use fast.fused_loss=auto or false"),
    ("model.attention=xformers", "model.attention=xformers needs a CUDA GPU (none found); use model.attention=auto"),
])
def test_preflight_refuses_what_this_machine_cannot_run(setting, message, images, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the test suite runs Triton kernels interpreted on CPU
    with pytest.raises(ConfigError) as error:
        preflight.check_runnable(tiny_config(images, tmp_path / "run", setting))
    assert str(error.value).startswith(message)


@NEEDS_CPU_ONLY
@pytest.mark.parametrize("setting", ["fast.fused_ema=true", "fast.packed=true", "fast.efficient_drop_path=true",
                                     "fast.fused_adamw=true", "data.loader=gpu_decode", "precision=bf16"])
def test_preflight_allows_what_runs_on_the_cpu(setting, images, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    preflight.check_runnable(tiny_config(images, tmp_path / "run", setting))


def test_fused_loss_is_allowed_where_the_triton_interpreter_runs_it(images, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    preflight.check_runnable(tiny_config(images, tmp_path / "run", "fast.fused_loss=true"))


def test_dali_loader_needs_the_dali_package(images, tmp_path, monkeypatch):
    monkeypatch.setattr(fastdino.data.dali, "DALI_IMPORT_ERROR", "ModuleNotFoundError: No module named 'nvidia'")
    with pytest.raises(ConfigError, match=r"^data.loader=dali needs the nvidia.dali package \(ModuleNotFound"):
        preflight.check_runnable(tiny_config(images, tmp_path / "run", "data.loader=dali"))


@NEEDS_CPU_ONLY
def test_trainer_resolution_follows_the_same_rules(images, tmp_path, monkeypatch):
    """One rule: a Trainer built without train.py (tests, benchmarks) is refused with the same line."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="^device=cuda needs a CUDA GPU"):
        resolve_device(tiny_config(images, tmp_path, "device=cuda"))
    with pytest.raises(ConfigError, match="^precision=fp16 needs a CUDA GPU"):
        resolve_precision(tiny_config(images, tmp_path, "precision=fp16"), cpu)
    with pytest.raises(ConfigError, match="^fast.fused_loss=true needs a CUDA GPU"):
        resolve_fast_paths(tiny_config(images, tmp_path, "fast.fused_loss=true"), cpu)
    assert resolve_precision(tiny_config(images, tmp_path, "precision=bf16"), cpu) == torch.bfloat16


@pytest.mark.parametrize("settings, world_size, message", [
    (["data.path={missing}"], "1", "data.path={missing}: dataset folder '{missing}' does not exist"),
    (["data.path="], "1", "data.path is not set: pass data.path=/path/to/images"),
    (["data.batch_size_per_gpu=9"], "1", "data.batch_size_per_gpu=9: one global batch (x 1 process) needs 9 "
                                         "images, data.path={images} holds 8; use a smaller batch"),
    ([], "4", "data.batch_size_per_gpu=4: one global batch (x 4 processes) needs 16 images"),
    (["eval.final_knn=true", "eval.knn_train_path={missing}", "eval.knn_val_path={images}"], "1",
     "eval.knn_train_path={missing}: dataset folder '{missing}' does not exist"),
    (["eval.knn_every_epochs=1", "eval.knn_train_path={images}", "eval.knn_val_path={missing}"], "1",
     "eval.knn_val_path={missing}: dataset folder"),
    (["eval.final_knn=true", "eval.knn_train_path={images}", "eval.knn_val_path={images}"], "1",
     "eval.knn_k=20: must be <= the 8 images of eval.knn_train_path={images}"),
])
def test_preflight_checks_the_data_before_training(settings, world_size, message, images, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    paths = {"images": images, "missing": tmp_path / "missing"}
    config = tiny_config(images, tmp_path / "run", *(setting.format(**paths) for setting in settings))
    with pytest.raises(ConfigError) as error:
        preflight.check_runnable(config)
    assert str(error.value).startswith(message.format(**paths))


def test_preflight_passes_a_runnable_config(images, tmp_path):
    preflight.check_runnable(tiny_config(images, tmp_path / "run", "eval.final_knn=true", "eval.knn_k=4",
                                         f"eval.knn_train_path={images}", f"eval.knn_val_path={images}"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the commands: one line, exit code 2

def run_command(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "WORLD_SIZE", "RANK")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_usage_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {message}"), result.stderr


TRAIN_CASES = [
    (["optim.lr=-0.001"], "optim.lr=-0.001: must be > 0"),
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr': did you mean 'optim.lr'?"),
    (["optim.lr"], "override 'optim.lr' is not of the form key=value"),
    (["--config", "{listing}"], "config file {listing} holds a list, not a mapping of settings"),
    (["eval.final_knn=true", "eval.knn_train_path={missing}", "eval.knn_val_path={images}",
      "data.batch_size_per_gpu=4"],
     "eval.knn_train_path={missing}: dataset folder '{missing}' does not exist"),
    pytest.param(["fast.fused_loss=true"], "fast.fused_loss=true needs a CUDA GPU (none found)", marks=NEEDS_CPU_ONLY),
]


@pytest.mark.parametrize("arguments, message", TRAIN_CASES)
def test_train_command_refuses_with_one_line_and_writes_nothing(arguments, message, images, tmp_path):
    listing = tmp_path / "listing.yaml"
    listing.write_text("- optim.lr=0.1\n")
    paths = {"listing": listing, "missing": tmp_path / "missing", "images": images}
    output_dir = tmp_path / "run"
    result = run_command("train.py", f"data.path={images}", f"output_dir={output_dir}",
                         *(argument.format(**paths) for argument in arguments))
    assert_one_line_usage_error(result, message.format(**paths))
    assert not output_dir.exists()


@pytest.fixture
def eval_inputs(tmp_path):
    checkpoint = tmp_path / "backbone.pth"
    checkpoint.touch()  # options are checked before the checkpoint is read
    folders = {name: write_image_folder(tmp_path / name, count=2) for name in ("train", "val")}
    return {"checkpoint": checkpoint, "missing": tmp_path / "missing", **folders}


def eval_arguments(command: str, inputs: dict) -> list[str]:
    common = ["--checkpoint", str(inputs["checkpoint"]), "--device", "cpu"]
    folders = ["--train-dir", str(inputs["train"]), "--val-dir", str(inputs["val"])]
    return common + (folders if command in ("knn", "linear") else [])


@pytest.mark.parametrize("command, bad, message", [
    ("knn", ["--k", "10", "0"], "--k=0: must be > 0"),
    ("knn", ["--temperature", "0"], "--temperature=0.0: must be > 0"),
    ("knn", ["--train-dir", "{missing}"], "--train-dir={missing}: must be an existing folder"),
    ("knn", ["--image-size", "-1"], "--image-size=-1: must be > 0"),
    ("knn", ["--checkpoint", "{missing}"], "--checkpoint={missing}: must be an existing file"),
    ("knn", ["--arch", "vit_huge"], "--arch=vit_huge: must be one of vit_tiny, vit_small, vit_base"),
    ("knn", ["--device", "cuda:99"], "--device=cuda:99: must be cpu or a CUDA device"),
    ("linear", ["--epochs", "0"], "--epochs=0: must be > 0"),
    ("linear", ["--lr", "-0.1"], "--lr=-0.1: must be > 0"),
    ("linear", ["--batch-size", "0"], "--batch-size=0: must be > 0"),
    ("linear", ["--patch-size", "0"], "--patch-size=0: must be > 0"),
    ("attention", ["--keep", "0"], "--keep=0.0: must be in (0, 1]"),
    ("attention", ["--keep", "1.5"], "--keep=1.5: must be in (0, 1]"),
    ("attention", ["--image", "{missing}"], "--image={missing}: must be an existing file or folder"),
    ("attention", ["--image-size", "x"], "argument --image-size: invalid int value: 'x' (see --help)"),
])
def test_eval_commands_refuse_bad_options_with_one_line(command, bad, message, eval_inputs, capsys):
    module = {"knn": "fastdino.eval.knn", "linear": "fastdino.eval.linear", "attention": "fastdino.eval.attention"}
    main = __import__(module[command], fromlist=["main"]).main
    with pytest.raises(SystemExit) as stop:
        main(eval_arguments(command, eval_inputs) + [argument.format(**eval_inputs) for argument in bad])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(**eval_inputs)}") and err.count("\n") == 1, err


def test_eval_command_line_refuses_with_one_line(eval_inputs):
    result = run_command("-m", "fastdino.eval.knn", *eval_arguments("knn", eval_inputs), "--batch-size", "0")
    assert_one_line_usage_error(result, "--batch-size=0: must be > 0")


def test_benchmark_refuses_bad_options_with_one_line():
    result = run_command("bench/bench_step.py", "--smoke", "--batch", "0")
    assert_one_line_usage_error(result, "--batch=0: must be > 0")
