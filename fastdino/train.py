"""Train DINO (`fastdino train`, or `python train.py` in a checkout).

    fastdino train --config configs/vit_small_p16.yaml data.path=/path/to/imagenet/train output_dir=runs/x

Any config field can be overridden as `section.key=value`. A run resumes automatically from
`<output_dir>/checkpoint.pth` (or `checkpoint_dcp/`, the sharded checkpoint of FSDP runs) when it exists.
Multi-GPU: `torchrun --nproc_per_node=8 train.py ...` (FSDP2 by default; distributed.strategy=ddp for DDP).
"""
from __future__ import annotations

import argparse
import logging
import sys

from fastdino.config import load_config, parse_override
from fastdino.rules import CheckedArgumentParser
from fastdino.errors import is_first_process, report_usage_errors
from fastdino.preflight import check_runnable, unnamed_knn_data
from fastdino.settings_help import settings_help


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CheckedArgumentParser(description=__doc__, epilog=settings_help())
    parser.add_argument("--config", help="YAML recipe under configs/ (defaults: the reference main_dino.py's)")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. optim.lr=0.001 data.path=/data")
    return parser.parse_args(argv)


@report_usage_errors
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    check_runnable(config)  # before the trainer is imported and the output folder exists: bad settings cost seconds
    warning = unnamed_knn_data(config, {parse_override(text)[0] for text in args.overrides})
    if warning and is_first_process():
        logging.getLogger("fastdino").warning(warning)

    from fastdino.distributed import init_distributed, shutdown_distributed
    from fastdino.guard import EXIT_GUARD_STOP, GuardStop
    from fastdino.report import final_report
    from fastdino.trainer import NonFiniteLossError, Trainer

    trainer = None
    try:
        ctx = init_distributed(config.device)
        trainer = Trainer(config, ctx)
        trainer.train()
        backbone = trainer.teacher_backbone()  # every rank: under FSDP this gathers the sharded teacher
        if ctx.is_main:
            final_report(config, backbone, trainer.device, trainer.step)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except GuardStop as stop:
        if is_first_process():
            print(stop, file=sys.stderr)
        return EXIT_GUARD_STOP
    except KeyboardInterrupt:
        if is_first_process():
            print(interrupted(trainer), file=sys.stderr)
        return 130
    shutdown_distributed()
    return 0


def interrupted(trainer) -> str:
    """The one line a Ctrl-C leaves: where training was, and where the same command continues."""
    if trainer is None:
        return "interrupted while starting; the same command starts again"
    if trainer.step >= trainer.schedules.total_steps:
        return f"interrupted after training finished (step {trainer.step}); the same command redoes the evaluation"
    return (f"interrupted at step {trainer.step}; the same command resumes from step {trainer.checkpoint_step}"
            f"{'' if trainer.last_checkpoint else ' (no checkpoint yet)'}")


if __name__ == "__main__":
    sys.exit(main())
