"""What a run says and writes about its folder, word for word: the claim it writes into a fresh folder, the lines
naming what it moved aside and what else the folder holds, the run log's line format and its one destination, and a
resolved config that reruns the same settings in config.py's order."""
import json
import logging
import re

import pytest
import yaml

from fastdino import checkpoint, run_folder
from fastdino.config import config_to_dict, load_config
from fastdino.resume_policy import flatten


@pytest.mark.parametrize("count, said", [(1, "1 entry that this run leaves untouched: a"),
                                         (5, "5 entries that this run leaves untouched: a, b, c, d, e"),
                                         (6, "6 entries that this run leaves untouched: a, b, c, d, e, ...")])
def test_a_started_over_run_says_where_it_moved_the_last_one_and_what_else_the_folder_holds(tmp_path, caplog,
                                                                                             count, said):
    checkpoint.save_atomic({"step": 3}, tmp_path / checkpoint.LATEST)
    (tmp_path / run_folder.METRICS_LOG).write_text("")
    earlier = tmp_path / "replaced-20200101-000000"  # a run moved aside before: not listed
    earlier.mkdir()
    for name in "abcdef"[:count]:
        (tmp_path / name).write_text(name)
    caplog.set_level(logging.INFO, logger="fastdino")
    run_folder.prepare(tmp_path, start_over=True)
    moved, = (path for path in tmp_path.glob("replaced-*") if path != earlier)
    assert re.fullmatch(r"replaced-\d{8}-\d{6}", moved.name) and (moved / checkpoint.LATEST).is_file()
    assert caplog.messages == [f"resume=false: the previous run in {tmp_path} was moved to {moved}; starting over",
                               f"{tmp_path} also holds {said}"]
    # the folder holds no run now: claimed for the new one before anything else is written
    assert json.loads((tmp_path / run_folder.RUN_INFO).read_text()) == {"written_by": "fastdino",
                                                                        "started_from": "starting"}


def test_a_folder_holding_a_runs_names_and_no_run_names_them_all(tmp_path):
    (tmp_path / run_folder.RESOLVED_CONFIG).write_text("mine: 1\n")
    (tmp_path / run_folder.METRICS_LOG).write_text("")
    with pytest.raises(run_folder.ForeignFolderError,
                       match=f"holds {run_folder.RESOLVED_CONFIG}, {run_folder.METRICS_LOG}, which a run writes,"):
        run_folder.check_usable(tmp_path)


def test_the_run_log_has_each_line_once_with_its_time_and_level(tmp_path):
    log = logging.getLogger("fastdino")
    level = log.level
    log.setLevel(logging.WARNING)  # as a program that set it so: the run's INFO lines are still logged
    try:
        run_folder.hold_log_lines()
        log.info("held while starting")
        run_folder.log_to_run_folder(tmp_path)
        log.info("accepted")
        (tmp_path / "next").mkdir()
        run_folder.log_to_run_folder(tmp_path / "next")  # a later run in this process: its folder alone
        log.info("the next run")
    finally:
        run_folder.hold_log_lines()  # closes the file
        log.setLevel(level)
    stamp = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} INFO "
    lines = (tmp_path / run_folder.RUN_LOG).read_text().splitlines()
    assert [re.fullmatch(stamp + r"(.*)", line).group(1) for line in lines] == ["held while starting", "accepted"]
    assert re.fullmatch(stamp + "the next run\n", (tmp_path / "next" / run_folder.RUN_LOG).read_text())


def test_the_resolved_config_reruns_the_same_settings_in_config_pys_order(tmp_path):
    config = load_config(None, ["optim.lr=0.25", "model.arch=vit_tiny"])
    path = run_folder.write_resolved_config(tmp_path, config)
    assert load_config(path, []) == config
    assert list(flatten(yaml.safe_load(path.read_text()))) == list(flatten(config_to_dict(config)))
