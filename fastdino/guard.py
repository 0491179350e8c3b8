"""The collapse guard: DINO's failure modes are silent, so it reads the teacher monitors and says when one sets in.

The teacher output can go uniform (entropy -> ln K, teacher-student KL -> 0) or one-hot (entropy -> 0), and at
small scale a teacher that had become informative can drift back toward uniform; training carries on in every case
and the features end up worse than random. Each monitor reading (teacher entropy and KL, every `monitor_every`
steps) is classified against ln K (K = model.out_dim); a mode is reported once it has held for `guard.patience`
steps, and so is the recovery from it, each as one line. The thresholds are fractions of ln K so that they mean the
same for K = 1024 (the demo) and 65536 (the paper). The guard's state is plain data, saved in the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fastdino.config import Config

EXIT_GUARD_STOP = 3  # the exit code of a run that guard.action=stop ended

NAMES = {"uniform": "uniform collapse", "one_hot": "one-hot collapse", "drift": "drift toward uniform"}

# What fixed each mode at this scale, with the evidence of the README's demo table (section "The demo recipe").
HINTS = {
    "uniform": "in the README's demo table a slower center is what fixed it (dino.center_momentum 0.9: uniform by "
               "step 40; 0.95 and 0.97: 6.86 and 6.43 when stopped; 0.99: trains), a lower optim.lr only delayed "
               "it (0.012 -> 0.002 per 256: step 40 -> 110) and a lower dino.teacher_temp (0.02) did not prevent it",
    "one_hot": "at this scale it can pass by itself (the demo's teacher stays near 0 from step ~25 to ~115, then "
               "recovers); if it holds, the README's demo table points to a higher dino.teacher_temp (0.02: 0.00 "
               "by step 30; 0.04: recovers) or a faster center (a lower dino.center_momentum)",
    "drift": "in the README's demo table a teacher temperature warmed up to 0.07 drove the teacher from 0.25 back "
             "to 6.1 by step 110 while a constant 0.04 recovered to an informative 1.6: keep dino.teacher_temp at "
             "its warmup value, use a slow center (dino.center_momentum 0.99) or a lower optim.lr (0.012 -> 0.002 "
             "per 256 delayed the uniform collapse from step 40 to 110)",
}


class GuardStop(RuntimeError):
    """guard.action=stop ended the run after writing a checkpoint; the message says why and how to go on."""


@dataclass(frozen=True)
class GuardEvent:
    """What a reading changed: a collapse mode set in (`mode` names it) or the run recovered (`mode` is "")."""

    mode: str
    line: str


class Guard:
    """Classifies monitor readings and keeps what it has seen; `observe` returns an event when a mode starts or
    ends. Deterministic in the readings, so a resumed run reports what an uninterrupted one would."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ln_k = math.log(config.model.out_dim)
        self.mode = ""  # the collapse mode last reported ("" when none, or after a recovery)
        self.candidate = ""  # what the readings show since step `since` ("" is healthy)
        self.since = 0
        self.lowest = math.inf  # the lowest teacher entropy read so far (the drift is measured from it)

    def classify(self, entropy: float, kl: float) -> str:
        """The mode one reading shows: uniform first (near ln K with KL near 0), then one-hot, then the drift."""
        settings, ln_k = self.config.guard, self.ln_k
        near = settings.band * ln_k
        if entropy >= ln_k - near and kl <= near:
            return "uniform"
        if entropy <= near:
            return "one_hot"
        if entropy - self.lowest >= settings.drift * ln_k:
            return "drift"
        return ""

    def observe(self, step: int, entropy: float, kl: float) -> GuardEvent | None:
        """Take the reading logged at `step`; an event once a new mode (or the recovery) has held long enough."""
        self.lowest = min(self.lowest, entropy)
        shown = self.classify(entropy, kl)
        if shown != self.candidate:
            self.candidate, self.since = shown, step
        if shown == self.mode or step - self.since < self.config.guard.patience:
            return None
        previous, self.mode = self.mode, shown
        figures = f"teacher entropy {entropy:.3f} (ln K = {self.ln_k:.2f}), teacher-student KL {kl:.4f}"
        if not shown:
            return GuardEvent("", f"guard: recovered from the {NAMES[previous]} at step {step}: {figures}")
        if shown == "drift":
            figures += f", up from {self.lowest:.3f}"
        return GuardEvent(shown, f"guard: {NAMES[shown]} at step {step}: {figures}, for {step - self.since} steps; "
                                 f"{HINTS[shown]} (this run: {self._settings()})")

    def _settings(self) -> str:
        dino, config = self.config.dino, self.config
        return (f"dino.center_momentum={dino.center_momentum:g}, dino.teacher_temp={dino.teacher_temp:g} "
                f"(warmup from {dino.warmup_teacher_temp:g} over {dino.warmup_teacher_temp_epochs} epochs), "
                f"optim.lr={config.optim.lr:g}, model.out_dim={config.model.out_dim}")

    def example_fix(self) -> str:
        """One override the current mode's hint names, as typed on the command line: the first that changes this
        run's settings."""
        dino = self.config.dino
        if self.mode == "one_hot":
            if dino.teacher_temp < 0.04:
                return "dino.teacher_temp=0.04"
            return f"dino.center_momentum={1 - 2 * (1 - dino.center_momentum):.4g}"  # a center twice as fast
        if self.mode == "drift" and dino.teacher_temp != dino.warmup_teacher_temp:
            return f"dino.teacher_temp={dino.warmup_teacher_temp:g}"
        if dino.center_momentum < 0.99:
            return "dino.center_momentum=0.99"
        return f"optim.lr={self.config.optim.lr / 2:g}"

    def stop_line(self, step: int, checkpoint: str) -> str:
        """Why guard.action=stop ended the run, and the two ways on (a resume refuses changes to what is trained)."""
        output_dir = self.config.output_dir
        return (f"the collapse guard stopped the run at step {step} ({NAMES[self.mode]}, guard.action=stop) after "
                f"writing {checkpoint}. A resume refuses changes to what is trained, the fixes the warning names "
                f"included: to try one, rerun with resume=false and e.g. {self.example_fix()} (this run moves into "
                f"{output_dir}/replaced-<date>/) or with another output_dir; the same command continues this run as "
                f"it is (the guard stops it again only at the next mode it reports; add guard.action=warn to let it "
                f"run on)")

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and strings, which the checkpoint's data-only loader accepts."""
        return {"mode": self.mode, "candidate": self.candidate, "since": self.since, "lowest": self.lowest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mode, self.candidate = str(state["mode"]), str(state["candidate"])
        self.since, self.lowest = int(state["since"]), float(state["lowest"])


def replay(config: Config, rows: list[dict[str, Any]]) -> Guard:
    """A guard fed every monitor reading of a run's log rows, in order (its events are dropped): what the run's
    own guard concluded, for a report written after training."""
    guard = Guard(config)
    for row in rows:
        if "teacher_entropy" in row and "teacher_student_kl" in row:
            guard.observe(row["step"], row["teacher_entropy"], row["teacher_student_kl"])
    return guard
