"""Attention pictures: the 60%-mass mask rule (minimal and sufficient, checked numerically and against the
reference's ascending-cumsum formulation), the CLS attention maps, the PNG files; and the training-curve plot."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from fastdino.data import IMAGENET_MEAN, IMAGENET_STD
from fastdino.eval.attention import (attention_comparison, attention_maps, default_image_size, held_out_examples,
                                     main, save_attention_comparison, save_attention_maps, threshold_mask)
from fastdino.hub import export_backbone
from fastdino.eval.plots import plot_training_curves
from fastdino.models import vit_tiny


def reference_rule_mask(attn, keep):
    """The reference's formulation: sort ascending, normalized cumulative sum, keep tokens where it exceeds 1-keep."""
    values, order = torch.sort(attn, dim=1)
    cumulative = torch.cumsum(values / values.sum(dim=1, keepdim=True), dim=1)
    kept_sorted = cumulative > (1 - keep)
    return torch.zeros_like(kept_sorted).scatter_(1, order, kept_sorted)


def random_attention(seed, heads=6, tokens=196):
    generator = torch.Generator().manual_seed(seed)
    sharpness = torch.linspace(0.5, 4.0, heads)[:, None]  # from flat to peaked heads
    return torch.softmax(sharpness * torch.randn(heads, tokens, generator=generator, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("keep", [0.6, 0.3, 0.9, 1.0])
def test_mask_keeps_the_mass_with_the_fewest_tokens(keep):
    attn = random_attention(seed=int(keep * 10))
    mask = threshold_mask(attn, keep)
    assert mask.dtype == torch.bool and mask.shape == attn.shape
    for head in range(attn.shape[0]):
        values = attn[head].numpy()
        kept = values[mask[head].numpy()]
        total = values.sum()
        assert kept.sum() >= keep * total * (1 - 1e-12), "the kept tokens must hold at least `keep` of the mass"
        # minimal: the k largest tokens, with the fewest k reaching the mass
        fewest = int(np.searchsorted(np.cumsum(np.sort(values)[::-1]), keep * total * (1 - 1e-12))) + 1
        assert mask[head].sum() == min(fewest, values.size)
        assert kept.min() >= values[~mask[head].numpy()].max(initial=0.0), "kept tokens must be the most attended"
    if keep < 1.0:
        assert torch.equal(mask, reference_rule_mask(attn, keep))


def test_mask_handles_a_single_dominant_token_and_rejects_bad_input():
    attn = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert threshold_mask(attn, 0.6).tolist() == [[True, False, False, False], [True, True, True, False]]
    with pytest.raises(ValueError, match="keep"):
        threshold_mask(attn, 0.0)
    with pytest.raises(ValueError, match="heads, tokens"):
        threshold_mask(attn[0], 0.6)
    with pytest.raises(ValueError, match="positive sum"):
        threshold_mask(torch.zeros(2, 4), 0.6)


def test_attention_maps_are_the_cls_rows_of_the_last_block():
    torch.manual_seed(0)
    backbone = vit_tiny(patch_size=8, depth=2, img_size=32)
    image = torch.randn(3, 37, 45)  # not a multiple of the patch: cropped to 32 x 40
    maps = attention_maps(backbone, image)
    assert maps.shape == (3, 4, 5)
    with torch.no_grad():
        full = backbone.get_last_selfattention(image[None, :, :32, :40])[0]  # [heads, 21, 21]
    torch.testing.assert_close(maps.flatten(1), full[:, 0, 1:])
    torch.testing.assert_close(maps.sum(dim=(1, 2)), 1 - full[:, 0, 0])  # softmax row minus CLS-to-CLS


def test_save_attention_maps_writes_the_pictures(tmp_path):
    torch.manual_seed(1)
    backbone = vit_tiny(patch_size=8, depth=2, img_size=32)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg")
    written = save_attention_maps(backbone, tmp_path / "photo.jpg", tmp_path / "out", image_size=40, name="cat")
    heads = backbone.num_heads
    names = {path.name for path in written}
    assert names == {"cat.png", "cat-overview.png"} | {f"cat-attn-head{h}.png" for h in range(heads)} | \
        {f"cat-mask-head{h}.png" for h in range(heads)}
    for path in written:
        with Image.open(path) as picture:
            picture.verify()
    # shorter side 40, longer 70 * 40 / 50 = 56; both multiples of 8
    with Image.open(tmp_path / "out" / "cat.png") as picture:
        assert picture.size == (56, 40)
    with Image.open(tmp_path / "out" / "cat-attn-head0.png") as picture:
        assert picture.size == (56, 40)


def test_held_out_examples_take_every_class_in_turn(tmp_path):
    for label, count in (("a", 3), ("b", 1), ("c", 2)):
        (tmp_path / label).mkdir()
        for index in range(count):
            Image.new("RGB", (8, 8), (40 * index, 0, 0)).save(tmp_path / label / f"{index}.png")
    examples = held_out_examples(tmp_path, 5)
    assert [name for name, _ in examples] == ["a-0", "b-0", "c-0", "a-1", "c-1"]
    assert np.asarray(examples[3][1])[0, 0].tolist() == [40, 0, 0]  # the image named a-1 is a/1.png


def test_comparison_shows_each_network_on_the_same_pictures(tmp_path):
    torch.manual_seed(4)
    trained, twin = vit_tiny(patch_size=8, depth=2, img_size=32), vit_tiny(patch_size=8, depth=2, img_size=32)
    photos = [(f"p{seed}", Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 28, 3), np.uint8)))
              for seed in range(3)]
    pictures, maps = attention_comparison({"trained": trained, "random init": twin}, photos, image_size=16)
    assert maps.shape == (3, 2, trained.num_heads, 2, 2)
    for row, (_, photo) in enumerate(photos):  # resized as save_attention_maps does: shorter side 16, 16 x 16 kept
        expected_picture = photo.resize((22, 16), Image.BICUBIC).crop((0, 0, 16, 16))
        assert pictures[row].shape == (16, 16, 3)
        tensor = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(
            Image.fromarray(pictures[row])))
        for index, network in enumerate((trained, twin)):
            np.testing.assert_allclose(maps[row, index], attention_maps(network, tensor).numpy(), atol=1e-6)
        assert np.abs(pictures[row].astype(int) - np.asarray(expected_picture, dtype=int)).max() <= 1
    assert not np.allclose(maps[:, 0], maps[:, 1]), "two different networks must give two different maps"
    path = save_attention_comparison({"trained": trained, "random init": twin}, photos, tmp_path / "cmp.png", 16)
    with Image.open(path) as figure:
        width, height = figure.size
    assert width > height, "one row per picture, 1 + 2 x heads columns"


