"""Weighted kNN: against a per-sample transcription of the reference formula, on constructed cases with known answers,
and end to end on tiny image folders."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdino.data import ImageFolderDataset
from fastdino.eval.knn import (eval_transform, extract_dataset_features, extract_features, knn_accuracy, knn_classify,
                               main)
from fastdino.hub import export_backbone, load_pretrained
from fastdino.models import vit_tiny


def brute_force_knn(train_features, train_labels, test_features, test_labels, k, temperature, num_classes):
    """One test sample at a time, in float64 Python: k most similar train rows (ties: lower index), vote
    exp(sim / T) per class, rank classes by vote (ties: lower class index)."""
    train = train_features.double().numpy()
    hits1 = hits5 = 0
    for query, target in zip(test_features.double().numpy(), test_labels.tolist()):
        similarities = train @ query
        neighbours = sorted(range(len(train)), key=lambda i: (-similarities[i], i))[:k]
        votes = [0.0] * num_classes
        for i in neighbours:
            votes[int(train_labels[i])] += math.exp(similarities[i] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        hits1 += ranking[0] == target
        hits5 += target in ranking[:5]
    count = len(test_labels)
    return 100.0 * hits1 / count, (100.0 * hits5 / count if num_classes >= 5 else None)


def random_problem(seed, num_train, num_test, dim, num_classes, noise=1.0):
    """Features around random class centres, L2-normalized, so that some but not all test rows are right."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)
    train_labels = torch.randint(num_classes, (num_train,), generator=generator)
    test_labels = torch.randint(num_classes, (num_test,), generator=generator)
    train = F.normalize(centres[train_labels] + noise * torch.randn(num_train, dim, generator=generator), dim=1)
    test = F.normalize(centres[test_labels] + noise * torch.randn(num_test, dim, generator=generator), dim=1)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("k,num_classes,seed", [(1, 3, 0), (5, 7, 1), (20, 10, 2), (37, 4, 3)])
def test_matches_brute_force_reference_formula(k, num_classes, seed):
    train, train_labels, test, test_labels = random_problem(seed, 150, 60, 16, num_classes, noise=1.5)
    result = knn_classify(train, train_labels, test, test_labels, k=k, temperature=0.07, num_classes=num_classes)
    top1, top5 = brute_force_knn(train, train_labels, test, test_labels, k, 0.07, num_classes)
    assert 0 < top1 < 100, "the problem should be neither trivial nor hopeless, else the comparison says little"
    assert result["top1"] == pytest.approx(top1)
    if num_classes >= 5:
        assert result["top5"] == pytest.approx(top5)
    else:
        assert result["top5"] is None


def test_well_separated_clusters_are_classified_perfectly():
    train, train_labels, test, test_labels = random_problem(4, 200, 100, 32, 8, noise=0.05)
    result = knn_classify(train, train_labels, test, test_labels, k=20)
    assert result == {"top1": 100.0, "top5": 100.0}


def test_temperature_weighting_lets_close_neighbours_outvote_many_far_ones():
    # One train point of class 0 right at the query, three of class 1 further away: an unweighted majority would say
    # class 1, the exp(sim / 0.07) weights say class 0 (e^(1/0.07) > 3 e^(0.5/0.07)).
    query = torch.tensor([[1.0, 0.0]])
    far = torch.tensor([0.5, math.sqrt(0.75)])
    train = torch.stack([query[0], far, far, far])
    labels = torch.tensor([0, 1, 1, 1])
    assert knn_classify(train, labels, query, torch.tensor([0]), k=4)["top1"] == 100.0
    # with a hot temperature every vote counts almost alike, and the majority wins
    assert knn_classify(train, labels, query, torch.tensor([0]), k=4, temperature=100.0)["top1"] == 0.0


