"""A run of the reference main_dino.py continues in fastdino, and a fastdino run continues in the reference
(fastdino.reference_run): checkpoints made by a transcription of the reference's loop (tests/reference_loop.py) with
the ViT-S/16 recipe's norm_last_layer=false, across the lr warmup and the last layer's unfreezing, load by name, and
both sides then compute the same losses and weights within float32 rounding. Reference files are data only."""
import io
import json
import logging
import pickle
import shutil
import zipfile

import pytest
import torch
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from helpers import assert_identical, run_on_two_ranks, state_of, tiny_config, write_image_folder
from reference_loop import ReferenceLoop, reference_args
from test_checkpoint_safety import Payload

from fastdino.checkpoint import UntrustedCheckpointError
from fastdino.config import config_to_dict
from fastdino.export import main as export_main
from fastdino.reference_run import ReferenceRunError, canonical_name, open_reference_run, read_reference_checkpoint
from fastdino.train import main as train_main
from fastdino.trainer import Trainer

STEPS_PER_EPOCH = 4  # 16 images, batch 4
LR = 0.064  # per 256 images: 1e-3 at batch 4, so that each step moves the weights far above float32 rounding
RECIPE = dict(arch="vit_tiny", patch_size=8, out_dim=64, norm_last_layer=False, batch_size_per_gpu=4, epochs=4,
              warmup_epochs=1, freeze_last_layer=1, local_crops_number=2, drop_path_rate=0.0, lr=LR,
              warmup_teacher_temp_epochs=2, teacher_temp=0.07, saveckp_freq=1)
# The same recipe in fastdino, on top of helpers.tiny_config (whose network and crops the transcription builds).
SAME_RECIPE = ["model.norm_last_layer=false", "model.drop_path_rate=0", "optim.epochs=4", f"optim.lr={LR}",
               "dino.warmup_teacher_temp_epochs=2", "dino.teacher_temp=0.07"]
CONTINUED_STEPS = 4


