"""One way to bring DALI to the GPU machine: bench/gpu_wheels.txt pins every wheel of the bundle exactly, at its
CUDA 13.0 builds, and nothing the image has; bench/gpu_wheels.sh --install turns the carried parts into .gpu/site
there (checking the pins, keeping the image's nvidia packages importable); bench/README.md describes that procedure
and no xformers one."""
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

BENCH = Path(__file__).resolve().parents[1] / "bench"
PINS = BENCH / "gpu_wheels.txt"
# The device image's interpreter, for the requirement markers
IMAGE = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux",
         "sys_platform": "linux", "platform_machine": "x86_64", "implementation_name": "cpython",
         "platform_python_implementation": "CPython", "os_name": "posix"}


def pinned(text: str) -> dict[str, str]:
    """name -> version of each requirement line; every one must be an exact pin."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for line in lines:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*==[0-9][0-9a-z.]*", line), f"not an exact pin: {line}"
    return dict(line.split("==") for line in lines)


def test_every_wheel_of_the_dali_bundle_is_pinned_exactly_at_its_cuda_13_0_build():
    text = PINS.read_text()
    pins = pinned(text)
    image_has = set(re.search(r"^# image has: (.+)$", text, flags=re.M).group(1).split())
    assert pins["nvidia-dali-cuda130"] == "2.4.0"
    assert pins["nvidia-nvjpeg"].startswith("13.0."), "CUDA 13.0's nvjpeg (torch 2.11's cuda-toolkit pins it)"
    assert not any("xformers" in name for name in pins)
    assert not image_has & set(pins), "a carried copy of what the image has would shadow the image's"
    try:
        importlib.metadata.distribution("nvidia-dali-cuda130")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("DALI is not installed here (make install-all): its requirements cannot be read")
    # the closure of DALI's requirements, read from the installed metadata: each pinned (or the image's) and met
    todo, seen = [("nvidia-dali-cuda130", ("",))], set()
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # pinned, but not installed here: its own requirements are not known
        for requirement in map(Requirement, requirements):
            if requirement.marker and not any(requirement.marker.evaluate(dict(IMAGE, extra=extra))
                                              for extra in extras):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency in image_has:
                continue
            assert dependency in pins, f"{name} needs {requirement}: not in {PINS.name}"
            assert requirement.specifier.contains(pins[dependency], prereleases=True), \
                f"{name} needs {requirement}, pinned {pins[dependency]}"
            todo.append((dependency, ("", *requirement.extras)))
    assert seen == set(pins), f"pinned but needed by nothing: {set(pins) - seen}"


def wheel(folder: Path, files: dict[str, str]) -> None:
    """A minimal wheel of the stand-in package, with `files` (path -> text) besides its metadata."""
    info = "standin_pkg-1.2.3.dist-info"
    files = {**files, f"{info}/METADATA": "Metadata-Version: 2.1\nName: standin-pkg\nVersion: 1.2.3\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "standin_pkg-1.2.3-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)


def test_install_turns_the_carried_parts_into_gpu_site_and_checks_the_pins(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "bench").mkdir(parents=True)
    shutil.copy(BENCH / "gpu_wheels.sh", checkout / "bench")
    (checkout / "bench" / "gpu_wheels.txt").write_text("# a stand-in\nstandin-pkg==1.2.3\n")
    # like the wheels the nvidia packages bring: an nvidia/__init__.py of their own
    wheel(tmp_path / "pack" / "wheels", {"standin_pkg/__init__.py": "", "nvidia/__init__.py": "",
                                         "nvidia/standin/__init__.py": ""})
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as tar:
        tar.add(tmp_path / "pack" / "wheels", arcname="wheels")
    carry = checkout / ".gpu" / "carry"
    carry.mkdir(parents=True)
    half = len(packed.getvalue()) // 2  # two parts, as the split leaves them
    (carry / "part-00").write_bytes(packed.getvalue()[:half])
    (carry / "part-01").write_bytes(packed.getvalue()[half:])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def install() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(checkout / "bench" / "gpu_wheels.sh"), "--install"], env=env,
                              capture_output=True, text=True, timeout=120)

    result = install()
    assert result.returncode == 0, result.stderr
    assert "1 pinned wheels installed in .gpu/site" in result.stdout
    site = checkout / ".gpu" / "site"
    assert (site / "standin_pkg" / "__init__.py").is_file() and not (checkout / ".gpu" / "wheels").exists()
    # the image's nvidia namespace (here a folder of its own) stays importable beside the carried one
    (tmp_path / "image" / "nvidia" / "cu13").mkdir(parents=True)
    (tmp_path / "image" / "nvidia" / "cu13" / "__init__.py").write_text("")
    both = subprocess.run([sys.executable, "-c", "import nvidia.cu13, nvidia.standin"], capture_output=True,
                          text=True, env=dict(env, PYTHONPATH=f"{site}{os.pathsep}{tmp_path / 'image'}"))
    assert both.returncode == 0, both.stderr
    (checkout / "bench" / "gpu_wheels.txt").write_text("standin-pkg==1.2.4\n")
    mismatch = install()
    assert mismatch.returncode != 0 and "not installed as pinned" in mismatch.stderr


def test_bench_readme_describes_the_one_procedure_the_script_prints():
    readme, script = (BENCH / "README.md").read_text(), (BENCH / "gpu_wheels.sh").read_text()
    device_call = "bash bench/gpu_wheels.sh --install && FASTDINO_GIT_COMMIT=<sha> bash bench/run_gpu.sh data"
    assert device_call in " ".join(readme.split())
    assert f"LAST_CALL='{device_call}'" in script
    assert "bench/gpu_wheels.txt" in readme and "bash bench/gpu_wheels.sh" in readme
    assert not re.search(r"--target \S*\.gpu/site\S* xformers", readme), "no second way to bring a wheel"
