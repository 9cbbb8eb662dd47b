#!/usr/bin/env bash
# The accelerator checks of one GPU in one prepared run, so that a session lent a device (minutes
# at a time) spends them measuring. Checks, in the order they run:
#   sft, reward  the steps and their MFU at a ~1.1B Llama-shaped bfloat16 model
#                (22 layers, d_model 2048, 32 heads, d_ff 5632, vocab 32000), seq 2048, batch 8,
#                with jax's default attention (XLA) and again with each implementation in
#                ATTENTION (cudnn: <check>_cudnn.json; ATTENTION="" skips);
#   sampling     cached decoding at that model at each batch of SAMPLING_BATCHES (16 and 1),
#                against the memory-read roofline the benchmark measures in the same run;
#   ppo          one PPO-ptx iteration at that model, split into rollout / score / update, and
#                how far the sampler's log-probs are from the score phase's (the importance
#                ratio pi_old / pi_sampler that `ppo.is_weight_cap` corrects);
#   pipeline     (opt-in) the default pipeline (PIPELINE_CONFIG) in <out>/pipeline: wall time
#                per stage (<stage>/done.json) and report.md;
#   gap          (opt-in, after pipeline) the pipeline's PPO stage again in bfloat16, from its
#                SFT and reward models, for GAP_ITERATIONS iterations: the sampler gap on real
#                rollouts of a trained policy, every iteration (<out>/gap/ppo/metrics.jsonl);
#   --fit        the deepest model of that width each training stage fits, layers tried in order.
# With --profile, each benchmark also traces one round of its steps (jax.profiler) and
# <out>/profile_<check>.txt says where the device time went (experiments.profile_summary).
# With --budget SECONDS, every check runs under what is left of that budget, and a check that
# would start with under 20 s left is skipped: the script ends in time and keeps what it has.
# Each check writes <out>/<check>.json and <out>/<check>.log. Exit status: the number of failed
# or skipped checks (the fit search's failures are its answer, not counted).
#
# Usage: launch/gpu_checks.sh [--out DIR] [--only sft,reward,sampling,ppo,pipeline,gap]
#                             [--budget SECONDS] [--profile] [--fit] [--python PY]
#                             [-- EXTRA BENCHMARK FLAGS]
# Environment: SHAPE (model flags), SEQ, BATCH, PPO_FLAGS, SAMPLING_FLAGS, SAMPLING_BATCHES,
# ATTENTION, FIT_LAYERS, PIPELINE_CONFIG, PIPELINE_FLAGS, GAP_ITERATIONS override the sizes; a tiny SHAPE and
# the smoke pipeline run the whole script on a CPU (tests/test_launch.py does).
#
# On an offline GPU machine with jax 0.11 and its CUDA plugin but not the rest of the stack:
# launch/gpu_wheels.sh DIR (where there is a network) fetches launch/gpu_requirements.txt as
# wheels; copy DIR over, then `python3 -m pip install -q --no-index --no-deps --target /tmp/site
# DIR/*.whl && PYTHONPATH=/tmp/site launch/gpu_checks.sh --out /tmp/gc`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly CHECKS="sft reward sampling ppo pipeline gap"

