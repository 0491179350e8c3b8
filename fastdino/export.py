"""Write a checkpoint's backbone for downstream use, and check the file by loading it back.

    python -m fastdino.export runs/demo/checkpoint.pth --out teacher.safetensors
    python -m fastdino.export runs/vitb8/checkpoint_dcp --format timm --out vitb8.pth   # a sharded run, consolidated
    python -m fastdino.export runs/x/checkpoint.pth --format reference-run --out ref/checkpoint.pth   # for main_dino.py

The backbone keys of DINO's ViT are the same in the reference's layout and in timm's (`cls_token`, `pos_embed`,
`patch_embed.proj.*`, `blocks.<i>.*`, `norm.*`), so both formats hold the same tensors; `--format` says which
independently written model the file is checked against (timm's VisionTransformer for both, plus fastdino's ViT for
the reference layout). A `.safetensors` name writes safetensors, which timm and the Hugging Face tools load without
unpickling anything; a `.pth` or `.pt` name a plain tensor dict that PyTorch's restricted loader (weights_only) reads.
Any other suffix is refused before anything is written (`--out x.onnx` would otherwise hold a pickle).
`--format reference-run` writes the whole training state instead, as the reference's main_dino.py saves it, for the
reference to resume (fastdino.reference_run).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch
from torch import nn

from fastdino import checkpoint as checkpoint_io
from fastdino.rules import CheckedArgumentParser, existing_path
from fastdino.distributed import full_state_dict
from fastdino.errors import UsageError, report_usage_errors
from fastdino.hub import backbone_state_dict, describe_backbone, load_checkpoint_file, load_pretrained
from fastdino.models.vit import ARCHITECTURES
from fastdino.reference_run import export_reference_run

FORMATS = ("reference", "timm", "reference-run")
# what is written -> the --out suffixes it is written under; any other name would hold a pickle its suffix misnames
PICKLE = "a PyTorch pickle"
SUFFIXES = {"safetensors": (".safetensors",), PICKLE: (".pth", ".pt")}
EXPORT_FILE = "teacher_export.pth"


def export_teacher(trainer, path: str | Path | None = None, include_head: bool = False) -> Path:
    """Write a running trainer's teacher as one plain state dict, whatever the strategy.

    include_head=False: backbone keys as the reference's released weights; include_head=True: the reference
    checkpoint's teacher layout (`backbone.*` and `head.*`), loadable into a MultiCropWrapper.
    Collective under FSDP (every rank calls it; rank 0 writes). Returns the path.
    """
    path = Path(path) if path is not None else trainer.output_dir / EXPORT_FILE
    weights = full_state_dict(trainer.teacher)
    if trainer.ctx.is_main:
        checkpoint_io.save_atomic(weights if include_head else backbone_state_dict(weights), path)
    trainer.ctx.barrier()
    return path


def check_out_suffix(out: Path, format: str) -> None:
    """UsageError, before anything is read or written, for an `--out` suffix this command does not write: x.onnx
    would get a PyTorch pickle under a name that promises ONNX. (A reference run's .safetensors is refused by
    export_reference_run, which says why.)"""
    if not any(out.suffix in suffixes for suffixes in SUFFIXES.values()):
        accepted = ", ".join(f"{' or '.join(suffixes)} ({written})" for written, suffixes in SUFFIXES.items()
                             if format != "reference-run" or written == PICKLE)
        raise UsageError(f"--out {out}: fastdino export --format {format} does not write "
                         f"{out.suffix or 'a name without suffix'}; name the file {accepted}")


def write_weights(state_dict: dict[str, torch.Tensor], out: Path) -> None:
    """Atomically write a tensor dict: safetensors for a `.safetensors` name, else a plain `.pth`."""
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()}
    checkpoint_io.save_atomic(tensors, out, _write_safetensors if out.suffix == ".safetensors" else torch.save)


def _write_safetensors(tensors: dict[str, torch.Tensor], handle: IO[bytes]) -> None:
    from safetensors.torch import save

    handle.write(save(tensors, metadata={"format": "pt"}))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Inverse of `write_weights`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return checkpoint_io.load(path)


def timm_model(shape: dict) -> nn.Module:
    """timm's own ViT with the given arch/patch/depth/grid and no classifier: the independent check."""
    from timm.models.vision_transformer import VisionTransformer

    widths = ARCHITECTURES[shape["arch"]]
    return VisionTransformer(img_size=shape["img_size"], patch_size=shape["patch_size"],
                             embed_dim=widths["embed_dim"], depth=shape["depth"], num_heads=widths["num_heads"],
                             num_classes=0, qkv_bias=True)