def test_equal_votes_go_to_the_lowest_class_index():
    # The query is exactly as similar to a class-3 point as to a class-1 point (products with zeros are exact).
    query = torch.tensor([[1.0, 0.0, 0.0]])
    train = torch.tensor([[0.6, 0.8, 0.0], [0.6, 0.0, 0.8]])
    for labels in (torch.tensor([3, 1]), torch.tensor([1, 3])):
        result_if_1 = knn_classify(train, labels, query, torch.tensor([1]), k=2, num_classes=5)
        result_if_3 = knn_classify(train, labels, query, torch.tensor([3]), k=2, num_classes=5)
        assert (result_if_1["top1"], result_if_3["top1"]) == (100.0, 0.0)
        assert (result_if_1["top5"], result_if_3["top5"]) == (100.0, 100.0)


def test_tied_similarities_at_the_kth_neighbour():
    # Every train row appears twice with its label, so the k-th neighbour is often tied with a duplicate.
    train, train_labels, test, test_labels = random_problem(5, 60, 40, 8, 6, noise=1.5)
    train, train_labels = torch.cat([train, train]), torch.cat([train_labels, train_labels])
    for k in (1, 3, 10):
        result = knn_classify(train, train_labels, test, test_labels, k=k)
        top1, top5 = brute_force_knn(train, train_labels, test, test_labels, k, 0.07, 6)
        assert (result["top1"], result["top5"]) == (pytest.approx(top1), pytest.approx(top5))


def test_k_larger_than_a_class():
    # Class 0 has 3 train rows, k = 10: the other 7 neighbours come from other classes, yet class 0 still wins
    # for queries on top of its rows because their weights dominate.
    generator = torch.Generator().manual_seed(6)
    centres = F.normalize(torch.randn(3, 16, generator=generator), dim=1)
    counts = torch.tensor([3, 30, 30])
    train_labels = torch.repeat_interleave(torch.arange(3), counts)
    train = F.normalize(centres[train_labels] + 0.05 * torch.randn(len(train_labels), 16, generator=generator), dim=1)
    test_labels = torch.tensor([0, 0, 1, 2])
    test = F.normalize(centres[test_labels] + 0.05 * torch.randn(4, 16, generator=generator), dim=1)
    result = knn_classify(train, train_labels, test, test_labels, k=10)
    assert result["top1"] == brute_force_knn(train, train_labels, test, test_labels, 10, 0.07, 3)[0] == 100.0
    # k may reach the whole train set
    assert knn_classify(train, train_labels, test, test_labels, k=len(train))["top1"] == pytest.approx(
        brute_force_knn(train, train_labels, test, test_labels, len(train), 0.07, 3)[0])


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunking_gives_the_unchunked_result(chunk_size):
    train, train_labels, test, test_labels = random_problem(7, 300, 64, 16, 12, noise=1.5)
    whole = knn_classify(train, train_labels, test, test_labels, k=20, chunk_size=len(test))
    assert knn_classify(train, train_labels, test, test_labels, k=20, chunk_size=chunk_size) == whole


def test_bad_inputs_are_explained():
    train, train_labels, test, test_labels = random_problem(8, 20, 5, 4, 3)
    with pytest.raises(ValueError, match="k must be between 1 and the number of train samples"):
        knn_classify(train, train_labels, test, test_labels, k=21)
    with pytest.raises(ValueError, match="label -1"):
        knn_classify(train, torch.full_like(train_labels, -1), test, test_labels, k=3)
    with pytest.raises(ValueError, match="one width"):
        knn_classify(train, train_labels, test[:, :3], test_labels, k=3)
    with pytest.raises(ValueError, match="labels must lie in"):
        knn_classify(train, train_labels, test, test_labels + 5, k=3, num_classes=3)


def _write_folder(root, class_colors, per_class, size, seed):
    rng = np.random.default_rng(seed)
    for name, color in class_colors.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(color) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_extract_features_are_normalized_cls_features_in_loader_order():
    torch.manual_seed(0)
    backbone = vit_tiny(patch_size=8, depth=2, img_size=16).train()
    images = torch.randn(10, 3, 16, 16)
    loader = [(images[:4], torch.arange(4)), (images[4:], torch.arange(4, 10))]
    features, labels = extract_features(backbone, loader, "cpu")
    assert backbone.training, "the backbone's mode must be restored"
    with torch.no_grad():
        expected = F.normalize(backbone.eval()(images), dim=1)
    torch.testing.assert_close(features, expected)
    assert features.dtype == torch.float32 and torch.equal(labels, torch.arange(10))


