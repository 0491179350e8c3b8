"""What a run shows at its end: kNN accuracy of the teacher against the same network at its initial
weights (with a warning when training made it worse), attention pictures of the teacher, and the training curves."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from fastdino.builders import build_backbone
from fastdino.checkpoint import write_text_atomic
from fastdino.config import Config, knn_requested_by
from fastdino.eval.attention import held_out_examples, save_attention_comparison, save_attention_maps
from fastdino.eval.knn import knn_accuracy
from fastdino.eval.plots import read_jsonl, save_training_curves
from fastdino.guard import HINTS, NAMES, replay
from fastdino.metrics import add_to_row
from fastdino.run_folder import CURVES, METRICS_LOG, PICTURES, RESULTS, TENSORBOARD

log = logging.getLogger("fastdino")

HELD_OUT_PICTURE = "held-out-trained-vs-random-init.png"


def knn_top1(backbone: nn.Module, config: Config, device: torch.device) -> float:
    """Weighted kNN top-1 (%) of `backbone` features, memory bank = eval.knn_train_path, queries = knn_val_path.

    Runs in this process alone (rank 0 of a run calls it; the other ranks do not take part, so it must not split
    the extraction across them)."""
    result = knn_accuracy(
        backbone,
        config.eval.knn_train_path,
        config.eval.knn_val_path,
        image_size=config.eval.image_size,
        device=device,
        k=config.eval.knn_k,
        temperature=config.eval.knn_temperature,
        num_workers=config.data.num_workers,
        collective=False,
    )
    return result["top1"]


def initial_backbone(config: Config) -> nn.Module:
    """The student backbone exactly as training started from it (same seed, same construction): the fair
    random-init baseline."""
    torch.manual_seed(config.seed)
    return build_backbone(config, config.model.drop_path_rate)


def _add_pictures_to_tensorboard(log_dir: Path, pictures: list[Path]) -> None:
    """The attention overviews beside the scalars, so TensorBoard shows what the features attend to."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for path in pictures:
            pixels = np.asarray(Image.open(path).convert("RGB"))
            writer.add_image(f"attention/{path.stem}", pixels, dataformats="HWC")


def _keep_results(run_dir: Path, step: int, results: dict[str, float]) -> None:
    """The final figures where a user and a script look for them: `results.json`, the last row of `log.jsonl`,
    and TensorBoard scalars at the last step."""
    from torch.utils.tensorboard import SummaryWriter

    write_text_atomic(json.dumps({"step": step, **results}, indent=1) + "\n", run_dir / RESULTS)
    add_to_row(run_dir, step, results)
    with SummaryWriter(log_dir=str(run_dir / TENSORBOARD)) as writer:
        for name, value in results.items():
            writer.add_scalar(f"final/{name}", value, step)


def _save_pictures(config: Config, teacher_backbone: nn.Module, random_init: nn.Module, run_dir: Path) -> None:
    """Attention pictures of the bundled photos, and of held-out images of the kNN's validation classes (when a kNN
    is asked for) with the trained teacher beside its random-init twin: the second shows what training changed."""
    from fastdino.data.demo_dataset import demo_attention_images

    picture_dir = run_dir / PICTURES
    size, count = config.eval.attention_image_size, config.eval.attention_images
    pictures = []
    for name, image in demo_attention_images()[:count]:
        save_attention_maps(teacher_backbone, image, picture_dir, size, name=name)
        pictures.append(picture_dir / f"{name}-overview.png")
    if knn_requested_by(config):
        examples = held_out_examples(config.eval.knn_val_path, count)
        networks = {"trained": teacher_backbone, "random init": random_init}
        pictures.append(save_attention_comparison(networks, examples, picture_dir / HELD_OUT_PICTURE, size))
    _add_pictures_to_tensorboard(run_dir / TENSORBOARD, pictures)
    log.info("attention pictures written to %s", picture_dir)


def final_report(config: Config, teacher_backbone: nn.Module, device: torch.device, step: int) -> dict[str, float]:
    """Writes the pictures into the run directory, keeps the kNN figures (see `_keep_results`) and prints the kNN
    lines last. `step`: the step the evaluated teacher was trained to."""
    run_dir = Path(config.output_dir)
    results: dict[str, float] = {}
    log_path = run_dir / METRICS_LOG
    rows = read_jsonl(log_path) if log_path.is_file() else []
    if rows:
        save_training_curves(rows, run_dir / CURVES, config.model.out_dim, log_path)
    # the random-init twin: the kNN's baseline, and the pictures' comparison of held-out images (a kNN's val folder)
    twin = config.eval.final_knn or (config.eval.attention_images and knn_requested_by(config))
    random_init = initial_backbone(config).to(device) if twin else None
    if config.eval.attention_images:
        _save_pictures(config, teacher_backbone, random_init, run_dir)
    if config.eval.final_knn:
        results["knn_top1_trained"] = knn_top1(teacher_backbone, config, device)
        results["knn_top1_random_init"] = knn_top1(random_init, config, device)
        _keep_results(run_dir, step, results)
        print(f"kNN top-1 (trained): {results['knn_top1_trained']:.2f}%")
        print(f"kNN top-1 (random init): {results['knn_top1_random_init']:.2f}%")
        if results["knn_top1_trained"] < results["knn_top1_random_init"]:
            log.warning(below_random_init(config, results, rows))
    return results


def below_random_init(config: Config, results: dict[str, float], rows: list[dict]) -> str:
    """The warning for a teacher whose kNN fell below its own random init, with the likely cause: the collapse mode
    the run's monitors end in (the collapse guard replayed over the log `rows`)."""
    head = (f"training made the features worse: kNN top-1 {results['knn_top1_trained']:.2f}% against "
            f"{results['knn_top1_random_init']:.2f}% at random init")
    readings = [row for row in rows if "teacher_entropy" in row and "teacher_student_kl" in row]
    if not readings:
        return f"{head}; the log holds no collapse monitors (monitor_every=0?), so the likely cause is not known"
    guard, last = replay(config, rows), readings[-1]
    figures = (f"teacher entropy {last['teacher_entropy']:.3f} of ln K = {guard.ln_k:.2f} at step {last['step']}, "
               f"teacher-student KL {last['teacher_student_kl']:.4f}")
    if guard.candidate:
        return (f"{head}; likely cause: the teacher output ends in {NAMES[guard.candidate]} ({figures}); "
                f"{HINTS[guard.candidate]}")
    return (f"{head}; the monitors end without a collapse ({figures}): at this scale the README's demo recipe "
            "points to small crops (16 tokens per global crop), a faster teacher (dino.momentum_teacher 0.99) and "
            "a slower center (dino.center_momentum 0.99)")