def export(source: str | Path, out: str | Path, format: str = "reference", checkpoint_key: str | None = None) -> str:
    """Write the `checkpoint_key` backbone of `source` (default: the teacher, as the reference) to `out`, load it
    back into timm's ViT (and fastdino's for the reference layout) with strict=True, check that they compute the same
    CLS features as the source network, and return a one-line description of what was written. With
    `--format reference-run` the whole run is written, both networks: a key is refused."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_out_suffix(Path(out), format)
    if format == "reference-run":
        if checkpoint_key is not None:
            raise UsageError(f"--checkpoint-key {checkpoint_key}: --format reference-run writes the whole run, teacher "
                             "and student; leave the key out")
        return export_reference_run(source, out)
    checkpoint_key = checkpoint_key or "teacher"
    source, out = Path(source), Path(out)
    weights = backbone_state_dict(load_checkpoint_file(source), checkpoint_key)
    shape = describe_backbone(weights)
    write_weights(weights, out)

    written = read_weights(out)
    original = load_pretrained({"weights": weights}, checkpoint_key="weights")
    checkers = [timm_model(shape)] + ([load_pretrained({"weights": written}, checkpoint_key="weights")]
                                      if format == "reference" else [])
    checkers[0].load_state_dict(written, strict=True)
    images = torch.randn(2, 3, shape["img_size"], shape["img_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original(images)
        for model in checkers:
            features = model.eval()(images)
            if not torch.allclose(features, expected, atol=1e-5, rtol=1e-4):
                raise RuntimeError(f"{out} does not reproduce the checkpoint's features in {type(model).__name__}")
    parameters = sum(tensor.numel() for tensor in written.values())
    checked = "timm's VisionTransformer" + (" and fastdino's ViT" if format == "reference" else "")
    return (f"wrote {out}: the {checkpoint_key} backbone of {source} ({shape['arch']}, patch {shape['patch_size']}, "
            f"depth {shape['depth']}, {shape['img_size']} px position grid; {len(written)} tensors, "
            f"{parameters / 1e6:.2f} M parameters) in the {format} layout; loaded back strictly into {checked}, "
            f"same features")


@report_usage_errors
def main(argv: Sequence[str] | None = None) -> str:
    parser = CheckedArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   rules={"checkpoint": existing_path})
    parser.add_argument("checkpoint", help="fastdino checkpoint.pth or checkpoint_dcp/ folder, or a reference "
                                           "checkpoint (full or backbone-only)")
    parser.add_argument("--out", required=True,
                        help="file to write: .safetensors (not with reference-run), or .pth or .pt (a PyTorch pickle)")
    parser.add_argument("--format", choices=FORMATS, default="reference",
                        help="key layout and the model it is checked against (default: reference); reference-run: "
                             "the whole training state as a main_dino.py checkpoint.pth, to resume in the reference")
    parser.add_argument("--checkpoint-key", choices=("teacher", "student"), default=None,
                        help="network to export from training checkpoints (default: teacher, as the reference; not "
                             "with --format reference-run, which writes both)")
    args = parser.parse_args(argv)
    line = export(args.checkpoint, args.out, args.format, args.checkpoint_key)
    print(line)
    return line


if __name__ == "__main__":
    main()