def test_command_line_draws_every_image_of_a_folder(tmp_path, capsys):
    for folder, name in (("x", "one"), ("y", "one")):  # a repeated file name must not overwrite
        (tmp_path / "images" / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 20), (10, 80, 160)).save(tmp_path / "images" / folder / f"{name}.png")
    torch.manual_seed(3)
    checkpoint = export_backbone(vit_tiny(patch_size=8), tmp_path / "backbone.pth")
    written = main(["--checkpoint", str(checkpoint), "--arch", "vit_tiny", "--patch-size", "8", "--image",
                    str(tmp_path / "images"), "--out-dir", str(tmp_path / "out"), "--image-size", "16",
                    "--device", "cpu"])
    overviews = sorted(path.name for path in written if path.name.endswith("overview.png"))
    assert overviews == ["one-2-overview.png", "one-overview.png"]
    assert all(path.is_file() for path in written)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # a missing --image is a usage error: one line, exit code 2
        main(["--checkpoint", str(checkpoint), "--arch", "vit_tiny", "--patch-size", "8", "--image",
              str(tmp_path / "nowhere"), "--device", "cpu"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: --image={tmp_path / 'nowhere'}: must be an existing file or folder\n"


def test_a_corrupt_image_is_one_warning_and_the_good_ones_are_still_drawn(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (24, 20), (10, 80, 160)).save(images / "a.png")
    (images / "b.jpg").write_bytes(b"not a jpeg")  # between the two good ones: the one after it is still drawn
    Image.new("RGB", (20, 24), (160, 80, 10)).save(images / "c.png")
    torch.manual_seed(5)
    checkpoint = export_backbone(vit_tiny(patch_size=8, depth=1, img_size=16), tmp_path / "backbone.pth")
    arguments = ["--checkpoint", str(checkpoint), "--image-size", "16", "--device", "cpu"]
    written = main([*arguments, "--image", str(images), "--out-dir", str(tmp_path / "out")])
    assert sorted(path.name for path in written if path.name.endswith("overview.png")) == ["a-overview.png",
                                                                                         "c-overview.png"]
    err = capsys.readouterr().err
    assert err.startswith(f"warning: skipped {images / 'b.jpg'}: cannot be decoded (") and err.count("\n") == 1, err
    # no image usable at all (a folder, a file): one line, exit code 2, nothing written
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (images / "c.png").unlink()
    for image, expected in ((images, f"error: --image {images}: no image to draw: {images / 'a.png'} cannot be "
                                     "decoded (UnidentifiedImageError: "),
                            (images / "b.jpg", f"error: --image {images / 'b.jpg'}: no image to draw: ")):
        with pytest.raises(SystemExit) as stop:
            main([*arguments, "--image", str(image), "--out-dir", str(tmp_path / "none")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("patch, side", [(4, 240), (16, 480)])
def test_the_default_image_size_keeps_the_references_patches_per_side(patch, side, tmp_path):
    """The reference's 480 px pictures are 60 patches per side at patch 8; at patch 4 they would be 120 and cost 16
    times the attention's memory (14.6 GB for one photo of the demo's model), so patch 4 gets 240 px."""
    assert default_image_size(8) == 480
    Image.new("RGB", (20, 20), (10, 80, 160)).save(tmp_path / "photo.png")
    checkpoint = export_backbone(vit_tiny(patch_size=patch, depth=1, img_size=2 * patch), tmp_path / "backbone.pth")
    main(["--checkpoint", str(checkpoint), "--image", str(tmp_path / "photo.png"), "--out-dir", str(tmp_path / "out"),
          "--device", "cpu"])
    with Image.open(tmp_path / "out" / "photo.png") as picture:
        assert picture.size == (side, side)


def test_an_image_size_below_one_patch_is_one_line(tmp_path, capsys):
    checkpoint = export_backbone(vit_tiny(patch_size=8, depth=1, img_size=16), tmp_path / "backbone.pth")
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(checkpoint), "--image-size", "7", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: --image-size 7: must be at least the backbone's patch size (8)\n"


def test_mask_overlay_tints_exactly_the_kept_patches(tmp_path):
    torch.manual_seed(2)
    backbone = vit_tiny(patch_size=8, depth=2, img_size=32)
    gray = Image.new("RGB", (32, 32), (128, 128, 128))
    save_attention_maps(backbone, gray, tmp_path, image_size=32, name="gray", keep=0.6)
    tensor = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(gray))
    mask = threshold_mask(attention_maps(backbone, tensor).flatten(1), 0.6)[0].reshape(4, 4)
    overlay = np.asarray(Image.open(tmp_path / "gray-mask-head0.png").convert("RGB")).astype(int)
    changed = (np.abs(overlay - 128).sum(axis=2) > 0).reshape(4, 8, 4, 8).any(axis=(1, 3))
    assert np.array_equal(changed, mask.numpy())


def test_training_curves_plot(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": s, "loss": 10 - s * 0.1, "lr": 1e-4 * s, "teacher_entropy": 5.0} for s in range(0, 50, 5)]
    rows.insert(3, {"step": 12, "knn_top1": 31.5})  # eval rows carry only their own metric
    log.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    out = plot_training_curves(log, tmp_path / "plots" / "curves.png")
    with Image.open(out) as picture:
        width, height = picture.size
    assert width > 0 and height > 3 * 200, "four panels: loss, kNN, lr, teacher entropy"
    only_loss = tmp_path / "loss.jsonl"
    only_loss.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with Image.open(plot_training_curves(only_loss, tmp_path / "loss.png")) as picture:
        assert picture.size[1] < height
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        plot_training_curves(bad, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="'loss'"):
        no_loss = tmp_path / "no_loss.jsonl"
        no_loss.write_text(json.dumps({"step": 1, "knn_top1": 3.0}) + "\n")
        plot_training_curves(no_loss, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
