"""The DINO training loop: build everything from a Config, resume if a checkpoint exists, train, report."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fastdino import checkpoint, reference_run, run_folder, run_record, sharded_checkpoint
from fastdino.builders import (
    build_backbone,
    build_loader,
    build_networks,
    resolve_device,
    resolve_fast_paths,
    resolve_precision,
)
from fastdino.checkpoint import CheckpointWriteError
from fastdino.config import Config, config_to_dict
from fastdino.distributed import (
    DistributedContext,
    build_teacher_ema,
    full_state_dict,
    gather_objects,
    gradient_sync,
    is_sharded,
    reshard,
    resolve_strategy,
    wrap_networks,
)
from fastdino.guard import Guard, GuardStop
from fastdino.kernels import DinoLossOutput
from fastdino.loss import DINOLoss, mean_output
from fastdino.memory_plan import resolve_memory
from fastdino.hub import backbone_state_dict, canonical_name
from fastdino.metrics import MetricsLogger
from fastdino.optim import (
    build_optimizer,
    cancel_last_layer_gradients_,
    clip_gradients_,
    clip_gradients_reference_,
)
from fastdino.resume_policy import check_resume, step_by_images_seen
from fastdino.schedules import Schedules

log = logging.getLogger("fastdino")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the step and the last good checkpoint."""


