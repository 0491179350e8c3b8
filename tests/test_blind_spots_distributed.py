"""Two CPU processes (gloo) where tests/test_distributed.py does not look:

- the teacher's momentum update on FSDP2 local shards (`build_teacher_ema`, the unflattened path), parameter by
  parameter against teacher = m * teacher + (1 - m) * student computed on unsharded copies: every parameter gets
  its own random values (student and teacher different, no two parameters alike), so swapping student and teacher,
  using m for (1 - m), or pairing the shards of two parameters of the same shape all show;
- kNN feature extraction over 2 ranks of datasets whose size does not divide by 2 (and one smaller than the world):
  the same features and labels, in the same order, as one process, none lost or repeated;
- training's periodic kNN under FSDP (rank 0 evaluates alone): it must not split the extraction across ranks that
  are not there (it used to: rank 0's feature all-gather met rank 1's next collective and gloo aborted).

Both scenarios run in one spawn (starting Python with torch costs seconds); each rank writes what it got and the
tests compare it here with single-process references.
"""
import copy

import helpers
import pytest
import torch
from torch.utils.data import Dataset

from fastdino.models import DINOHead, MultiCropWrapper, vit_tiny

WORLD = 2
MOMENTA = (0.8, 0.95)  # two updates, neither 0.5 (where m and 1 - m coincide)
KNN_SIZES = (7, 5, 1)  # 7 and 5 do not divide by 2; 1 image on 2 ranks


# ------------------------------------------------------------------ shared builders (main process and ranks)
def random_network(seed):
    """A 2-block ViT-Tiny/8 with head whose every parameter holds its own random values (seeded)."""
    torch.manual_seed(0)
    network = MultiCropWrapper(vit_tiny(patch_size=8, depth=2, img_size=16),
                               DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return network


def student_and_teacher():
    student = random_network(1)
    teacher = copy.deepcopy(student)
    teacher.load_state_dict(random_network(2).state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


def student_after_update(step):
    """What the optimizer would have done between two teacher updates: a new, known student."""
    return random_network(10 + step).state_dict()


def probe_images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))


class NumberedImages(Dataset):
    """`count` random 16 px images; the label of image i is i (so order, losses and repeats show in the labels)."""

    def __init__(self, count):
        self.images = torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(count))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


def knn_backbone():
    torch.manual_seed(3)
    return vit_tiny(patch_size=8, depth=1, img_size=16)


# ------------------------------------------------------------------ what each rank does
def scenario_fsdp_ema(ctx, work, fused):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import distribute_tensor

    from fastdino.distributed import apply_fsdp, build_teacher_ema, full_state_dict, reshard

    student, teacher = student_and_teacher()
    policy = MixedPrecisionPolicy()
    student, teacher = apply_fsdp(student, ctx.mesh(), policy), apply_fsdp(teacher, ctx.mesh(), policy)
    ema = build_teacher_ema(student, teacher, fused=fused)
    assert not ema.flattened, "FSDP2 local shards must be updated in place, not re-pointed into flat buffers"
    results = {}
    for step, momentum in enumerate(MOMENTA):
        if step:  # a new student between updates, written into the shards as the optimizer would
            full = student_after_update(step)
            with torch.no_grad():
                for name, param in student.named_parameters():
                    shard = distribute_tensor(full[name], param.device_mesh, param.placements).to_local()
                    param.to_local().copy_(shard)
        ema.update(momentum)
        with torch.no_grad():  # what FSDP all-gathers from the updated shards
            logits = teacher([probe_images()])
        reshard(teacher)
        results[step] = {"teacher": full_state_dict(teacher), "student": full_state_dict(student),
                         "logits": logits}
    if ctx.is_main:
        torch.save(results, work / f"ema_fused{int(fused)}.pt")


def scenario_knn(ctx, work):
    from fastdino.eval.knn import extract_dataset_features

    results = {}
    for count in KNN_SIZES:
        for batch_size in (2, 3):
            features, labels = extract_dataset_features(knn_backbone(), NumberedImages(count), "cpu",
                                                         batch_size=batch_size, num_workers=0)
            results[(count, batch_size)] = (features, labels)
    torch.save(results, work / f"knn_rank{ctx.rank}.pt")


def scenario_periodic_knn(ctx, work, data):
    """Training's periodic kNN under FSDP: one epoch (2 steps), whose end runs the kNN (rank 0 gets the figure),
    then the checkpoint (collective). The evaluated teacher is saved for the single-process reference."""
    import json

    from fastdino.trainer import Trainer

    config = helpers.tiny_config(data, work / "run_knn", "distributed.strategy=fsdp", "optim.epochs=1",
                                 "monitor_every=0", "eval.knn_every_epochs=1", f"eval.knn_train_path={data}",
                                 f"eval.knn_val_path={data}", "eval.image_size=16", "eval.knn_k=3")
    trainer = Trainer(config, ctx)
    trainer.train()
    assert trainer.step == 2
    backbone = trainer.teacher_backbone()  # collective
    if ctx.is_main:
        rows = [json.loads(line) for line in (work / "run_knn" / "log.jsonl").read_text().splitlines()]
        torch.save({"rows": rows, "backbone": backbone.state_dict()}, work / "periodic_knn.pt")


