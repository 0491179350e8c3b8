#!/usr/bin/env bash
# Everything a GPU lease runs, in one call that survives being cut off: stages in priority order, each under its own
# time budget, each recorded the moment it ends. A stage that fails or runs out of time is recorded as such and the
# next one starts; the script never stops early.
#
#   bash bench/run_gpu.sh              # on the device machine, from the repository root (bench/README.md)
#   bash bench/run_gpu.sh --rehearse   # on a CPU: every stage at smoke sizes, the same files, "smoke": true
#   bash bench/run_gpu.sh [--rehearse] STAGE...   # only these stages (e.g. one that timed out before)
#
# $OUT (default bench/results/run-<UTC date-time>) receives, after every stage, stages.json (each stage: status
# pending|running|ok|failed|timed_out|interrupted, seconds, budget, files) and run.tar.gz (stages.json plus each
# stage's <stage>.json and <stage>.log). Two files, because the device machine returns at most 8.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash bench/run_gpu.sh [--rehearse] [STAGE ...]; stages: $1" >&2; exit 2; }
mode=gpu; only=" "
for arg in "$@"; do
  case $arg in
    --rehearse) mode=rehearse ;;
    -*) usage "see STAGES in bench/run_gpu.sh" ;;
    *) only+="$arg " ;;
  esac
done

# Stage, GPU budget (s), rehearsal budget (s), in priority order: what matters most runs first.
STAGES=(
  "env                          30  20"  # device, driver, versions, Triton launcher, copy and matmul ceilings
  "gpu_tests                   105  55"  # pytest -m gpu: kernels fp32/bf16, attention, packed crops, fast step
  "step_vit_small_p16           45  25"  # full training step, fastdino vs reference-style
  "step_vit_small_p8            45  25"
  "step_vit_base_p8             50  25"
  "kernels                      50  15"  # fused DINO loss and teacher EMA vs their references
  "step_ablation_vit_small_p16  60  25"  # each fast path alone over reference-style (smoke: none)
  "attention                    15  15"
  "model                        25  20"
  "data                         25  35"
  "fsdp                         25  35"
)
SETUP_BUDGET=5  # making fastdino.kernels importable, counted in the sum
KILL_AFTER=5    # a stage still running this long after its budget's SIGTERM is killed

stage_command() {  # the command of stage $1 (without --smoke/--out) into the array CMD
  case $1 in
    env) CMD=(bench/bench_env.py) ;;
    gpu_tests) CMD=(bench/gpu_tests.py) ;;
    step_ablation_vit_small_p16) CMD=(bench/bench_step.py --models vit_small_p16 --steps 10 --warmup 3) ;;
    step_vit_base_p8) CMD=(bench/bench_step.py --models vit_base_p8 --no-ablation --steps 10 --warmup 3) ;;
    step_*) CMD=(bench/bench_step.py --models "${1#step_}" --no-ablation) ;;
    data) CMD=(bench/bench_data.py --num-images 512 --steps 6 --warmup 1) ;;  # one epoch of 7 batches
    fsdp) CMD=(bench/bench_fsdp.py --models vit_small_p16) ;;
    *) CMD=("bench/bench_$1.py") ;;
  esac
}

if [ "$mode" = rehearse ]; then
  column=2; smoke=(--smoke); smoke_json=true
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the CPU, also on a machine with a GPU
  export OMP_NUM_THREADS=1  # tiny tensors: a second thread only spins (twice the time on 2 busy cores)
