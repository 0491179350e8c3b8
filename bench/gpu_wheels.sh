#!/usr/bin/env bash
# DALI for the GPU machine, which has no network: the wheels of bench/gpu_wheels.txt (exact pins, for its Python
# 3.12 and CUDA 13.0) split into parts that fit a device call's carry, and their installation there into .gpu/site,
# which bench/run_gpu.sh puts first on PYTHONPATH in GPU mode. bench/README.md has the procedure.
#
#   bash bench/gpu_wheels.sh            # here: download, split into .gpu/carry/part-NN, print the device calls
#   bash bench/gpu_wheels.sh --install  # on the device machine, once every part is there: unpack, install, check
set -euo pipefail
cd -P "$(dirname "$0")/.."
PINS=bench/gpu_wheels.txt
PART_SIZE=56m  # a device call carries at most 64 MiB
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
LAST_CALL='bash bench/gpu_wheels.sh --install && FASTDINO_GIT_COMMIT=<sha> bash bench/run_gpu.sh data'

case ${1:-} in
  "")
    rm -rf .gpu/wheels .gpu/carry && mkdir -p .gpu/wheels .gpu/carry
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]/#/--platform=}" --dest .gpu/wheels --requirement "$PINS"
    pins=$(grep -c '^[^#].*==' "$PINS"); wheels=$(ls .gpu/wheels | wc -l)
    [ "$pins" = "$wheels" ] || { echo "gpu_wheels.sh: $wheels wheels for $pins pins" >&2; exit 1; }
    tar -C .gpu -cf - wheels | split --bytes=$PART_SIZE --numeric-suffixes - .gpu/carry/part-
    rm -rf .gpu/wheels
    parts=(.gpu/carry/part-*)
    echo "$wheels wheels in ${#parts[@]} parts under .gpu/carry. Device calls, back to back while the machine is warm:"
    for part in "${parts[@]:0:${#parts[@]}-1}"; do echo "  carry [\"$part\"]  command: true"; done
    echo "  carry [\"${parts[-1]}\"]  command: $LAST_CALL"
    ;;
  --install)
    rm -rf .gpu/wheels .gpu/site
    cat .gpu/carry/part-* | tar -C .gpu -xf -
    python3 -m pip install --quiet --no-index --no-deps --no-compile --target .gpu/site .gpu/wheels/*.whl
    rm -rf .gpu/wheels
    # Three of the wheels bring nvidia/__init__.py, which would make .gpu/site/nvidia shadow the image's nvidia/
    # namespace (torch's CUDA libraries); extended, the package spans both.
    if [ -d .gpu/site/nvidia ]; then
      echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" >.gpu/site/nvidia/__init__.py
    fi
    python3 - "$PINS" <<'CHECK'
"""Every pin installed in .gpu/site at its version: a missing part shows here, not as a DALI row that says skipped."""
import importlib.metadata
import re
import sys

installed = {re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(): dist.version
             for dist in importlib.metadata.distributions(path=[".gpu/site"])}
pins = dict(line.strip().split("==") for line in open(sys.argv[1]) if "==" in line and not line.startswith("#"))
wrong = {name: (version, installed.get(name)) for name, version in pins.items() if installed.get(name) != version}
if wrong:
    sys.exit(f"gpu_wheels.sh: not installed as pinned (pinned, installed): {wrong}")
print(f"{len(pins)} pinned wheels installed in .gpu/site")
CHECK
    ;;
  *) echo "usage: bash bench/gpu_wheels.sh [--install]" >&2; exit 2 ;;
esac