def _scenarios(ctx, work, data):
    for fused in (True, False):
        scenario_fsdp_ema(ctx, work, fused)
    scenario_knn(ctx, work)
    scenario_periodic_knn(ctx, work, data)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    work = tmp_path_factory.mktemp("blind_spots_distributed")
    data = helpers.write_image_folder(work / "images", count=16)
    helpers.run_on_two_ranks(_scenarios, work, data)
    return work


# ------------------------------------------------------------------ checks against unsharded references
@pytest.mark.parametrize("fused", [True, False], ids=["foreach", "loop"])
def test_fsdp_teacher_update_is_the_momentum_formula_per_parameter(two_ranks, fused):
    got = torch.load(two_ranks / f"ema_fused{int(fused)}.pt")
    student, teacher = student_and_teacher()
    expected = {name: p.detach().double() for name, p in teacher.named_parameters()}
    students = {name: p.detach().double() for name, p in student.named_parameters()}
    for step, momentum in enumerate(MOMENTA):
        if step:
            students = {name: value.double() for name, value in student_after_update(step).items()
                        if name in students}
        expected = {name: momentum * expected[name] + (1 - momentum) * students[name] for name in expected}
        gathered = got[step]["teacher"]
        assert gathered.keys() >= expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(gathered[name].double(), value, rtol=1e-6, atol=1e-6,
                                       msg=lambda m, name=name: f"update {step}, teacher {name}: {m}")
        for name, value in students.items():  # the update reads the student and leaves it alone
            assert torch.equal(got[step]["student"][name].double(), value), f"update {step}: student {name} changed"
        # the forward all-gathers exactly the updated shards
        plain = copy.deepcopy(teacher)
        plain.load_state_dict({**plain.state_dict(), **{n: v.float() for n, v in expected.items()}})
        with torch.no_grad():
            torch.testing.assert_close(got[step]["logits"], plain([probe_images()]), rtol=1e-5, atol=1e-5)
    # meaningful: same-shape parameters hold different values, student and teacher differ everywhere
    shapes = {}
    for name, value in expected.items():
        shapes.setdefault(tuple(value.shape), []).append(name)
    assert max(len(names) for names in shapes.values()) > 2
    assert all(not torch.equal(students[n], expected[n]) for n in expected)


@pytest.mark.parametrize("count", KNN_SIZES)
@pytest.mark.parametrize("batch_size", [2, 3])
def test_knn_features_over_two_ranks_equal_one_process(two_ranks, count, batch_size):
    from fastdino.eval.knn import extract_dataset_features

    dataset = NumberedImages(count)
    expected_features, expected_labels = extract_dataset_features(knn_backbone(), dataset, "cpu",
                                                                  batch_size=batch_size, num_workers=0)
    assert torch.equal(expected_labels, torch.arange(count))
    for rank in range(WORLD):
        features, labels = torch.load(two_ranks / f"knn_rank{rank}.pt")[(count, batch_size)]
        assert torch.equal(labels, torch.arange(count)), f"rank {rank}: labels {labels.tolist()}"
        assert features.shape == expected_features.shape
        # another batch composition may change the last bits of the matmuls, no more
        torch.testing.assert_close(features, expected_features, rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
    if count > 1:  # meaningful: every image has its own feature, so a shifted or repeated row would show
        similarity = expected_features @ expected_features.T
        assert (similarity - torch.eye(count)).abs().max() < 0.9999


def test_periodic_knn_under_fsdp_equals_one_process_on_the_same_teacher(two_ranks):
    """The kNN at the end of an epoch of a 2-rank run: every rank gets through it (no rank left alone in a
    collective), and rank 0's figure is the single-process kNN of the same teacher on the whole folders."""
    from fastdino.eval.knn import knn_accuracy

    got = torch.load(two_ranks / "periodic_knn.pt")
    figures = [row["knn_top1"] for row in got["rows"] if "knn_top1" in row]
    assert len(figures) == 1
    backbone = vit_tiny(patch_size=8, depth=1)  # the trainer's 224 px position grid
    backbone.load_state_dict(got["backbone"])
    data = two_ranks / "images"
    expected = knn_accuracy(backbone, data, data, image_size=16, device="cpu", k=3, num_workers=0)["top1"]
    assert figures[0] == expected
