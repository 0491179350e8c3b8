"""Linear probe: the feature rule per architecture against an independent transcription of the reference's rule,
the classifier's init, and its training on separable features."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.eval.linear import (FEATURE_RULES, evaluate_linear, linear_features, linear_probe, main,
                                  make_linear_classifier, train_linear_classifier)
from fastdino.hub import export_backbone
from fastdino.models import vit_base, vit_small, vit_tiny


def block_outputs(backbone, images):
    """Token outputs [B, N, D] of every block, captured with forward hooks during a plain forward()."""
    outputs = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in backbone.blocks]
    with torch.no_grad():
        cls_feature = backbone(images)
    for hook in hooks:
        hook.remove()
    return outputs, cls_feature


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_vit_small_rule_concatenates_the_cls_of_the_last_four_blocks(images):
    torch.manual_seed(0)
    backbone = vit_small(patch_size=16, depth=5, img_size=32).eval()
    n_last_blocks, avgpool = FEATURE_RULES["vit_small"]
    assert (n_last_blocks, avgpool) == (4, False)
    with torch.no_grad():
        got = linear_features(backbone, images, n_last_blocks, avgpool)
    outputs, cls_feature = block_outputs(backbone, images)
    expected = torch.cat([backbone.norm(out)[:, 0] for out in outputs[-4:]], dim=1)
    assert got.shape == (2, 4 * 384)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[:, -384:], cls_feature)  # the last block's part is forward()'s feature


def test_vit_base_rule_interleaves_cls_and_mean_patch_token_like_the_reference(images):
    torch.manual_seed(1)
    backbone = vit_base(patch_size=16, depth=2, img_size=32).eval()
    n_last_blocks, avgpool = FEATURE_RULES["vit_base"]
    assert (n_last_blocks, avgpool) == (1, True)
    with torch.no_grad():
        got = linear_features(backbone, images, n_last_blocks, avgpool)
    outputs, cls_feature = block_outputs(backbone, images)
    with torch.no_grad():
        mean_patch = backbone.norm(outputs[-1][:, 1:]).mean(dim=1)
    # the reference: cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1), i.e. per channel c:
    # position 2c holds cls[c] and position 2c+1 holds mean[c]
    expected = torch.empty(2, 2 * 768)
    for channel in range(768):
        expected[:, 2 * channel] = cls_feature[:, channel]
        expected[:, 2 * channel + 1] = mean_patch[:, channel]
    torch.testing.assert_close(got, expected)


def test_avgpool_with_several_blocks_is_refused(images):
    backbone = vit_small(patch_size=16, depth=2, img_size=32)
    with pytest.raises(ValueError, match="n_last_blocks=1"):
        linear_features(backbone, images, n_last_blocks=2, avgpool=True)


def test_classifier_init_is_the_references():
    torch.manual_seed(2)
    classifier = make_linear_classifier(1536, 1000)
    assert torch.count_nonzero(classifier.bias) == 0
    assert classifier.weight.mean().abs() < 1e-3 and classifier.weight.std().item() == pytest.approx(0.01, rel=0.02)


def separable_problem(seed, num_classes=10, dim=64, per_class=40):
    """Gaussian clusters in feature space: a linear classifier can separate them, chance is 1/num_classes."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels


def batches(features, labels, batch_size, seed=None):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)) if seed is not None else \
        torch.arange(len(labels))
    return [(features[order[i:i + batch_size]], labels[order[i:i + batch_size]])
            for i in range(0, len(labels), batch_size)]


def test_linear_classifier_learns_separable_features():
    train_x, train_y = separable_problem(seed=3)
    val_x, val_y = separable_problem(seed=3, per_class=10)  # same centres, fresh noise
    classifier = make_linear_classifier(64, 10)
    before = evaluate_linear(classifier, batches(val_x, val_y, 64), "cpu")["top1"]
    epochs = iter(range(100))
    result = train_linear_classifier(classifier, lambda: batches(train_x, train_y, 32, seed=next(epochs)),
                                     lambda: batches(val_x, val_y, 64), epochs=15, lr=0.1, device="cpu",
                                     log=lambda _: None)
    # Untrained, each well-separated cluster lands on one class, right with chance 1/10: `before` is about
    # 10% x Binomial(10, 0.1), up to 40% among seeds 0..19 (the old bound, 50, failed ~1 seed in 600); what matters
    # is that it did not start solved: < 90 fails for ~1 seed in 10^8.
    assert before < 90 and result["best_top1"] >= 97.0
    assert len(result["history"]) == 15 and result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    # best_top1 is the best of the evaluations, as the reference reports
    assert result["best_top1"] == max(row["val_top1"] for row in result["history"])


def test_learning_rate_follows_a_cosine_to_zero():
    features, labels = separable_problem(seed=4, per_class=4)
    result = train_linear_classifier(make_linear_classifier(64, 10), lambda: batches(features, labels, 40),
                                     lambda: batches(features, labels, 40), epochs=4, lr=0.2, device="cpu",
                                     log=lambda _: None)
    expected = [0.2 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(4)]
    assert [row["lr"] for row in result["history"]] == pytest.approx(expected)


def test_evaluate_reports_top5_only_from_five_classes():
    features = torch.eye(4)
    labels = torch.arange(4)
    classifier = torch.nn.Linear(4, 4)
    with torch.no_grad():
        classifier.weight.copy_(torch.eye(4))
        classifier.bias.zero_()
    assert evaluate_linear(classifier, [(features, labels)], "cpu") == {"top1": 100.0, "top5": None}
    with torch.no_grad():
        classifier.weight.copy_(torch.eye(4).roll(1, dims=0))
    assert evaluate_linear(classifier, [(features, labels)], "cpu")["top1"] == 0.0
    wide = make_linear_classifier(4, 6)
    assert evaluate_linear(wide, [(features, labels)], "cpu")["top5"] is not None


def test_linear_probe_end_to_end_on_image_folders(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for name, color in (("dark", 30), ("light", 220)):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(color + rng.normal(0, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    torch.manual_seed(5)
    backbone = vit_small(patch_size=8, depth=4, img_size=16)
    result = linear_probe(backbone, tmp_path / "train", tmp_path / "val", image_size=16, device="cpu", epochs=3,
                          batch_size=4, base_lr=0.5, num_workers=0, log=lambda _: None)
    assert len(result["history"]) == 3 and result["best_top1"] == 100.0  # dark vs light: separable by any features
    assert all(not p.requires_grad for p in backbone.parameters()), "the backbone stays frozen"
    # the command line: defaults for vit_tiny (4 blocks, no avgpool), a checkpoint in the official format
    export_backbone(vit_tiny(patch_size=8), tmp_path / "backbone.pth")
    result = main(["--checkpoint", str(tmp_path / "backbone.pth"), "--arch", "vit_tiny", "--patch-size", "8",
                   "--train-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"), "--image-size", "16",
                   "--epochs", "1", "--batch-size", "6", "--num-workers", "0", "--device", "cpu"])
    assert len(result["history"]) == 1