def crops(it: int) -> list[torch.Tensor]:
    """The fixed batch of iteration `it`: 2 global crops of 16 px, 2 local of 8 px, 4 images each."""
    generator = torch.Generator().manual_seed(100 + it)
    return ([torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
            + [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(2)])


def fastdino_config(images, output_dir, source, *extra):
    return tiny_config(images, output_dir, *SAME_RECIPE, f"resume_from.path={source}", *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two epochs of main_dino.py (fp16 scaler on): epoch 0 warms the lr up with the last layer frozen, epoch 1 trains
    it too; saved after each as main_dino.py does (checkpoint.pth, and checkpoint0000.pth, checkpoint0001.pth)."""
    root = tmp_path_factory.mktemp("reference")
    images = write_image_folder(root / "images")
    (root / "ref").mkdir()
    loop = ReferenceLoop(reference_args(**RECIPE), STEPS_PER_EPOCH)
    for epoch in range(2):
        for it in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
            loop.train_step(crops(it), it)
        loop.save(root / "ref" / "checkpoint.pth", epoch)
        loop.save(root / "ref" / f"checkpoint{epoch:04}.pth", epoch)
    return root, images


def moments_by_name(model, optimizer) -> dict:
    """An optimizer's per-parameter state keyed by the parameter's name (from the live module, not from a file)."""
    return {canonical_name(name): optimizer.state[param] for name, param in model.named_parameters()
            if param in optimizer.state}


def assert_agree(ours: dict, theirs: dict, total_lr: float) -> None:
    """Same tensors within float32 rounding. One exception: the key bias (middle third of attn.qkv.bias) has an exactly
    zero gradient (the softmax ignores a shift shared by all keys), so Adam turns rounding noise into steps of up to
    ~lr; there both sides only have to stay within the largest distance Adam can move it."""
    assert ours.keys() == theirs.keys()
    for name in theirs:
        a, b = ours[name], theirs[name]
        if name.endswith("attn.qkv.bias"):
            (q_a, k_a, v_a), (q_b, k_b, v_b) = a.chunk(3), b.chunk(3)
            assert (k_a - k_b).abs().max() <= 4 * total_lr, name
            a, b = torch.cat([q_a, v_a]), torch.cat([q_b, v_b])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda text: f"{name}: {text}")


def networks(trainer) -> dict:
    ours = state_of(trainer)
    return {"student": ours["student"], "teacher": ours["teacher"], "center": ours["center"]}


def reference_networks(loop) -> dict:
    return {"student": loop.student.module.state_dict(), "teacher": loop.teacher.state_dict(),
            "center": loop.dino_loss.center}


def continue_both(trainer, loop, first: int) -> None:
    """CONTINUED_STEPS more iterations on both sides from iteration `first`; losses agree at each, then the weights."""
    for it in range(first, first + CONTINUED_STEPS):
        theirs = loop.train_step(crops(it), it)
        ours = trainer.train_step(crops(it)).loss.item()
        assert ours == pytest.approx(theirs, rel=1e-6), it
    total_lr = float(sum(loop.lr_schedule[first:first + CONTINUED_STEPS]))
    ours, theirs = networks(trainer), reference_networks(loop)
    for key in ("student", "teacher"):
        assert_agree(ours[key], theirs[key], total_lr)
    torch.testing.assert_close(ours["center"], theirs["center"], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- reference -> fastdino
@pytest.mark.parametrize("name, epoch", [("checkpoint.pth", 2), ("checkpoint0000.pth", 1)])
def test_fastdino_continues_a_reference_run_as_the_reference_does(reference, tmp_path, caplog, name, epoch):
    root, images = reference
    source = root / "ref" / name
    loop = ReferenceLoop(reference_args(**RECIPE), STEPS_PER_EPOCH)
    loop.restart_from(source)
    with caplog.at_level(logging.INFO, logger="fastdino"):
        trainer = Trainer(fastdino_config(images, tmp_path / "run", source))
    assert trainer.step == loop.start_epoch * STEPS_PER_EPOCH == epoch * STEPS_PER_EPOCH
    assert_identical(networks(trainer), reference_networks(loop))
    ours, theirs = moments_by_name(trainer.student, trainer.optimizer), moments_by_name(loop.student, loop.optimizer)
    assert_identical(ours, theirs)
    last_layer = {int(state["step"]) for name, state in ours.items() if "last_layer" in name}
    # epoch 0 froze the last layer: no moments after it, and 4 steps fewer than the rest after epoch 1
    assert last_layer == (set() if epoch == 1 else {4}) and int(ours["backbone.cls_token"]["step"]) == 4 * epoch
    dropped = [record.getMessage() for record in caplog.records if "loss-scaler" in record.getMessage()]
    assert dropped == ["dropped the reference's fp16 loss-scaler state (scale 65536): fastdino trains in fp32, which "
                       "needs no loss scaling"]
    continue_both(trainer, loop, epoch * STEPS_PER_EPOCH)


def _fsdp_trainer(ctx, work, data, source) -> Trainer:
    """Two ranks continuing the reference run `source` under FSDP (batch 2 each: the reference's total batch)."""
    return Trainer(fastdino_config(data, work / "fsdp", source, "data.batch_size_per_gpu=2",
                                   "distributed.strategy=fsdp"), ctx)


def _save_full_state(trainer, ctx, path) -> None:
    """The full (gathered) state the FSDP ranks hold, written by rank 0 with torch's own state-dict functions."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student, optimizer = get_state_dict(trainer.student, trainer.optimizer, options=options)
    teacher = get_model_state_dict(trainer.teacher, options=options)
    if ctx.is_main:
        torch.save({"step": trainer.step, "student": student, "teacher": teacher, "center": trainer.dino_loss.center,
                    "moments": optimizer["state"]}, path)


def _fsdp_scenario(ctx, work, data) -> None:
    """The ranks load the reference run; rank 0 writes the full state they hold, and all save their shards."""
    trainer = _fsdp_trainer(ctx, work, data, work / "checkpoint.pth")
    _save_full_state(trainer, ctx, work / "fsdp_state.pth")
    trainer.save()  # at the epoch end it resumed from: the reference's checkpoint, sharded


def fsdp_and_reference(reference, tmp_path, name, scenario) -> tuple[dict, ReferenceLoop]:
    """The full state two FSDP ranks reach in `scenario` from the reference's checkpoint `name`, and the reference's
    loop restarted from the same file."""
    root, images = reference
    shutil.copy(root / "ref" / name, tmp_path / name)
    run_on_two_ranks(scenario, tmp_path, images)
    loop = ReferenceLoop(reference_args(**RECIPE), STEPS_PER_EPOCH)
    loop.restart_from(tmp_path / name)
    return torch.load(tmp_path / "fsdp_state.pth", weights_only=True), loop


def test_fsdp_ranks_load_a_reference_run_by_name_and_export_it_back_from_their_shards(reference, tmp_path):
    loaded, loop = fsdp_and_reference(reference, tmp_path, "checkpoint.pth", _fsdp_scenario)
    assert loaded["step"] == 2 * STEPS_PER_EPOCH
    assert_identical({key: loaded[key] for key in ("student", "teacher", "center")}, reference_networks(loop))
    assert_identical(loaded["moments"], moments_by_name(loop.student, loop.optimizer))

    exported = tmp_path / "back" / "checkpoint.pth"
    export_main([str(tmp_path / "fsdp" / "checkpoint_dcp"), "--format", "reference-run", "--out", str(exported)])
    ours, theirs = read_reference_checkpoint(exported), read_reference_checkpoint(tmp_path / "checkpoint.pth")
    assert_identical({key: ours[key] for key in ("student", "teacher", "dino_loss", "epoch")},
                     {key: theirs[key] for key in ("student", "teacher", "dino_loss", "epoch")})
    assert_identical(ours["optimizer"]["state"], theirs["optimizer"]["state"])  # main_dino.py's own numbering
    for group, reference_group in zip(ours["optimizer"]["param_groups"], theirs["optimizer"]["param_groups"],
                                      strict=True):
        assert group["params"] == reference_group["params"]
        assert (group["lr"], group["weight_decay"]) == (reference_group["lr"], reference_group["weight_decay"])
    assert (ours["args"].batch_size_per_gpu, ours["args"].world_size) == (2, 2)  # the two ranks' run


def _fsdp_continue_scenario(ctx, work, data) -> None:
    """Two FSDP ranks continue the reference run saved after epoch 0 (the last layer frozen: no moments for it) through
    epoch 1, each on its half of every batch; rank 0 writes the full state they reach."""
    trainer = _fsdp_trainer(ctx, work, data, work / "checkpoint0000.pth")
    for it in range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):
        trainer.train_step([crop[2 * ctx.rank:2 * ctx.rank + 2] for crop in crops(it)])
    _save_full_state(trainer, ctx, work / "fsdp_state.pth")


def test_fsdp_ranks_continue_a_reference_run_through_the_last_layers_unfreezing(reference, tmp_path):
    ours, loop = fsdp_and_reference(reference, tmp_path, "checkpoint0000.pth", _fsdp_continue_scenario)
    for it in range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):
        loop.train_step(crops(it), it)
    theirs = moments_by_name(loop.student, loop.optimizer)
    # AdamW's step count sets its bias correction: the last layer took the 4 steps of epoch 1, the rest 8
    assert {name: int(entry["step"]) for name, entry in ours["moments"].items()} == \
        {name: int(entry["step"]) for name, entry in theirs.items()}
    total_lr = float(sum(loop.lr_schedule[STEPS_PER_EPOCH:2 * STEPS_PER_EPOCH]))
    for key, reference_state in reference_networks(loop).items():
        if key == "center":
            torch.testing.assert_close(ours[key], reference_state, rtol=1e-5, atol=1e-7)
        else:
            assert_agree(ours[key], reference_state, total_lr)


def rewrite_as_old_torch_and_numpy(source, target) -> None:
    """`source` as torch < 1.12 and numpy 1.x wrote it: Adam's step a Python int, numpy scalars pickled under
    `numpy.core.multiarray` (torch.save pickles with protocol 2: text GLOBAL opcodes, rewritten in its data.pkl)."""
    content = torch.load(source, weights_only=False)  # the test's own file
    for state in content["optimizer"]["state"].values():
        state["step"] = int(state["step"])
    buffer = io.BytesIO()
    torch.save(content, buffer)
    with zipfile.ZipFile(buffer) as new, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as old:
        for item in new.infolist():
            data = new.read(item)
            if item.filename.endswith("/data.pkl"):
                assert b"cnumpy._core.multiarray\nscalar\n" in data
                data = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
            old.writestr(item, data)


def test_a_checkpoint_of_older_torch_and_numpy_loads_the_same(reference, tmp_path):
    root, images = reference
    old = tmp_path / "old_reference" / "checkpoint.pth"
    old.parent.mkdir()
    rewrite_as_old_torch_and_numpy(root / "ref" / "checkpoint.pth", old)
    with pytest.raises(pickle.UnpicklingError, match=r"numpy\.core\.multiarray\.scalar"):  # the old spelling is in it
        torch.load(old, weights_only=True)
    assert isinstance(torch.load(old, weights_only=False)["optimizer"]["state"][0]["step"], int)
    loaded = [Trainer(fastdino_config(images, tmp_path / name, source))
              for name, source in (("new", root / "ref" / "checkpoint.pth"), ("old", old))]
    assert_identical(state_of(loaded[0]), state_of(loaded[1]))


def as_recipe_file(config, path):
    """`config` as a YAML file for `train.py --config`."""
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config_to_dict(config)))))
    return path


def test_a_recipe_difference_is_one_line_and_trust_adopts_the_reference(reference, tmp_path, capsys):
    root, images = reference
    source = root / "ref" / "checkpoint.pth"
    changed = ["optim.lr=0.01", "dino.teacher_temp=0.04"]
    recipe = as_recipe_file(fastdino_config(images, tmp_path / "run", source, *changed), tmp_path / "recipe.yaml")
    with pytest.raises(SystemExit) as exit_code:
        train_main(["--config", str(recipe)])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {source} was trained with --teacher_temp 0.07, --lr 0.064, which this config changes "
        "(dino.teacher_temp=0.04, optim.lr=0.01): continuing would change the recipe; set dino.teacher_temp=0.07 "
        "optim.lr=0.064, or add resume_from.trust_reference_args=true to adopt the reference's values\n")
    trusted = open_reference_run(fastdino_config(images, tmp_path / "run", source, *changed,
                                                 "resume_from.trust_reference_args=true"))
    assert (trusted.config.optim.lr, trusted.config.dino.teacher_temp) == (LR, 0.07)


def test_a_finished_reference_run_trains_further_with_more_epochs(reference, tmp_path):
    root, images = reference
    content = torch.load(root / "ref" / "checkpoint.pth", weights_only=False)  # the test's own file
    content["epoch"] = content["args"].epochs  # as main_dino.py leaves it after its last epoch
    torch.save(content, tmp_path / "finished.pth")
    with pytest.raises(ReferenceRunError, match=r"has trained all 4 epochs of optim.epochs=4; to train it further, "
                                                r"pass optim.epochs=N with N > 4$"):
        open_reference_run(fastdino_config(images, tmp_path / "run", tmp_path / "finished.pth"))
    further = open_reference_run(fastdino_config(images, tmp_path / "run", tmp_path / "finished.pth",
                                                 "optim.epochs=6"))
    assert further.config.optim.epochs == 6


def test_a_fastdino_checkpoint_in_output_dir_wins_also_with_adopted_args(reference, tmp_path):
    root, images = reference
    config = fastdino_config(images, tmp_path / "run", root / "ref" / "checkpoint.pth", "optim.lr=0.01",
                             "resume_from.trust_reference_args=true", "checkpoint_every=1")
    first = Trainer(config)
    first.train(stop_after_steps=2 * STEPS_PER_EPOCH + 1)  # the real loop, one step past the reference's epoch 1
    rerun = Trainer(config)  # the same command again: fastdino's own checkpoint, the config adopted as before
    assert rerun.step == 2 * STEPS_PER_EPOCH + 1 and rerun.config.optim.lr == LR
    assert_identical(state_of(rerun), state_of(first))


def test_a_reference_checkpoint_is_read_as_data_only(reference, tmp_path):
    root, images = reference
    content = torch.load(root / "ref" / "checkpoint.pth", weights_only=False)  # the test's own file
    marker = tmp_path / "executed"
    content["args"].note = Payload(marker)  # hidden among the args, which a Namespace may hold
    torch.save(content, tmp_path / "planted.pth")
    with pytest.raises(UntrustedCheckpointError, match=r"holds a pickled object of type builtins.exec"):
        Trainer(fastdino_config(images, tmp_path / "run", tmp_path / "planted.pth"))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- fastdino -> reference
def test_the_reference_continues_an_exported_fastdino_run_as_fastdino_does(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images")
    trainer = Trainer(tiny_config(images, tmp_path / "run", *SAME_RECIPE))
    for it in range(2 * STEPS_PER_EPOCH):  # across the lr warmup and the last layer's unfreezing
        trainer.train_step(crops(it))
    trainer.save()
    out = tmp_path / "ref" / "checkpoint.pth"
    line = export_main([str(tmp_path / "run" / "checkpoint.pth"), "--format", "reference-run", "--out", str(out)])
    assert line.startswith(f"wrote {out}: the fastdino run {tmp_path / 'run' / 'checkpoint.pth'} as a main_dino.py "
                           "checkpoint at epoch 2 (--arch vit_tiny --patch_size 8 --out_dim 64;")
    assert "model.pos_embed_size" not in line  # the run's 224 px grid is the reference's
    older = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)  # the test's own file
    del older["config"]["model"]["pos_embed_size"]  # a run from before the setting: its grid was the crop's, 16 px
    torch.save(older, tmp_path / "older.pth")
    older_line = export_main([str(tmp_path / "older.pth"), "--format", "reference-run", "--out",
                              str(tmp_path / "older_ref.pth")])
    assert "model.pos_embed_size=16 (main_dino.py: 224)" in older_line
    written = read_reference_checkpoint(out)  # as data, with the reference's own types allowed
    assert all(key.startswith("module.") for key in written["student"])
    assert not any(key.startswith("module.") for key in written["teacher"])
    assert sorted(vars(written["args"])) == sorted(vars(reference_args()))
    loop = ReferenceLoop(written["args"], STEPS_PER_EPOCH, seed=1)  # main_dino.py with the run's flags
    loop.restart_from(out)
    assert loop.start_epoch == 2 and loop.fp16_scaler is None
    assert_identical(reference_networks(loop), networks(trainer))
    assert_identical(moments_by_name(loop.student, loop.optimizer),
                     moments_by_name(trainer.student, trainer.optimizer))
    continue_both(trainer, loop, 2 * STEPS_PER_EPOCH)

    trainer.train_step(crops(12))
    trainer.save()  # one step into epoch 3: main_dino.py could not resume it
    with pytest.raises(SystemExit) as exit_code:
        export_main([str(tmp_path / "run" / "checkpoint.pth"), "--format", "reference-run", "--out", str(out)])
    assert exit_code.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "saved at step 13, inside epoch 3 (1 of its 4 steps done): main_dino.py " in error

    with pytest.raises(SystemExit) as exit_code:  # main_dino.py reads a torch.save file: refused before writing
        export_main([str(tmp_path / "run" / "checkpoint.pth"), "--format", "reference-run", "--out",
                     str(tmp_path / "ref" / "run.safetensors")])
    assert exit_code.value.code == 2 and "not safetensors; name it .pth" in capsys.readouterr().err
    assert not (tmp_path / "ref" / "run.safetensors").exists()