out="gpu_checks"
only="sft,reward,sampling,ppo"
fit=0
profile=0
budget=0
python="${PYTHON:-python3}"
extra=()
while (($#)); do
  if [[ "$1" == --out || "$1" == --only || "$1" == --python || "$1" == --budget ]] \
      && (($# < 2)); then
    echo "gpu_checks.sh: $1 needs a value (see --help)" >&2; exit 2
  fi
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --fit) fit=1; shift ;;
    --profile) profile=1; shift ;;
    --python) python="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_checks.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ "$budget" =~ ^[0-9]+$ ]]; then
  echo "gpu_checks.sh: --budget takes whole seconds, got '$budget'" >&2; exit 2
fi

read -r -a shape <<< "${SHAPE:---flavour llama --layers 22 --d_model 2048 --heads 32 --d_ff 5632 --vocab 32000 --dtype bfloat16}"
read -r -a ppo_flags <<< "${PPO_FLAGS:---ppo_rollouts 64 --ppo_prompt_len 128 --ppo_new_tokens 128}"
read -r -a sampling_flags <<< "${SAMPLING_FLAGS:---prompt_len 128 --new_tokens 256 --skip_uncached}"
read -r -a sampling_batches <<< "${SAMPLING_BATCHES:-16 1}"
read -r -a attention <<< "${ATTENTION-cudnn}"
read -r -a fit_layers <<< "${FIT_LAYERS:-44 66 88 132 176}"
read -r -a pipeline_flags <<< "${PIPELINE_FLAGS:-}"
pipeline_config="${PIPELINE_CONFIG:-experiments/configs/instructgpt.py}"
gap_iterations="${GAP_ITERATIONS:-10}"
seq_len="${SEQ:-2048}"
batch="${BATCH:-8}"

IFS=',' read -r -a stages <<< "$only"
for stage in "${stages[@]}"; do
  if [[ " $CHECKS " != *" $stage "* ]]; then
    echo "gpu_checks.sh: unknown check '$stage' (${CHECKS// /, })" >&2; exit 2
  fi
done

out="$(mkdir -p "$out" && cd "$out" && pwd)"
cd "$REPO_ROOT"
deadline=$(( budget > 0 ? SECONDS + budget : 0 ))
"$python" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())' 2>&1 | tee "$out/versions.log"
if command -v nvidia-smi > /dev/null; then nvidia-smi >> "$out/versions.log" 2>&1 || true; fi

# limited NAME COMMAND...: runs COMMAND under what is left of the budget, output in NAME.log;
# status 124 when the budget ran out during it, 125 when too little was left to start it.
limited() {
  local name="$1"
  shift
  local left=0
  if ((deadline)); then
    left=$(( deadline - SECONDS ))
    if ((left < 20)); then
      echo "!! $name skipped: ${left}s of the budget left" | tee "$out/$name.log"
      return 125
    fi
  fi
  local status=0
  if ((left)); then
    timeout --kill-after=10 "$left" "$@" > "$out/$name.log" 2>&1 || status=$?
  else
    "$@" > "$out/$name.log" 2>&1 || status=$?
  fi
  ((status != 124)) || echo "!! $name stopped: the budget ran out" | tee -a "$out/$name.log"
  return "$status"
}

# benchmark NAME STAGE FLAGS...: one benchmark process; its table on stdout and in NAME.log.
benchmark() {
  local name="$1" stage="$2"
  shift 2
  local profiling=()
  ((profile)) && profiling=(--profile "$out/trace_$name")
  echo "== $name: python -m experiments.benchmark $stage $*"
  local status=0
  limited "$name" "$python" -m experiments.benchmark "$stage" "$@" "${profiling[@]}" \
    --json "$out/$name.json" || status=$?
  grep -v '^[WI][0-9]\{4\} ' "$out/$name.log" | tail -n 20
  if ((profile && status == 0)); then
    "$python" -m experiments.profile_summary "$out/trace_$name" --json "$out/profile_$name.json" \
      > "$out/profile_$name.txt" 2>&1 && head -n 12 "$out/profile_$name.txt" \
      || echo "!! $name: no profile summary (see $out/profile_$name.txt)"
  fi
  return "$status"
}

set_stage_flags() {  # flags=(what a stage runs with besides the model shape)
  case "$1" in
    sft|reward) flags=(--seq "$seq_len" --batch "$batch") ;;
    ppo) flags=("${ppo_flags[@]}") ;;
  esac
  flags+=(--compile_depths "")  # compile-time scaling is measured on CPU; skip it here
}

