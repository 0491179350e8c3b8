"""Every rule's boundary: each numeric setting's edge value (the equality case of every >= and >, both ends of every
interval, 0 where 0 means off) is accepted or refused as the rule's words say, and a bool is refused where an integer
goes and an integer where a bool goes, both ways. The kinds of rule below are written from the settings'
documentation, not read from fastdino.config's rules (only the declared types are)."""
import dataclasses
import typing

import pytest

from fastdino.config import Config, ConfigError, load_config
from fastdino.rules import Switch

TINY = 1e-9
# key -> (what the documentation says, overrides that make the edge value consistent with the other settings)
KINDS = {
    "model.patch_size": ("> 0", ["model.pos_embed_size=1", "data.global_crop_size=1", "data.local_crop_size=1",
                                 "eval.image_size=1", "eval.attention_image_size=1"]),
    "model.pos_embed_size": ("> 0", ["model.patch_size=1"]),
    "model.depth": ("> 0", []),
    "model.out_dim": ("> 0", []),
    "model.head_hidden_dim": ("> 0", []),
    "model.head_bottleneck_dim": ("> 0", []),
    "model.head_nlayers": ("> 0", []),
    "model.drop_path_rate": ("[0, 1)", []),
    "data.global_crops_scale": ("area", []),
    "data.local_crops_scale": ("area", []),
    "data.local_crops_number": (">= 0", []),
    "data.global_crop_size": ("> 0", ["model.patch_size=1"]),
    "data.local_crop_size": ("> 0", ["model.patch_size=1"]),
    "data.batch_size_per_gpu": ("> 0", []),
    "data.micro_batches": ("> 0", []),
    "data.num_workers": (">= 0", []),
    "optim.lr": ("> 0", []),
    "optim.min_lr": (">= 0", []),
    "optim.warmup_epochs": (">= 0", []),
    "optim.weight_decay": (">= 0", []),
    "optim.weight_decay_end": (">= 0", []),
    "optim.clip_grad": (">= 0", []),
    "optim.freeze_last_layer": (">= 0", []),
    "optim.epochs": ("> 0", ["optim.warmup_epochs=0", "optim.freeze_last_layer=0"]),
    "dino.momentum_teacher": ("[0, 1]", []),
    "dino.warmup_teacher_temp": ("> 0", []),
    "dino.teacher_temp": ("> 0", []),
    "dino.warmup_teacher_temp_epochs": (">= 0", []),
    "dino.student_temp": ("> 0", []),
    "dino.center_momentum": ("[0, 1]", []),
    "eval.knn_every_epochs": (">= 0", []),
    "eval.knn_k": ("> 0", []),
    "eval.knn_temperature": ("> 0", []),
    "eval.image_size": ("> 0", ["model.patch_size=1"]),
    "eval.attention_images": (">= 0", []),
    "eval.attention_image_size": ("> 0", ["model.patch_size=1"]),
    "distributed.checkpointed_blocks": (">= 0", []),
    "guard.band": ("(0, 0.5)", []),
    "guard.drift": ("(0, 1]", []),
    "guard.patience": (">= 0", []),
    "seed": (">= 0", []),
    "log_every": ("> 0", []),
    "monitor_every": (">= 0", ["guard.action=warn"]),
    "checkpoint_every": (">= 0", []),
    "saveckp_freq": (">= 0", []),
}


def annotations(section=Config, prefix=""):
    """{dotted key: declared type} of every setting."""
    found = {}
    for name, kind in typing.get_type_hints(section).items():
        if dataclasses.is_dataclass(kind):
            found.update(annotations(kind, f"{prefix}{name}."))
        else:
            found[prefix + name] = kind
    return found


TYPES = annotations()
INTEGER = {key for key, kind in TYPES.items() if kind in (int, int | None, int | str)}
FLOATS = sorted(key for key, kind in TYPES.items() if kind is float)
BOOLS = sorted(key for key, kind in TYPES.items() if kind is bool)
SWITCHES = sorted(key for key, kind in TYPES.items() if kind == Switch)


