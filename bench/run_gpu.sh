#!/usr/bin/env bash
# Everything a GPU lease should run, in one call (see ../shared/GPU.md): the GPU-only tests, then every benchmark.
# Usage on the device machine, from the repository root, after bringing xformers/DALI into .gpu/site:
#   export PYTHONPATH=$PWD/.gpu/site:$PWD; bash bench/run_gpu.sh
# Results land in bench/results/ (and are copied to $OUT when that is set), to be committed.
set -uo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true  # fastdino.kernels mapping
out=${OUT:-bench/results}
mkdir -p "$out"
python -m pytest -q tests -k "gpu or cuda" 2>&1 | tee "$out/gpu-tests.log"
for script in bench_kernels bench_attention bench_model bench_data bench_fsdp; do
  python "bench/$script.py" 2>&1 | tee "$out/$script.log"
done
python bench/bench_step.py --models vit_small_p16,vit_small_p8 2>&1 | tee "$out/bench_step.log"
python bench/bench_step.py --models vit_base_p16,vit_base_p8 --no-ablation --loader 2>&1 | tee -a "$out/bench_step.log"
[ "$out" != bench/results ] && cp bench/results/*.json "$out"/ 2>/dev/null
exit 0