def test_knn_accuracy_end_to_end_on_image_folders(tmp_path):
    colors = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}
    _write_folder(tmp_path / "train", colors, per_class=4, size=20, seed=0)
    _write_folder(tmp_path / "val", colors, per_class=2, size=20, seed=1)
    torch.manual_seed(0)
    backbone = vit_tiny(patch_size=8, depth=2, img_size=16)
    result = knn_accuracy(backbone, tmp_path / "train", tmp_path / "val", image_size=16, device="cpu",
                          batch_size=5, k=3, num_workers=0)
    # plain colours are separable even by random features; 3 classes: no top-5
    assert result == {"top1": 100.0, "top5": None}
    val_set = ImageFolderDataset(tmp_path / "val", eval_transform(16))
    dataset_features, dataset_labels = extract_dataset_features(backbone, val_set, "cpu", batch_size=4, num_workers=0)
    assert dataset_features.shape == (6, 192) and dataset_labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_command_line_with_feature_cache(tmp_path, capsys):
    colors = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200), "d": (200, 200, 30), "e": (30, 200, 200)}
    _write_folder(tmp_path / "train", colors, per_class=3, size=16, seed=2)
    _write_folder(tmp_path / "val", colors, per_class=1, size=16, seed=3)
    torch.manual_seed(3)
    checkpoint = export_backbone(vit_tiny(patch_size=8), tmp_path / "backbone.pth")
    argv = ["--checkpoint", str(checkpoint), "--arch", "vit_tiny", "--patch-size", "8", "--train-dir",
            str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"), "--image-size", "16", "--k", "2", "20",
            "--num-workers", "0", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    first = main(argv)
    assert list(first) == [2], "k=20 exceeds the 15 train images and is skipped"
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2
    assert "skipped" in capsys.readouterr().out
    second = main(argv)
    assert "read from the cache" in capsys.readouterr().out and second == first
    backbone = load_pretrained(checkpoint, "vit_tiny", patch_size=8)
    assert first[2] == knn_accuracy(backbone, tmp_path / "train", tmp_path / "val", 16, "cpu", k=2, num_workers=0)


def test_eval_transform_keeps_the_reference_ratio():
    image = Image.new("RGB", (300, 400))
    assert eval_transform(224)(image).shape == (3, 224, 224)
    assert eval_transform(32)(image).shape == (3, 32, 32)
    with pytest.raises(ValueError):
        eval_transform(0)


def test_unusable_folders_and_sizes_are_one_line_and_exit_code_2(tmp_path, capsys):
    colors = {"a": (200, 30, 30), "b": (30, 200, 30)}
    _write_folder(tmp_path / "train", colors, per_class=2, size=16, seed=0)
    _write_folder(tmp_path / "val", {**colors, "c": (30, 30, 200)}, per_class=1, size=16, seed=1)
    checkpoint = export_backbone(vit_tiny(patch_size=8, depth=1), tmp_path / "backbone.pth")
    argv = ["--checkpoint", str(checkpoint), "--train-dir", str(tmp_path / "train"), "--val-dir",
            str(tmp_path / "val"), "--num-workers", "0", "--device", "cpu"]
    for extra, expected in ((["--image-size", "16"], "train and val class folders differ: 2 classes in "),
                            (["--image-size", "20"], "--image-size 20: must be a multiple of the backbone's patch "
                                                     "size (8), e.g. 16")):
        with pytest.raises(SystemExit) as stopped:
            main([*argv, *extra])
        error = capsys.readouterr().err
        assert stopped.value.code == 2 and error.count("\n") == 1 and expected in error, error