def edges(key, kind):
    """(value as typed, accepted?, words of the refusal) at the edges of `kind` for `key`."""
    low = "1" if key in INTEGER else str(TINY)
    below = "-1" if key in INTEGER else str(-TINY)
    zero = "0" if key in INTEGER else "0.0"
    if kind == "> 0":
        return [(zero, False, "must be > 0"), (low, True, None)]
    if kind == ">= 0":
        return [(zero, True, None), (below, False, "must be >= 0")]
    if kind == "area":
        return [("[1e-9, 1e-9]", True, None), ("[0.5, 0.5]", True, None), ("[0.5, 1.0]", True, None),
                ("[0.0, 0.5]", False, "0 < low <= high <= 1"), ("[0.5, 0.4999]", False, "0 < low <= high <= 1"),
                ("[0.5, 1.000001]", False, "0 < low <= high <= 1")]
    low_end, high_end = kind[0] == "[", kind[-1] == "]"
    low_value, high_value = (float(part) for part in kind[1:-1].split(", "))
    words = f"must be in {kind}"
    return [(str(low_value), low_end, words), (str(low_value - TINY), False, words),
            (str(high_value), high_end, words), (str(high_value + TINY), False, words),
            (str(low_value + TINY), True, None), (str(high_value - TINY), True, None)]


CASES = [(key, value, accepted, words, context) for key, (kind, context) in KINDS.items()
         for value, accepted, words in edges(key, kind)]


def test_the_table_has_every_numeric_setting():
    numeric = {key for key in TYPES if key in INTEGER or key in FLOATS or typing.get_origin(TYPES[key]) is tuple}
    assert set(KINDS) == numeric


@pytest.mark.parametrize("key, value, accepted, words, context", CASES,
                         ids=[f"{case[0]}={case[1]}" for case in CASES])
def test_each_edge_value_is_accepted_or_refused_as_the_rule_says(key, value, accepted, words, context):
    overrides = [*context, f"{key}={value}"]
    if accepted:
        load_config(None, overrides)
    else:
        with pytest.raises(ConfigError) as error:
            load_config(None, overrides)
        assert str(error.value).startswith(f"{key}=") and words in str(error.value), str(error.value)


CROSS_KEY = [  # the consistency rules between keys, at their equality case and one step past it
    (["model.patch_size=16", "data.global_crop_size=16"], None),
    (["model.patch_size=16", "data.global_crop_size=17"], "must be a multiple of model.patch_size (16)"),
    (["model.patch_size=16", "eval.attention_images=1", "eval.attention_image_size=16"], None),
    (["model.patch_size=16", "eval.attention_images=1", "eval.attention_image_size=15"], "must be >= model.patch_size"),
    (["data.batch_size_per_gpu=6", "data.micro_batches=6"], None),
    (["data.batch_size_per_gpu=6", "data.micro_batches=4"], "must divide data.batch_size_per_gpu (6)"),
    (["optim.epochs=10", "optim.warmup_epochs=10", "optim.freeze_last_layer=10",
      "dino.warmup_teacher_temp_epochs=10"], None),
    (["optim.epochs=10", "optim.warmup_epochs=11"], "must be <= optim.epochs (10)"),
    (["optim.epochs=10", "optim.warmup_epochs=0", "optim.freeze_last_layer=11"], "must be <= optim.epochs (10)"),
    (["optim.epochs=10", "optim.warmup_epochs=0", "dino.warmup_teacher_temp_epochs=11"], "must be <= optim.epochs"),
    (["monitor_every=1", "guard.action=stop"], None),
]


@pytest.mark.parametrize("overrides, words", CROSS_KEY, ids=[" ".join(case[0]) for case in CROSS_KEY])
def test_each_rule_between_keys_at_its_edge(overrides, words):
    if words is None:
        load_config(None, overrides)
    else:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, overrides)


