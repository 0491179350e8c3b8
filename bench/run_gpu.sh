#!/usr/bin/env bash
# Everything a GPU lease runs, in one call that survives being cut off: stages in order of the value of what they
# return, each under its own time budget. A stage that fails or runs out of time is recorded as such and the next
# one starts; the script never stops early.
#
#   FASTDINO_GIT_COMMIT=<sha> bash bench/run_gpu.sh   # on the device machine, from the repository root
#   bash bench/run_gpu.sh --rehearse                  # on a CPU: every stage at smoke sizes, the same files
#   FASTDINO_GIT_COMMIT=<sha> bash bench/run_gpu.sh [--rehearse] STAGE...   # only these stages
#
# $OUT (default bench/results/run-<UTC date-time>) holds two files, because the device machine returns at most 8:
# stages.json (each stage: status pending|running|ok|failed|timed_out|interrupted, seconds, budget, files) and
# run.tar.gz (stages.json, setup.log, each stage's <stage>.json and <stage>.log). Both are replaced atomically:
# stages.json whenever a stage starts or ends, run.tar.gz then and after every row or test a stage writes (the
# benchmarks run $BENCH_AFTER_WRITE after each write), so a run killed at any moment, by SIGKILL too, has returned
# every row and test it finished.
set -uo pipefail
cd -P "$(dirname "$0")/.."  # the physical path: the scripts compare it with sys.path entries as strings

usage() { echo "usage: bash bench/run_gpu.sh [--rehearse] [STAGE ...]; stages: $1" >&2; exit 2; }
mode=gpu; only=" "
for arg in "$@"; do
  case $arg in
    --rehearse) mode=rehearse ;;
    -*) usage "see STAGES in bench/run_gpu.sh" ;;
    *) only+="$arg " ;;
  esac
done

# Stage, GPU budget (s), rehearsal budget (s), in order of value: the environment and the correctness tests, the
# ViT-S/16 step, the kernels against their byte floors, the larger models, the rest; torch.compile last.
STAGES=(
  "env                          45  20"  # device and memory, driver, versions, Triton, attention paths, ceilings
  "gpu_tests                    75  45"  # pytest -m "gpu and not compile": kernels, attention, packed crops, step
  "step_vit_small_p16           35  20"  # full training step, fastdino vs reference-style, each alone
  "kernels                      25  20"  # fused DINO loss and teacher EMA vs their references and byte floors
  "step_vit_small_p8            45  20"  # then fastdino in micro-batches and recomputing (--memory-rows)
  "step_vit_base_p8             55  20"
  "step_ablation_vit_small_p16  50  15"  # each fast path alone over reference-style (smoke: none)
  "attention                    15  15"
  "model                        20  15"
  "data                         20  20"
  "fsdp                         20  20"
  "compile                      65  60"  # every torch.compile variant: the compile tests, ablation row, loss
)
SETUP_BUDGET=5  # making fastdino.kernels importable, counted in the sum
KILL_AFTER=5    # a stage still running this long after its budget's SIGTERM is killed

stage_command() {  # the command of stage $1 (without --smoke/--out) into the array CMD
  case $1 in
    env) CMD=(bench/bench_env.py) ;;
    gpu_tests) CMD=(bench/gpu_tests.py --marker "gpu and not compile") ;;
    step_ablation_vit_small_p16) CMD=(bench/bench_step.py --models vit_small_p16 --steps 10 --warmup 3) ;;
    step_vit_small_p16) CMD=(bench/bench_step.py --models vit_small_p16 --no-ablation) ;;
    step_*) CMD=(bench/bench_step.py --models "${1#step_}" --no-ablation --steps 10 --warmup 3 --memory-rows) ;;
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
  if [ -z "${FASTDINO_GIT_COMMIT:-}" ]; then  # every result file names the commit; the copy here has no .git
    echo "run_gpu.sh: set FASTDINO_GIT_COMMIT to the commit of this tree (the device machine's copy has no .git):" \
      "run 'git rev-parse HEAD' in your checkout, then FASTDINO_GIT_COMMIT=<that sha> bash bench/run_gpu.sh" >&2
    exit 2
  fi
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # large steps after out-of-memory retries: less waste
  [ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"  # DALI if brought (README)
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
out=$(cd -P "$out" && pwd)
scratch=$(mktemp -d)  # run/: the stage files, packed into $out; pack: the packing; link/: the import mapping
run=$scratch/run; mkdir "$run"
trap 'rm -rf "$scratch"' EXIT
{  # $run packed into $out/run.tar.gz; tar's exit code 1 is a log that grew while it was read
  echo '#!/usr/bin/env bash'
  printf 'run=%q out=%q\n' "$run" "$out"
  echo 'tar -czf "$out/.run.tar.gz.$$" -C "$run" . 2>/dev/null; [ $? -le 1 ] && mv -f "$out/.run.tar.gz.$$" "$out/run.tar.gz"'
  echo 'rm -f "$out/.run.tar.gz.$$"'
} >"$scratch/pack"
chmod +x "$scratch/pack"
export BENCH_AFTER_WRITE=$scratch/pack
total=$SETUP_BUDGET
for budget in "${budgets[@]}"; do total=$((total + budget)); done
started=$(date -u +%Y-%m-%dT%H:%M:%SZ); t0=$SECONDS

write_stages() {  # stages.json into the run folder and into $out, then the run folder packed into $out
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
  } >"$run/.stages.json.tmp" && mv "$run/.stages.json.tmp" "$run/stages.json"
  cp "$run/stages.json" "$out/.stages.json.tmp" && mv "$out/.stages.json.tmp" "$out/stages.json"
  "$scratch/pack"
}

current=-1
on_signal() {  # cut off from outside: say which stage was running, keep what is done
  [ "$current" -ge 0 ] && { status[$current]=interrupted; seconds[$current]=$((SECONDS - stage_t0)); }
  write_stages
  exit 130
}
trap on_signal TERM INT HUP

echo "run_gpu.sh ($mode): ${#names[@]} stages, budgets sum to $total s (setup $SETUP_BUDGET s included), into $out"
write_stages

# Setup: bench scripts and tests import fastdino.kernels, which setup.py maps onto kernels/.
{
  check='import importlib.util as u, sys; sys.exit(u.find_spec("fastdino.kernels") is None)'
  if timeout "$SETUP_BUDGET" python3 -c "$check"; then
    echo "fastdino.kernels imports as installed"
  else
    link=$scratch/link  # fastdino/ with kernels/ linked in, first on the path: setup.py's mapping, without pip
    mkdir -p "$link/fastdino" && ln -s "$PWD"/fastdino/* "$link/fastdino/" && ln -s "$PWD/kernels" "$link/fastdino/kernels"
    export PYTHONPATH="$link:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "fastdino.kernels mapped through $link"
  fi
} >"$run/setup.log" 2>&1
cat "$run/setup.log"

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
