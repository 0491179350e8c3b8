"""log.jsonl after a kill: the rows of steps that will be trained again, and a row cut short, are forgotten."""
import json

from fastdino.metrics import MetricsLogger


def write_rows(path, steps, torn=False):
    text = "".join(json.dumps({"step": step, "loss": float(step)}) + "\n" for step in steps)
    path.write_text(text + ('{"step": 9, "lo' if torn else ""))


def steps_in(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_keeps_rows_up_to_the_checkpoint_step_and_drops_a_torn_row(tmp_path):
    write_rows(tmp_path / "log.jsonl", range(1, 9), torn=True)
    logger = MetricsLogger(tmp_path, tensorboard=False, resumed_at=5)
    logger.log({"step": 6, "loss": 0.5})
    assert steps_in(tmp_path / "log.jsonl") == [1, 2, 3, 4, 5, 6]


def test_fresh_start_forgets_the_rows_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    write_rows(tmp_path / "log.jsonl", range(1, 3))
    MetricsLogger(tmp_path, tensorboard=False, resumed_at=0).log({"step": 1, "loss": 0.1})
    assert steps_in(tmp_path / "log.jsonl") == [1]


def test_other_ranks_do_not_touch_the_log(tmp_path):
    write_rows(tmp_path / "log.jsonl", range(1, 4))
    MetricsLogger(tmp_path, enabled=False, resumed_at=1).log({"step": 2})
    assert steps_in(tmp_path / "log.jsonl") == [1, 2, 3]