@pytest.mark.parametrize("key, value, words", [
    *[(key, value, "expected an integer") for key in sorted(INTEGER) for value in ("true", "false")],
    *[(key, value, "expected a finite number") for key in FLOATS for value in ("true", "false")],
    *[(key, value, "expected true or false") for key in BOOLS for value in ("1", "0")],
    *[(key, value, "expected true, false or auto") for key in SWITCHES for value in ("1", "0")],
])
def test_bools_are_refused_where_numbers_go_and_numbers_where_bools_go(key, value, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{key}={value}"])
    assert str(error.value).startswith(f"{key}={value}: ") and words in str(error.value), str(error.value)


@pytest.mark.parametrize("override, words", [
    ("data.global_crops_scale=[a, 0.5]", "expected a list of 2 numbers"),  # one item of a pair not a number
    ("output_dir=true", "expected a string"),  # a bool is no name
])
def test_a_value_of_the_wrong_kind_inside_a_pair_or_for_a_string(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, [override])


def test_a_number_where_a_name_goes_is_that_name():
    config = load_config(None, ["output_dir=5", "data.path=0.5"])
    assert (config.output_dir, config.data.path) == ("5", "0.5")


def test_a_setting_of_a_type_without_a_conversion_is_a_programming_error_naming_it():
    from fastdino.rules import convert

    with pytest.raises(TypeError, match="config annotation <class 'list'> has no conversion"):
        convert([1], list)


def test_values_shown_as_typed():
    from fastdino.rules import show

    assert show({"lr": 0.5, "on": True, "path": "", "scale": (0.4, 1.0), "depth": None}) == \
        "{lr: 0.5, on: true, path: '', scale: [0.4, 1.0], depth: null}"


OPTIM_KEYS = ("optim.optimizer, optim.lr, optim.min_lr, optim.warmup_epochs, optim.weight_decay, "
              "optim.weight_decay_end, optim.clip_grad, optim.freeze_last_layer, optim.epochs")


@pytest.mark.parametrize("override, said", [
    ("optim.lrr=1", "unknown config key 'optim.lrr': did you mean 'optim.lr'?"),  # the same section's
    ("optim.batch_size_per_gpu=4",  # the same name in another section
     "unknown config key 'optim.batch_size_per_gpu': did you mean 'data.batch_size_per_gpu'?"),
    ("optimm.warmup=1", "unknown config key 'optimm.warmup': did you mean 'optim.warmup_epochs'?"),  # whole key
    ("optim.zzzzzz=1", f"unknown config key 'optim.zzzzzz': the keys of optim are {OPTIM_KEYS}"),
    ("zzzzzz=1", "unknown config key 'zzzzzz': valid keys are model.*, data.*, optim.*, dino.*, fast.*, eval.*, "
                 "distributed.*, guard.*, resume_from.*, output_dir, seed, device, precision, log_every, "
                 "monitor_every, checkpoint_every, saveckp_freq, resume"),
    ("optim.lr={a: [1}", "optim.lr={a: [1}: the value is not valid YAML (expected ',' or ']', but got '}' at line 1, "
                         "column 7)")])  # the problem, not the context YAML's first line names
def test_an_unusable_override_is_one_line_that_says_what_was_meant(override, said):
    with pytest.raises(ConfigError) as refused:
        load_config(None, [override])
    assert str(refused.value) == said


def test_an_override_value_is_everything_after_the_first_equals_sign_and_may_be_empty():
    assert load_config(None, ["data.path=/a=b"]).data.path == "/a=b"
    assert load_config(None, ["data.path="]).data.path == ""


@pytest.mark.parametrize("content, said", [
    (b"3\n", "holds a single int, not a mapping of settings (section: {key: value})"),
    (b"- 3\n", "holds a list, not a mapping of settings (section: {key: value})"),
    (b"\xff\xfe", "cannot be read: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    (b"optim:\n  lr: [1\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1")])
def test_an_unusable_config_file_is_one_line_naming_it(tmp_path, content, said):
    (tmp_path / "recipe.yaml").write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "recipe.yaml")
    assert str(refused.value) == f"config file {tmp_path / 'recipe.yaml'} {said}"


def test_the_cross_setting_rules_hold_at_their_edges_and_say_what_is_missing(tmp_path):
    (tmp_path / "reference.pth").write_bytes(b"")
    accepted = [["eval.image_size=100"],  # not a multiple of the patch: fine while no kNN evaluation reads it
                ["data.micro_batches=auto"],
                ["distributed.activation_checkpointing=true", "distributed.checkpointed_blocks=12"],  # all 12 blocks
                [f"resume_from.path={tmp_path / 'reference.pth'}", "resume_from.trust_reference_args=true"]]
    for overrides in accepted:
        load_config(None, overrides)
    for overrides, said in (
            (["monitor_every=0", "guard.action=stop"],
             "guard.action=stop: needs monitor_every > 0 (the guard reads the monitors)"),
            (["resume_from.trust_reference_args=true"],
             "resume_from.trust_reference_args=true: needs resume_from.path (the reference checkpoint whose args it "
             "adopts)")):
        with pytest.raises(ConfigError) as refused:
            load_config(None, overrides)
        assert str(refused.value) == said
