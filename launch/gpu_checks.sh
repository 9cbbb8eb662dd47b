#!/usr/bin/env bash
# Issue #8's accelerator checks in one run on one GPU (sized for an H200, where it should take
# under 10 minutes and the fit search about as long again; not yet timed on one), so that a
# session lent a device spends its minutes measuring:
#   sft, reward, ppo  the steps and their MFU at a ~1.1B Llama-shaped bfloat16 model
#                     (22 layers, d_model 2048, 32 heads, d_ff 5632, vocab 32000);
#   sampling          cached decoding at that model, against the memory-read roofline the
#                     benchmark measures in the same run (the target is >= 60 % of it);
#   --fit             the deepest model of that width each stage fits in device memory with the
#                     default sharding and remat (layers tried in order; the first failure stops).
# Each check writes <out>/<check>.json and <out>/<check>.log; a failing check is reported and the
# others still run. Exit status: the number of failed checks (the fit search's failures are its
# answer, not counted).
#
# Usage: launch/gpu_checks.sh [--out DIR] [--only sft,reward,ppo,sampling] [--fit]
#                             [--python PY] [-- EXTRA BENCHMARK FLAGS]
# Environment: SHAPE (model flags), SEQ, BATCH, PPO_FLAGS, SAMPLING_FLAGS, FIT_LAYERS override
# the sizes; a tiny SHAPE runs the whole script on a CPU (tests/test_launch.py does).
#
# On an offline GPU machine that has jax (with CUDA), flax and optax but not ml_collections:
# fetch its wheel where there is a network (`python3 -m pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl ml_collections==1.1.0`), copy .whl over, and run
# `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
# PYTHONPATH=/tmp/site launch/gpu_checks.sh --out /tmp/gc`; `tar czf gc.tgz -C /tmp gc` then
# brings every result back as one file.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

out="gpu_checks"
only="sft,reward,ppo,sampling"
fit=0
python="${PYTHON:-python3}"
extra=()
while (($#)); do
  if [[ "$1" == --out || "$1" == --only || "$1" == --python ]] && (($# < 2)); then
    echo "gpu_checks.sh: $1 needs a value (see --help)" >&2; exit 2
  fi
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --fit) fit=1; shift ;;
    --python) python="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_checks.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done

read -r -a shape <<< "${SHAPE:---flavour llama --layers 22 --d_model 2048 --heads 32 --d_ff 5632 --vocab 32000 --dtype bfloat16}"
read -r -a ppo_flags <<< "${PPO_FLAGS:---ppo_rollouts 64 --ppo_prompt_len 128 --ppo_new_tokens 128}"
read -r -a sampling_flags <<< "${SAMPLING_FLAGS:---prompt_len 128 --new_tokens 256 --skip_uncached}"
read -r -a fit_layers <<< "${FIT_LAYERS:-44 66 88 132 176}"
seq_len="${SEQ:-2048}"
batch="${BATCH:-8}"

IFS=',' read -r -a stages <<< "$only"
for stage in "${stages[@]}"; do
  case "$stage" in sft|reward|ppo|sampling) ;; *)
    echo "gpu_checks.sh: unknown stage '$stage' (sft, reward, ppo, sampling)" >&2; exit 2 ;;
  esac
done

out="$(mkdir -p "$out" && cd "$out" && pwd)"
cd "$REPO_ROOT"
"$python" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())' 2>&1 | tee "$out/versions.log"

# benchmark NAME STAGE FLAGS...: one benchmark process, its table on stdout and in NAME.log.
benchmark() {
  local name="$1" stage="$2"
  shift 2
  echo "== $name: python -m experiments.benchmark $stage $*"
  "$python" -m experiments.benchmark "$stage" "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1
  local status=$?
  grep -v '^[WI][0-9]\{4\} ' "$out/$name.log" | tail -n 20
  return "$status"
}

set_stage_flags() {  # flags=(what a stage runs with besides the model shape)
  case "$1" in
    sft|reward) flags=(--seq "$seq_len" --batch "$batch") ;;
    ppo) flags=("${ppo_flags[@]}") ;;
    sampling) flags=(--batch 16 "${sampling_flags[@]}") ;;
  esac
  flags+=(--compile_depths "")  # compile-time scaling is measured on CPU; skip it here
}

flags=()
failed=0
for stage in "${stages[@]}"; do
  set_stage_flags "$stage"
  if ! benchmark "$stage" "$stage" "${shape[@]}" "${flags[@]}" "${extra[@]}"; then
    echo "!! $stage failed: see $out/$stage.log"
    failed=$((failed + 1))
  fi
done

if ((fit)); then
  : > "$out/fit.txt"
  for stage in "${stages[@]}"; do
    [[ "$stage" == sampling ]] && continue
    set_stage_flags "$stage"
    deepest="none"
    for layers in "${fit_layers[@]}"; do
      if benchmark "fit_${stage}_${layers}" "$stage" "${shape[@]}" --layers "$layers" \
          "${flags[@]}" --runs 1 --no_probe "${extra[@]}" > /dev/null; then
        deepest="$layers"
      else
        break
      fi
    done
    echo "$stage: deepest that ran ${deepest} layers (tried ${fit_layers[*]})" | tee -a "$out/fit.txt"
  done
fi

echo "== $failed failed; results in $out"
exit "$failed"