# The default pipeline, each stage's wall time from its done.json.
run_pipeline() {
  echo "== pipeline: python -m experiments.run --config $pipeline_config ${pipeline_flags[*]}"
  local status=0
  limited pipeline "$python" -m experiments.run --config "$pipeline_config" \
    --workdir "$out/pipeline" "${pipeline_flags[@]}" || status=$?
  grep '^\[pipeline\]' "$out/pipeline.log" || true
  "$python" - "$out/pipeline" <<'EOF' || true
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "done.json")), key=os.path.getmtime):
  print(f"   {os.path.basename(os.path.dirname(path)):<10} {json.load(open(path))['seconds']:>7} s")
EOF
  return "$status"
}

# The pipeline's PPO stage again, in bfloat16, from its SFT and reward models (linked into a
# workdir of its own): the sampler gap on a trained policy's rollouts, logged every iteration.
run_gap() {
  local workdir="$out/pipeline"
  if [[ ! -f "$workdir/sft/done.json" || ! -f "$workdir/reward/done.json" ]]; then
    echo "!! gap skipped: no finished SFT and reward model under $workdir" | tee "$out/gap.log"
    return 125
  fi
  mkdir -p "$out/gap"
  for stage in pretrain sft reward; do
    if [[ -e "$workdir/$stage" ]]; then ln -sfn "$workdir/$stage" "$out/gap/$stage"; fi
  done
  echo "== gap: the pipeline's PPO in bfloat16 for $gap_iterations iterations"
  local status=0 n="$gap_iterations"
  limited gap "$python" -m experiments.run --config "$pipeline_config" --workdir "$out/gap" \
    "${pipeline_flags[@]}" --config.stages=ppo --config.ppo.model.dtype=bfloat16 \
    --config.ppo.iterations="$n" --config.ppo.log_every=1 --config.ppo.eval_every="$n" \
    --config.ppo.save_every="$n" || status=$?
  "$python" - "$out/gap/ppo/metrics.jsonl" <<'EOF' || true
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if "sampler_logp_gap" in line]
for r in rows:
  print(f"   iteration {r['step']:>3}: |logp gap| mean {r['sampler_logp_gap']:.2e} max "
        f"{r['sampler_logp_gap_max']:.2e}, ratio [{r['sampler_ratio_min']:.4f}, "
        f"{r['sampler_ratio_max']:.4f}]")
EOF
  return "$status"
}

flags=()
failed=0
for stage in "${stages[@]}"; do
  status=0
  case "$stage" in
    sampling)
      for b in "${sampling_batches[@]}"; do
        benchmark "sampling_b$b" sampling "${shape[@]}" --batch "$b" "${sampling_flags[@]}" \
          --compile_depths "" "${extra[@]}" || { echo "!! sampling_b$b failed: see" \
          "$out/sampling_b$b.log"; failed=$((failed + 1)); }
      done
      continue ;;
    pipeline) run_pipeline || status=$? ;;
    gap) run_gap || status=$? ;;
    *)
      set_stage_flags "$stage"
      benchmark "$stage" "$stage" "${shape[@]}" "${flags[@]}" "${extra[@]}" || status=$?
      if [[ "$stage" == sft || "$stage" == reward ]]; then
        for impl in "${attention[@]}"; do
          benchmark "${stage}_$impl" "$stage" "${shape[@]}" "${flags[@]}" --attention_impl \
            "$impl" "${extra[@]}" || { echo "!! ${stage}_$impl failed: see" \
            "$out/${stage}_$impl.log"; failed=$((failed + 1)); }
        done
      fi ;;
  esac
  if ((status)); then
    echo "!! $stage failed: see $out/$stage.log"
    failed=$((failed + 1))
  fi
done

if ((fit)); then
  : > "$out/fit.txt"
  for stage in "${stages[@]}"; do
    [[ "$stage" == sft || "$stage" == reward || "$stage" == ppo ]] || continue
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