else
  column=1; smoke=(); smoke_json=false
  [ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"  # xformers, DALI if brought
fi
export PYTHONUNBUFFERED=1

names=(); budgets=(); status=(); seconds=(); codes=(); notes=(); all=" "
for line in "${STAGES[@]}"; do
  read -r name gpu_budget rehearse_budget _ <<<"$line"
  all+="$name "
  [ "$only" = " " ] || [[ "$only" == *" $name "* ]] || continue
  names+=("$name"); budgets+=("$([ $column = 1 ] && echo "$gpu_budget" || echo "$rehearse_budget")")
  status+=(pending); seconds+=(null); codes+=(null); notes+=("")
done
for name in $only; do [[ "$all" == *" $name "* ]] || usage "$all"; done
out=${OUT:-bench/results/run-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
run=$(mktemp -d); link=""  # the stage files, packed into $out after every stage; the import mapping (setup)
trap 'rm -rf "$run" $link' EXIT
total=$SETUP_BUDGET
for budget in "${budgets[@]}"; do total=$((total + budget)); done
started=$(date -u +%Y-%m-%dT%H:%M:%SZ); t0=$SECONDS

write_stages() {  # stages.json into the run folder, then the run folder packed into $out
  local i files
  {
    printf '{\n  "mode": "%s",\n  "smoke": %s,\n  "started": "%s",\n  "wall_s": %d,\n' \
      "$mode" "$smoke_json" "$started" $((SECONDS - t0))
    printf '  "budget_total_s": %d,\n  "setup_budget_s": %d,\n  "stages": [\n' "$total" "$SETUP_BUDGET"
    for i in "${!names[@]}"; do
      files=$(cd "$run" && ls -1 "${names[$i]}".* 2>/dev/null | sed 's/.*/"&"/' | paste -sd, - | sed 's/,/, /g')
      printf '    {"name": "%s", "status": "%s", "budget_s": %s, "seconds": %s, "exit_code": %s, "files": [%s]%s}%s\n' \
        "${names[$i]}" "${status[$i]}" "${budgets[$i]}" "${seconds[$i]}" "${codes[$i]}" "$files" \
        "${notes[$i]:+, \"note\": \"${notes[$i]}\"}" "$([ "$i" -lt $((${#names[@]} - 1)) ] && echo ,)"
    done
    printf '  ]\n}\n'
  } >"$run/stages.json.tmp" && mv "$run/stages.json.tmp" "$run/stages.json"
  cp "$run/stages.json" "$out/stages.json.tmp" && mv "$out/stages.json.tmp" "$out/stages.json"
  tar -czf "$out/run.tar.gz.tmp" -C "$run" . && mv "$out/run.tar.gz.tmp" "$out/run.tar.gz"
}

current=-1
on_signal() {  # cut off from outside: say which stage was running, keep what is done
  [ "$current" -ge 0 ] && { status[$current]=interrupted; seconds[$current]=$((SECONDS - stage_t0)); }
  write_stages
  exit 130
}
trap on_signal TERM INT HUP

echo "run_gpu.sh ($mode): ${#names[@]} stages, budgets sum to $total s (setup $SETUP_BUDGET s included), into $out"

# Setup: bench scripts and tests import fastdino.kernels, which setup.py maps onto kernels/.
{
  check='import importlib.util as u, sys; sys.exit(u.find_spec("fastdino.kernels") is None)'
  if timeout "$SETUP_BUDGET" python3 -c "$check"; then
    echo "fastdino.kernels imports as installed"
  else
    link=$(mktemp -d)  # fastdino/ with kernels/ linked in, first on the path: setup.py's mapping, without pip
    mkdir "$link/fastdino" && ln -s "$PWD"/fastdino/* "$link/fastdino/" && ln -s "$PWD/kernels" "$link/fastdino/kernels"
    export PYTHONPATH="$link:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "fastdino.kernels mapped through $link"
  fi
} >"$run/setup.log" 2>&1
cat "$run/setup.log"
write_stages

for i in "${!names[@]}"; do
  name=${names[$i]}; budget=${budgets[$i]}
  stage_command "$name"
  current=$i; status[$i]=running; write_stages
  stage_t0=$SECONDS
  timeout --kill-after=$KILL_AFTER "$budget" python3 "${CMD[@]}" "${smoke[@]}" --out "$run/$name.json" \
    >"$run/$name.log" 2>&1
  code=$?
  seconds[$i]=$((SECONDS - stage_t0)); codes[$i]=$code
  if [ $code = 124 ] || { [ $code = 137 ] && [ "${seconds[$i]}" -ge "$budget" ]; }; then  # 137 alone: killed
    status[$i]=timed_out; echo "[run_gpu.sh] stopped at its budget of $budget s" >>"$run/$name.log"
  elif [ $code != 0 ]; then
    status[$i]=failed
  elif python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$run/$name.json" 2>/dev/null; then
    status[$i]=ok
  else
    status[$i]=failed; notes[$i]="exit code 0 but no readable $name.json"
  fi
  current=-1; write_stages
  echo "== $name: ${status[$i]} in ${seconds[$i]} s (budget $budget s, exit code $code)"
  tail -n 6 "$run/$name.log" | sed 's/^/   /'
done

echo "done in $((SECONDS - t0)) s (budgets: $total s):"
for i in "${!names[@]}"; do
  printf '  %-28s %-10s %4s s of %3s s\n' "${names[$i]}" "${status[$i]}" "${seconds[$i]}" "${budgets[$i]}"
done
for state in "${status[@]}"; do [ "$state" = ok ] || exit 1; done  # every stage ran; say whether all passed
