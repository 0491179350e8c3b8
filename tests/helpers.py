"""Small builders shared by the training tests: a folder of tiny JPEGs, a tiny-model config, a free port, two gloo
ranks, exact state comparison, a user's files planted where a run writes, and the bench scripts as modules."""
import datetime
import importlib.util
import os
import socket
import subprocess
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdino.config import Config, load_config


def write_image_folder(root, count: int = 16):
    """`count` 40 px JPEGs in 2 classes: colour ramps whose orientation depends on the class, plus noise."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 40)
    for index in range(count):
        label = index % 2
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.tile(ramp, (40, 1)) if label == 0 else np.tile(ramp[:, None], (1, 40))
        pixels = np.stack([base, base[::-1], np.full_like(base, rng.uniform(0, 255))], -1)
        pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


# A user's files beside a run: names a run's writers and tidy-up could mistake for their own (temporaries by a loose
# pattern, run names with a suffix or prefix), a folder of moved-aside look, and a project's files.
LOOK_ALIKES = ("notes.tmp", "draft.tmp-1", "cache.tmp/blob.bin", ".notes.tmp-12", ".checkpoint.pth.tmp-x",
               ".checkpoint_dcp.tmp.keep/part", ".mine_dcp.tmp/part", "checkpoint.pth.bak", "my_checkpoint.pth",
               "checkpoint12.pth", "log.jsonl.old", "config.yml", "checkpoints/keep.txt", "tensorboard.txt",
               "replaced/notes.txt", "train.py", "README.md")


def plant_user_files(folder) -> dict[str, bytes]:
    """A git checkout with the LOOK_ALIKES committed in `folder`; {relative path: bytes} of every file in it."""
    for index, name in enumerate(LOOK_ALIKES):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{name}: the user's own file {index}\n".encode() * (index + 1))
    git = ["git", "-c", "user.name=user", "-c", "user.email=user@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=folder, check=True)
    subprocess.run([*git, "add", "-A", "-f"], cwd=folder, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "the user's work"], cwd=folder, check=True)
    return files_under(folder)


def files_under(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_user_files_intact(folder, planted: dict[str, bytes]) -> None:
    """Every planted byte is where it was, and git sees no tracked file changed."""
    now = files_under(folder)
    changed = sorted(name for name, content in planted.items() if now.get(name) != content)
    assert not changed, f"the user's files changed or went away: {changed}"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, check=True,
                            capture_output=True, text=True).stdout
    assert status == "", status


def tiny_config(data_path, output_dir, *extra: str) -> Config:
    """A one-block ViT-Tiny/8 on 16 px global and 8 px local crops, batch 4: a training step in milliseconds."""
    return load_config(None, [
        f"data.path={data_path}", f"output_dir={output_dir}", "model.arch=vit_tiny", "model.depth=1",
        "model.patch_size=8", "model.out_dim=64", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
        "data.global_crop_size=16", "data.local_crop_size=8", "data.local_crops_number=2",
        "data.batch_size_per_gpu=4", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1",
        "log_every=1", "monitor_every=2", "device=cpu", *extra,
    ])


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def state_of(trainer) -> dict:
    """What an exact continuation must reproduce: both networks, the center and the optimizer moments."""
    return {
        "student": trainer.student.state_dict(),
        "teacher": trainer.teacher.state_dict(),
        "center": trainer.dino_loss.center.clone(),
        "optimizer": trainer.optimizer.state_dict()["state"],
    }


def assert_identical(a, b, path: str = "") -> None:
    """Nested dicts of tensors and plain values equal bit for bit (the path names the first difference)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, path


def _two_rank_worker(rank: int, port: int, scenarios, work, data) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    # a short timeout: a rank that fails must not leave the other waiting in a collective for half an hour
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    from fastdino.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed("cpu")
    try:
        scenarios(ctx, work, data)
    except BaseException:
        (work / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        shutdown_distributed()


def run_on_two_ranks(scenarios, work, data) -> None:
    """`scenarios(ctx, work, data)` in two CPU processes joined by gloo (a module-level function: it is pickled);
    a failing rank leaves its traceback in work/error_rank<r>.txt."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(free_port(), scenarios, work, data), nprocs=2, join=True)


def load_bench(name: str):
    """A benchmark script of bench/ (e.g. "bench_step") as a module: they are scripts, not an installed package."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