class Trainer:
    """Owns the state of one run. `Trainer(config).train()` trains to the last epoch, resuming if it can."""

    def __init__(self, config: Config, ctx: DistributedContext | None = None) -> None:
        self.ctx = ctx or DistributedContext.single()
        # a main_dino.py run to continue (resume_from.path), read and checked before anything is built from the config
        self.reference = reference_run.open_reference_run(config, self.ctx.world_size, self.ctx.is_main)
        self.config = config = self.reference.config if self.reference else config
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(config) if ctx is None else self.ctx.device
        self.autocast_dtype = resolve_precision(config, self.device)
        self.fast = resolve_fast_paths(config, self.device)

        self.loader = build_loader(config, self.fast, self.ctx, self.device, self.autocast_dtype)
        if len(self.loader) == 0:
            raise ValueError(
                f"data.batch_size_per_gpu={config.data.batch_size_per_gpu} is larger than this rank's share of "
                f"the dataset at {config.data.path}: no full batch per epoch"
            )
        torch.manual_seed(config.seed)  # identical initial weights on every rank and in the random-init twin
        student, teacher = build_networks(config, self.fast)
        student, teacher = student.to(self.device), teacher.to(self.device)
        self.strategy = resolve_strategy(config.distributed.strategy, self.ctx)
        self.memory = resolve_memory(config, self.device, self.autocast_dtype, self.fast, self.strategy,
                                     self.ctx.world_size)
        self.student, self.teacher = wrap_networks(
            student, teacher, config, self.ctx, self.fast, self.strategy, self.autocast_dtype,
            self.memory.recomputed_blocks,
        )
        self.ema = build_teacher_ema(self.student, self.teacher, fused=self.fast.fused_ema)
        self.optimizer = build_optimizer(self.student, config.optim.optimizer, fused=self.fast.fused_adamw)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.schedules = Schedules(config, len(self.loader), self.ctx.world_size)
        self.dino_loss = DINOLoss(
            config.model.out_dim,
            config.dino.student_temp,
            config.dino.center_momentum,
            fused=self.fast.fused_loss,
        ).to(self.device)
        self.global_batch = config.data.batch_size_per_gpu * self.ctx.world_size
        self.step = 0  # global step about to run
        self.guard = Guard(config)  # replaced by the checkpoint's on resume
        self.last_checkpoint: Path | None = None
        self.checkpoint_step = 0  # the step the last checkpoint holds
        if self.ctx.is_main:
            run_folder.prepare(self.output_dir, start_over=not config.resume)
        self.ctx.barrier()
        resume_from = sharded_checkpoint.find_resume_checkpoint(self.output_dir)
        if resume_from is not None:  # fastdino's own run in output_dir always wins
            self.resume(resume_from)
            started_from = f"resumed from {resume_from} at step {self.step}"
        elif self.reference is not None:
            reference_run.continue_reference_run(self, self.reference)
            started_from = f"continues the main_dino.py run {config.resume_from.path} at step {self.step}"
        else:
            torch.manual_seed(config.seed + 1 + self.ctx.rank)  # stochastic depth draws differ per rank
            started_from = "a fresh run"
        self.reference = None  # loaded or not needed: its tensors are freed
        if self.ctx.is_main:
            run_folder.log_to_run_folder(self.output_dir)  # the run is accepted: the lines held so far, then the rest
            record = run_record.describe(self, started_from)
            run_folder.write_run_info(self.output_dir, record)
            run_folder.write_resolved_config(self.output_dir, config)
            for line in run_record.startup_lines(record):
                log.info(line)
        self.metrics = MetricsLogger(self.output_dir, enabled=self.ctx.is_main, resumed_at=self.step)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact continuation needs. Networks and optimizer by parameter name, without wrapper
        prefixes (sharded DTensors under FSDP); "rng" lists every rank's generators. Collective with >1 rank."""
        self.dino_loss.synchronize_center()
        student, optimizer = get_state_dict(self.student, self.optimizer)
        state = {
            "student": student,
            "teacher": get_model_state_dict(self.teacher),
            "optimizer": optimizer,
            "dino_loss": self.dino_loss.state_dict(),
            "step": self.step,
            "epoch": self.step // len(self.loader),
            "steps_per_epoch": len(self.loader),
            "global_batch": self.global_batch,
            "world_size": self.ctx.world_size,
            "rng": gather_objects(checkpoint.capture_rng_state(), self.ctx),
            "config": config_to_dict(self.config),
            "guard": self.guard.state_dict(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # full (unsharded) weights into FSDP networks, e.g. a single-process checkpoint continued on 8 GPUs
        full = is_sharded(self.student) and not _holds_dtensors(state["student"])
        set_model_state_dict(self.student, state["student"], options=StateDictOptions(full_state_dict=full))
        set_model_state_dict(self.teacher, state["teacher"], options=StateDictOptions(full_state_dict=full))
        # strict=False: a parameter that never had a gradient yet (the frozen last layer) has no optimizer state
        optimizer_options = StateDictOptions(full_state_dict=full, strict=False)
        set_optimizer_state_dict(self.student, self.optimizer, state["optimizer"], options=optimizer_options)
        self._forget_moments_not_in(state["optimizer"]["state"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        if "guard" in state:  # absent from checkpoints written before the guard: it starts fresh
            self.guard.load_state_dict(state["guard"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        rng = state["rng"]
        if self.ctx.rank < len(rng):
            checkpoint.restore_rng_state(rng[self.ctx.rank])
        else:  # more ranks than the run that saved: fresh stochastic-depth draws for the new ranks
            torch.manual_seed(self.config.seed + 1 + self.ctx.rank + self.step)

    def _forget_moments_not_in(self, saved: dict[str, Any]) -> None:
        """A full state loaded into FSDP is merged into the optimizer's own, which torch first creates with one
        zero-gradient step of every parameter: a parameter the checkpoint holds no moments for (the last layer while
        frozen) would keep that state and count a step it never took once it trains."""
        for name, param in self.student.named_parameters():
            if canonical_name(name) not in saved:
                self.optimizer.state.pop(param, None)

    def resume(self, path: Path) -> None:
        """Continue the run saved at `path`, after checking that the settings allow it (fastdino.resume_policy)."""
        if path.is_dir():
            stored = sharded_checkpoint.read_plain(path)["config"]
            self._check_settings(stored)  # before the shards are read: another model shape would not fit them
            state = sharded_checkpoint.load_sharded(path, self.state_dict())
        else:
            state = checkpoint.load(path, map_location=self.device)
            stored = state["config"]
            self._check_settings(stored)
        state["step"], note = step_by_images_seen(state, self.ctx.world_size, self.config.data.batch_size_per_gpu,
                                                  len(self.loader))
        if note and self.ctx.is_main:
            log.info(note)
        self._note_longer_schedule(state, stored["optim"]["epochs"])
        self.load_state_dict(state)
        self.last_checkpoint, self.checkpoint_step = path, self.step
        if self.ctx.is_main:
            log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.step // len(self.loader))

    def _check_settings(self, stored: dict[str, Any]) -> None:
        for note in check_resume(stored, self.config):
            if self.ctx.is_main:
                log.info(note)

    def _note_longer_schedule(self, state: dict[str, Any], stored_epochs: int) -> None:
        if self.config.optim.epochs == stored_epochs or not self.ctx.is_main:
            return
        step = min(state["step"], self.schedules.total_steps - 1)
        log.info("optim.epochs %d -> %d: the lr, weight decay, teacher momentum and temperature schedules are "
                 "recomputed for %d epochs, as if the run had started with them: at step %d the lr is %.3g (the "
                 "last step trained used %.3g)", stored_epochs, self.config.optim.epochs,
                 self.config.optim.epochs, state["step"], float(self.schedules.lr[step]),
                 state["optimizer"]["param_groups"][0]["lr"])

    def save(self) -> None:
        """Write the checkpoint (and at the epochs saveckp_freq says, a numbered copy, written first so that a kill
        never leaves a published checkpoint without its announced copy)."""
        state = self.state_dict()
        epoch, within = divmod(self.step, len(self.loader))
        freq = self.config.saveckp_freq
        numbered = f"checkpoint{epoch - 1:04d}" if within == 0 and freq and (epoch - 1) % freq == 0 else None
        sharded = is_sharded(self.student)
        path = self.output_dir / (sharded_checkpoint.SHARDED_DIR if sharded else checkpoint.LATEST)
        target = path
        try:
            if sharded:
                copies = (self.output_dir / f"{numbered}_dcp",) if numbered else ()
                sharded_checkpoint.save_sharded(state, path, self.ctx, copies)
            elif self.ctx.is_main:
                if numbered:  # the copy first, then the same bytes published as the checkpoint
                    target = self.output_dir / f"{numbered}.pth"
                    checkpoint.save_atomic(state, target)
                    target = path
                    checkpoint.copy_atomic(self.output_dir / f"{numbered}.pth", path)
                else:
                    checkpoint.save_atomic(state, path)
        except OSError as error:
            raise CheckpointWriteError(
                f"could not write {target}: {error.strerror or error}; {self._previous_checkpoint_note()}"
            ) from None
        self.last_checkpoint, self.checkpoint_step = path, self.step
        if numbered and self.ctx.is_main:
            log.info("kept a copy of the checkpoint of epoch %d as %s", epoch - 1, numbered)

    def _previous_checkpoint_note(self) -> str:
        """Whether the run can go on from disk: the previous checkpoint, checked by reading it."""
        if self.last_checkpoint is None:
            return "no checkpoint was written before: the same command starts from step 0"
        if self.last_checkpoint.is_dir():
            sharded_checkpoint.read_metadata(self.last_checkpoint)
            sharded_checkpoint.read_plain(self.last_checkpoint)
        else:
            checkpoint.load(self.last_checkpoint)
        return (f"the previous checkpoint {self.last_checkpoint} (step {self.checkpoint_step}) is intact and loads: "
                "once there is room, the same command resumes from it")

    # ---------------------------------------------------------------- one step
    def train_step(self, crops: list[torch.Tensor], monitors: bool = False) -> DinoLossOutput:
        """One optimizer step at `self.step` with the values its schedule record gives: forward both networks and
        backward, per micro-batch (data.micro_batches), then clip, optimizer step, EMA. Returns the loss output of
        the whole batch (on device)."""
        config, scheduled = self.config, self.schedules.at(self.step)
        self.last_scheduled = scheduled  # the log row of this step reads the same record
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = scheduled.lr
            if index == 0:
                group["weight_decay"] = scheduled.weight_decay
        crops = [crop.to(self.device, non_blocking=True) for crop in crops]
        micro_batches = self.memory.micro_batches
        self.optimizer.zero_grad(set_to_none=True)
        outputs = []
        for index, part in enumerate(zip(*(crop.chunk(micro_batches) for crop in crops))):
            last = index == micro_batches - 1
            with gradient_sync(self.student, enabled=last):  # one gradient reduction per step, with the last
                output = self._forward(list(part), scheduled.teacher_temp, monitors, last)
                loss = output.loss / micro_batches  # equal micro-batches: the mean over the whole batch
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            outputs.append(output)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if config.optim.clip_grad:
            clip = clip_gradients_ if self.fast.sync_free_clip else clip_gradients_reference_
            clip(self.student, config.optim.clip_grad)
        if scheduled.last_layer_frozen:
            cancel_last_layer_gradients_(self.student)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(scheduled.teacher_momentum)
        self.dino_loss.synchronize_center()
        self.step += 1
        return outputs[0] if micro_batches == 1 else mean_output(outputs)

    def _forward(self, crops: list[torch.Tensor], teacher_temp: float, monitors: bool, last: bool) -> DinoLossOutput:
        """Teacher (no grad) and student on the crops of one micro-batch, and their loss."""
        autocast = torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype != torch.float32
        )
        with autocast:
            with torch.no_grad():
                teacher_logits = self.teacher(crops[:2])
                reshard(self.teacher)  # FSDP: the next forward must gather the shards the EMA updates
            student_logits = self.student(crops)
        return self.dino_loss(student_logits, teacher_logits, teacher_temp, monitors=monitors, last_micro_batch=last)

    # ---------------------------------------------------------------- the loop
    def train(self, stop_after_steps: int | None = None) -> dict[str, Any]:
        """Train until the last step of the schedule (or until global step `stop_after_steps`, as if the run were
        interrupted there; the next Trainer on the same output_dir resumes from the last checkpoint)."""
        total = self.schedules.total_steps
        if stop_after_steps is not None:
            total = min(stop_after_steps, total)
        progress = tqdm(total=total, initial=self.step, disable=not self.ctx.is_main, unit="step", dynamic_ncols=True)
        try:
            with logging_redirect_tqdm():  # log lines (the guard's warnings) on lines of their own above the bar
                return self._train_until(total, progress)
        finally:  # also on an error: its one line then starts on a line of its own
            progress.close()
            self.metrics.close()

    def _train_until(self, total: int, progress: tqdm) -> dict[str, Any]:
        config, steps_per_epoch, batch = self.config, len(self.loader), self.global_batch
        loss_sum = torch.zeros((), device=self.device)
        window_steps, window_start = 0, time.perf_counter()
        last_row: dict[str, Any] = {}
        while self.step < total:
            epoch, start = divmod(self.step, steps_per_epoch)
            for crops, _labels in self.loader.epoch_iter(epoch, start_step=start):
                # the collapse monitors of every monitor_every-th step, written in that step's own row only
                monitors = config.monitor_every > 0 and (self.step + 1) % config.monitor_every == 0
                output = self.train_step(crops, monitors=monitors)
                loss_sum += output.loss.detach()
                window_steps += 1
                progress.update(1)
                monitored: dict[str, float] = {}
                at_epoch_end = self.step % steps_per_epoch == 0
                at_checkpoint = at_epoch_end or (config.checkpoint_every and self.step % config.checkpoint_every == 0)
                stop = False
                if monitors or self.step % config.log_every == 0 or at_checkpoint or self.step == total:
                    # one all-reduce and one read-back for the row: the loss and, when measured, both monitors
                    # (averaged over ranks: every rank's guard agrees)
                    figures = [loss_sum / window_steps]
                    if monitors:
                        figures += [output.teacher_entropy, output.teacher_student_kl]
                    loss, *measured = self.ctx.mean(torch.stack([figure.float() for figure in figures])).tolist()
                    monitored = dict(zip(("teacher_entropy", "teacher_student_kl"), measured))
                    self._check_finite(loss, epoch)
                    seconds = time.perf_counter() - window_start
                    # evaluated before the row is written and the checkpoint saved: a kill in between redoes both
                    evaluation = self._end_of_epoch(epoch) if at_epoch_end else {}
                    last_row = {**self._log_row(loss, window_steps * batch / seconds), **monitored, **evaluation}
                    self.metrics.log(last_row)
                    stop = self._watch(monitored) if monitored else False
                    progress.set_postfix(
                        loss=f"{loss:.4f}",
                        lr=f"{last_row['lr']:.2e}",
                        wd=f"{last_row['weight_decay']:.3f}",
                        m=f"{last_row['momentum']:.4f}",
                        tt=f"{last_row['teacher_temp']:.3f}",
                        img_s=f"{last_row['img_per_s']:.0f}",
                    )
                    loss_sum.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                if at_checkpoint or stop:
                    self.save()
                if stop:
                    raise GuardStop(self.guard.stop_line(self.step, str(self.last_checkpoint)))
                if at_epoch_end or self.step >= total:
                    break
        return last_row

    def _watch(self, monitored: dict[str, float]) -> bool:
        """Show the collapse guard the reading logged at this step; True when guard.action=stop ends the run."""
        event = self.guard.observe(self.step, monitored["teacher_entropy"], monitored["teacher_student_kl"])
        if event is None:
            return False
        if self.ctx.is_main:
            log.warning(event.line)
        return bool(event.mode) and self.config.guard.action == "stop"

    def _log_row(self, loss: float, images_per_second: float) -> dict[str, Any]:
        """The row of the step just trained: its loss and the values its schedule record gave it."""
        scheduled = self.last_scheduled
        return {
            "step": self.step,
            "epoch": scheduled.epoch,
            "loss": loss,
            "lr": scheduled.lr,
            "weight_decay": scheduled.weight_decay,
            "momentum": scheduled.teacher_momentum,
            "teacher_temp": scheduled.teacher_temp,
            "img_per_s": images_per_second,
        }

    def _check_finite(self, loss: float, epoch: int) -> None:
        if math.isfinite(loss):
            return
        where = self.last_checkpoint or "none (no checkpoint was written yet)"
        raise NonFiniteLossError(
            f"the loss became {loss} by step {self.step} (epoch {epoch}); training stopped without saving. "
            f"Last good checkpoint: {where}. Try a lower optim.lr, a longer optim.warmup_epochs, "
            f"precision=fp32, or dino.teacher_temp closer to 0.04."
        )

    def _end_of_epoch(self, epoch: int) -> dict[str, float]:
        """The periodic kNN when it is due ({} otherwise): every rank takes part, rank 0 gets the figure."""
        every = self.config.eval.knn_every_epochs
        if not every or (epoch + 1) % every:
            return {}
        from fastdino.report import knn_top1

        backbone = self.teacher_backbone()  # every rank: a gather under FSDP
        if not self.ctx.is_main:
            return {}
        top1 = knn_top1(backbone, self.config, self.device)
        log.info("epoch %d: kNN top-1 %.2f%%", epoch, top1)
        return {"knn_top1": top1}

    def teacher_backbone(self) -> torch.nn.Module:
        """The teacher's ViT (what DINO evaluates and exports). Under FSDP a plain copy gathered from the shards:
        every rank must call it, and only rank 0's copy holds the weights."""
        if not is_sharded(self.teacher):
            return self.teacher.backbone
        weights = full_state_dict(self.teacher)  # collective; only rank 0 receives the tensors
        backbone = build_backbone(self.config, 0.0)
        if self.ctx.is_main:
            backbone.load_state_dict(backbone_state_dict(weights))
        return backbone.to(self.device)


def _holds_dtensors(state: dict[str, Any]) -> bool:
    return any(isinstance(value, DTensor) for value in state.values())
