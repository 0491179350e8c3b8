"""Checkpoint interchange: files written here in the reference's formats (key names spelled out independently of
fastdino.models) load into fastdino's ViT and give the features timm computes from the same weights; exports
round-trip and load into timm with strict=True."""
import argparse
import functools

import pytest
import timm
import torch

from fastdino.checkpoint import CheckpointError, UntrustedCheckpointError
from fastdino.hub import backbone_state_dict, export_backbone, load_pretrained
from fastdino.models import DINOHead, MultiCropWrapper, vit_small

TINY = dict(embed_dim=192, depth=2, heads=3, patch=16, img=32)  # timm's vit_tiny shape, 2 blocks, 2x2 patches


def reference_backbone_state_dict(seed, embed_dim=TINY["embed_dim"], depth=TINY["depth"], patch=TINY["patch"],
                                  img=TINY["img"]):
    """Random weights under the key names and shapes of the reference DINO ViT (vision_transformer.py)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return scale * torch.randn(*shape, generator=generator)

    hidden, tokens = 4 * embed_dim, 1 + (img // patch) ** 2
    state = {"cls_token": rand(1, 1, embed_dim), "pos_embed": rand(1, tokens, embed_dim),
             "patch_embed.proj.weight": rand(embed_dim, 3, patch, patch), "patch_embed.proj.bias": rand(embed_dim)}
    for i in range(depth):
        for name, shape in (("norm1", (embed_dim,)), ("attn.qkv", (3 * embed_dim, embed_dim)),
                            ("attn.proj", (embed_dim, embed_dim)), ("norm2", (embed_dim,)),
                            ("mlp.fc1", (hidden, embed_dim)), ("mlp.fc2", (embed_dim, hidden))):
            weight = 1 + rand(*shape) if name.startswith("norm") else rand(*shape)
            state[f"blocks.{i}.{name}.weight"] = weight
            state[f"blocks.{i}.{name}.bias"] = rand(shape[0])
    state["norm.weight"], state["norm.bias"] = 1 + rand(embed_dim), rand(embed_dim)
    return state


def reference_head_state_dict(prefix, in_dim=TINY["embed_dim"], seed=99):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"mlp.0.weight": (64, in_dim), "mlp.0.bias": (64,), "mlp.2.weight": (64, 64), "mlp.2.bias": (64,),
              "mlp.4.weight": (16, 64), "mlp.4.bias": (16,), "last_layer.weight_g": (32, 1),
              "last_layer.weight_v": (32, 16)}
    return {prefix + name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


@functools.cache
def timm_tiny():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=TINY["depth"],
                             img_size=TINY["img"]).eval()


def timm_features(state_dict, images):
    """CLS token after the final norm, computed by timm from the same weights (an independent implementation)."""
    model = timm_tiny()
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        return model.forward_features(images)[:, 0]


def load_tiny(source, **kw):
    return load_pretrained(source, "vit_tiny", patch_size=TINY["patch"], depth=TINY["depth"], img_size=TINY["img"],
                           **kw)


def features(model, images):
    with torch.no_grad():
        return model(images)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, TINY["img"], TINY["img"], generator=torch.Generator().manual_seed(0))


def test_official_backbone_weights_give_timms_features(tmp_path, images):
    weights = reference_backbone_state_dict(seed=1)
    torch.save(weights, tmp_path / "dino_deittiny16_pretrain.pth")
    model = load_tiny(tmp_path / "dino_deittiny16_pretrain.pth")
    assert not model.training
    torch.testing.assert_close(features(model, images), timm_features(weights, images), rtol=1e-4, atol=1e-4)


def test_released_full_checkpoint_teacher_and_student(tmp_path, images):
    teacher, student = reference_backbone_state_dict(seed=2), reference_backbone_state_dict(seed=3)
    checkpoint = {
        # the student is DDP-wrapped in the reference (module.), the teacher is not; both sit in the multi-crop wrapper
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                    **reference_head_state_dict("module.head.")},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **reference_head_state_dict("head.")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, lr=0.0005, data_path="/imagenet/train"),
        "dino_loss": {"center": torch.zeros(1, 32)},
    }
    torch.save(checkpoint, tmp_path / "dino_full_checkpoint.pth")
    loaded_teacher = load_tiny(tmp_path / "dino_full_checkpoint.pth")
    loaded_student = load_tiny(tmp_path / "dino_full_checkpoint.pth", checkpoint_key="student")
    torch.testing.assert_close(features(loaded_teacher, images), timm_features(teacher, images), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features(loaded_student, images), timm_features(student, images), rtol=1e-4, atol=1e-4)


def test_pre_release_checkpoint_without_prefixes_and_old_head_names(tmp_path, images):
    teacher = reference_backbone_state_dict(seed=4)
    old_head = {"projection_head.0.weight": torch.randn(64, 192), "projection_head.0.bias": torch.randn(64),
                "prototypes.weight": torch.randn(32, 64)}
    torch.save({"teacher": {**teacher, **old_head}, "epoch": 3}, tmp_path / "old.pth")
    torch.testing.assert_close(features(load_tiny(tmp_path / "old.pth"), images), timm_features(teacher, images),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_fastdino_training_checkpoint(tmp_path, images, compiled):
    torch.manual_seed(5)
    teacher = MultiCropWrapper(load_tiny(reference_backbone_state_dict(seed=5)), DINOHead(192, 32, hidden_dim=64,
                                                                                          bottleneck_dim=16))
    state = teacher.state_dict()
    if compiled:  # torch.compile(module).state_dict() prefixes every key with _orig_mod.
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    assert any(k.endswith("head.last_layer.weight_g") for k in state)
    torch.save({"teacher": state, "student": state, "step": 7, "config": {"model": {"arch": "vit_tiny"}}},
               tmp_path / "checkpoint.pth")
    loaded = load_tiny(tmp_path / "checkpoint.pth")
    torch.testing.assert_close(features(loaded, images), features(teacher.backbone.eval(), images))


def test_export_round_trips_with_reference_keys(tmp_path, images):
    weights = reference_backbone_state_dict(seed=6)
    checkpoint = {"teacher": {**{f"module.backbone.{k}": v for k, v in weights.items()},
                              **reference_head_state_dict("module.head.")}, "epoch": 1}
    torch.save(checkpoint, tmp_path / "full.pth")
    exported = export_backbone(tmp_path / "full.pth", tmp_path / "out" / "backbone.pth")
    on_disk = torch.load(exported, weights_only=True)
    assert list(on_disk) == list(weights), "exported keys must be the reference's, in its order"
    for key in weights:
        assert torch.equal(on_disk[key], weights[key]), key
    model = load_tiny(exported)
    # re-exporting the loaded module writes the same file content
    again = torch.load(export_backbone(model, tmp_path / "again.pth"), weights_only=True)
    assert list(again) == list(weights) and all(torch.equal(again[k], weights[k]) for k in weights)
    torch.testing.assert_close(features(model, images), timm_features(weights, images), rtol=1e-4, atol=1e-4)
    assert not list(tmp_path.glob("**/*.tmp")), "the atomic write must not leave its temporary file"


def test_export_loads_into_timm_vit_small_patch8_strict(tmp_path, monkeypatch):
    # The init does not matter here and trunc_normal_ of 22M weights takes seconds on a busy CPU: plain normal_.
    monkeypatch.setattr(torch.nn.init, "trunc_normal_", lambda tensor, std=1.0, **_: tensor.detach().normal_(0.0, std))
    torch.manual_seed(7)
    wrapper = MultiCropWrapper(vit_small(patch_size=8), DINOHead(384, 16, hidden_dim=32, bottleneck_dim=8))
    with torch.device("meta"):  # timm's init of 22M weights would cost seconds; strict loading checks names/shapes
        reference = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    export_backbone({"teacher": wrapper.state_dict(), "step": 1}, tmp_path / "vits8.pth")
    reference.load_state_dict(torch.load(tmp_path / "vits8.pth", weights_only=True), strict=True, assign=True)
    ours = wrapper.backbone.state_dict()
    assert set(reference.state_dict()) == set(ours)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(tensor, ours[key]), key


class NotATensor:
    """A class that weights_only loading refuses to unpickle."""


def test_unknown_formats_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"unrecognized checkpoint format.*'model'"):
        backbone_state_dict({"model": {"conv1.weight": torch.zeros(1)}, "epoch": 1})
    with pytest.raises(ValueError, match=r"neither a DINO ViT backbone nor its head.*'conv1.weight'"):
        backbone_state_dict({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"no ViT backbone weights.*'head.mlp.0.weight'"):
        backbone_state_dict(reference_head_state_dict("head."))
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*missing.pth"):
        load_tiny(tmp_path / "missing.pth")
    torch.save({"teacher": NotATensor()}, tmp_path / "pickled_object.pth")
    with pytest.raises(UntrustedCheckpointError, match=r"refused .*pickled_object.pth: it holds a pickled object of "
                                                       r"type test_hub.NotATensor"):
        load_tiny(tmp_path / "pickled_object.pth")


def test_architecture_mismatch_is_explained():
    weights = reference_backbone_state_dict(seed=8)
    with pytest.raises(CheckpointError, match="holds a vit_tiny backbone with patch size 16 and depth 2, not "
                                              "patch_size=8; leave out the flag"):
        load_pretrained(weights, "vit_tiny", patch_size=8)
    with pytest.raises(CheckpointError, match="not arch=vit_small"):
        load_pretrained(weights, "vit_small")
    with pytest.raises(ValueError, match="img_size"):
        load_pretrained(weights, "vit_tiny", patch_size=16, depth=TINY["depth"], img_size=64)
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(weights, "vit_tiny", patch_size=16, depth=3, img_size=TINY["img"])
