"""Mutation testing of one module (`make mutate MODULE=fastdino/guard.py`): mutmut 3 mutates only that file and runs
only its own test files (MODULE_TESTS, or TESTS=... on the make line), then prints every surviving mutant.

mutmut copies the checkout into mutants/ and puts that folder first on sys.path, but the editable install's import
hook (setup.py) answers for `fastdino` before sys.path is searched; it is pointed at the copies here, in this process.
A test that runs fastdino in a child process (train.py, torchrun) imports the original code, so those tests are left
out of the selections below: a mutant only they would kill counts as survived. Not run in CI (minutes to hours).

mutmut forks one child per mutant from a process whose tests already ran torch: a child that meets an OpenMP thread
pool made before the fork hangs in its first parallel op and ends as a timeout, which mutmut counts as caught. One
OpenMP thread (set before torch is first imported) makes no pool to inherit."""
import os
import shutil
import sys
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"

# module -> its own tests (pytest arguments: files, node ids, -k); the real training runs in some of these files are
# left out (-k), since each mutant reruns every selected test that reaches it: minutes per mutant otherwise
MODULE_TESTS = {
    "fastdino/checkpoint.py": ["tests/test_checkpoint.py", "tests/test_contracts_durability.py",
                               "tests/test_contracts_safe_loading.py",
                               "tests/test_write_failures.py::"
                               "test_save_atomic_reports_the_disk_error_that_torch_save_hides"],
    "fastdino/sharded_checkpoint.py": ["tests/test_contracts_durability.py", "tests/test_contracts_safe_loading.py",
                                       "tests/test_contracts_which_file.py"],
    "fastdino/resume_policy.py": ["tests/test_resume_policy.py", "tests/test_contracts_precedence.py",
                                  "-k", "not torchrun and not ctrl_c"],
    "fastdino/rules.py": ["tests/test_contracts_boundaries.py", "tests/test_config.py",
                          "tests/test_config_validation.py",
                          "-k", "not command and not preflight and not trainer and not every_key and not benchmark"],
    "fastdino/config.py": ["tests/test_contracts_boundaries.py", "tests/test_config.py",
                           "tests/test_config_validation.py", "tests/test_contracts_precedence.py",
                           "-k", "not command and not preflight and not trainer and not every_key and not benchmark"],
    "fastdino/guard.py": ["tests/test_guard.py", "tests/test_contracts_guard.py", "-k",
                          "each_mode or needs_the_kl or shorter or read_the_readmes or lines_name or example or "
                          "round_trip or final_knn or replay or contracts"],
    "fastdino/metrics.py": ["tests/test_metrics.py", "tests/test_contracts_precedence.py",
                            "tests/test_contracts_durability.py"],
    "fastdino/run_folder.py": ["tests/test_run_folder.py", "tests/test_contracts_durability.py",
                               "tests/test_contracts_run_folder.py"],
    "fastdino/reference_run.py": ["tests/test_reference_run.py", "tests/test_contracts_safe_loading.py"],
    "fastdino/memory_plan.py": ["tests/test_memory_plan.py",
                                "tests/test_contracts_commands.py::"
                                "test_plan_without_options_plans_one_cuda_process_and_no_memory",
                                "-k", "not within_20_percent and not plan_command"],
    "fastdino/export.py": ["tests/test_export.py", "tests/test_contracts_durability.py",
                           "tests/test_contracts_commands.py::"
                           "test_export_without_options_writes_the_teachers_backbone_in_the_reference_layout"],
    "fastdino/eval/linear.py": ["tests/test_linear.py"],
    "fastdino/data/dali_draws.py": ["tests/test_dali.py", "tests/test_contracts_draws.py"],
    "fastdino/data/gpu_decode_draws.py": ["tests/test_gpu_decode.py", "tests/test_contracts_draws.py"],
}


def point_import_hook_at_mutants() -> None:
    for finder in sys.meta_path:
        module = sys.modules.get(getattr(finder, "__module__", ""))
        if module is not None and module.__name__.startswith("__editable___fastdino_"):
            module.MAPPING.update({name: str(MUTANTS / Path(path).relative_to(ROOT))
                                   for name, path in module.MAPPING.items()})


def main(module: str, tests: list[str]) -> None:
    tests = tests or MODULE_TESTS.get(module)
    if not tests:
        sys.exit(f"no test files known for {module}: pass TESTS='tests/test_a.py tests/test_b.py'")
    shutil.rmtree(MUTANTS, ignore_errors=True)  # results of another module, or of older code
    point_import_hook_at_mutants()
    from mutmut import configuration
    from mutmut.__main__ import cli

    settings = configuration.config()
    settings.only_mutate = [module]
    settings.pytest_add_cli_args_test_selection = tests
    cli(["run", "--max-children", "2"], standalone_mode=False)
    cli(["results"], standalone_mode=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
