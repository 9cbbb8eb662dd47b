#!/usr/bin/env bash
# Submits launch/slurm_gpu.sbatch with the node, GPU and process layout given as flags.
#
# Usage: launch/slurm_submit.sh [flags] -- ARGS TO experiments.run
# See `launch/slurm_submit.sh --help` and launch/README.md.
set -euo pipefail

readonly PROG="slurm_submit.sh"
REPO_ROOT="$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly BATCH_SCRIPT="${REPO_ROOT}/launch/slurm_gpu.sbatch"

usage() {
  cat <<'EOF'
Usage: launch/slurm_submit.sh [flags] -- ARGS TO experiments.run

Flags (each also read from the environment variable in brackets):
  --nodes N              [NODES]          default: 1
  --gpus_per_node G      [GPUS_PER_NODE]  default: 8
  --process_per MODE     [PROCESS_PER]    gpu: one process per GPU (default);
                                          host: one process per node driving all its GPUs
  --cpus_per_gpu C       [CPUS_PER_GPU]   default: 8
  --time LIMIT           [TIME_LIMIT]     e.g. 1-00:00:00; default: the partition's
  --partition NAME       [PARTITION]      default: the cluster's
  --account NAME         [ACCOUNT]        default: yours
  --job_name NAME        [JOB_NAME]       default: instructjax
  --log_dir DIR          [LOG_DIR]        default: REPO/slurm-logs (relative: to REPO)
  --python PYTHON        [PYTHON]         Python with InstructJAX and jax[cuda12] installed;
                                          default: python3 from the submitting shell's PATH
  --sbatch_arg ARG                        one more sbatch flag, e.g. --sbatch_arg=--qos=high
                                          (repeatable)
  --dry_run              [DRY_RUN=1]      print the sbatch command and the srun command that
                                          the job would run, submit nothing

Logs: LOG_DIR/JOBNAME-JOBID.out (the batch script) and LOG_DIR/JOBNAME-JOBID-TASK.log
(one per task). With more than one node, REPO, LOG_DIR and --workdir must be on a file
system that every node sees.

Example (2 nodes x 8 GPUs, 16 processes):
  launch/slurm_submit.sh --nodes 2 --partition gpu -- \
    --config experiments/configs/sft.py --workdir /shared/runs/sft
EOF
}

die() {
  printf '%s: %s\n' "${PROG}" "$*" >&2
  exit 1
}

# Quotes one word for a POSIX shell, leaving plain words bare (as in tpu_pod.sh).
quote_word() {
  local word="$1"
  if [[ "${word}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "${word}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

run_command() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    local line="" word
    for word in "$@"; do
      line+="${line:+ }$(quote_word "${word}")"
    done
    printf '%s\n' "${line}"
  else
    "$@"
  fi
}

check_count() {
  local name="$1" value="$2"
  [[ "${value}" =~ ^[1-9][0-9]*$ ]] || die "${name} must be a positive whole number (got '${value}')"
}

main() {
  NODES="${NODES:-1}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
  PROCESS_PER="${PROCESS_PER:-gpu}"
  CPUS_PER_GPU="${CPUS_PER_GPU:-8}"
  TIME_LIMIT="${TIME_LIMIT:-}"
  PARTITION="${PARTITION:-}"
  ACCOUNT="${ACCOUNT:-}"
  JOB_NAME="${JOB_NAME:-instructjax}"
  LOG_DIR="${LOG_DIR:-slurm-logs}"
  PYTHON="${PYTHON:-python3}"
  DRY_RUN="${DRY_RUN:-0}"

  local extra_sbatch_args=() run_args=() saw_separator=0
  while (($# > 0)); do
    local arg="$1" key value
    shift
    case "${arg}" in
      --) run_args=("$@"); saw_separator=1; break ;;
      -h | --help) usage; exit 0 ;;
      --dry_run | --dry-run) DRY_RUN=1; continue ;;
      --*=*) key="${arg%%=*}"; value="${arg#*=}" ;;
      --*)
        key="${arg}"
        (($# > 0)) || die "${arg} needs a value"
        value="$1"
        shift
        ;;
      *) die "unexpected '${arg}': the arguments of experiments.run go after --" ;;
    esac
    case "${key//-/_}" in
      __nodes) NODES="${value}" ;;
      __gpus_per_node) GPUS_PER_NODE="${value}" ;;
      __process_per) PROCESS_PER="${value}" ;;
      __cpus_per_gpu) CPUS_PER_GPU="${value}" ;;
      __time) TIME_LIMIT="${value}" ;;
      __partition) PARTITION="${value}" ;;
      __account) ACCOUNT="${value}" ;;
      __job_name) JOB_NAME="${value}" ;;
      __log_dir) LOG_DIR="${value}" ;;
      __python) PYTHON="${value}" ;;
      __sbatch_arg) extra_sbatch_args+=("${value}") ;;
      *) die "unknown flag ${key} (see --help)" ;;
    esac
  done

  ((saw_separator == 1 && ${#run_args[@]} > 0)) \
    || die "pass the arguments of experiments.run after --, e.g. -- --config experiments/configs/sft.py --workdir /shared/runs/sft"
  [[ "${DRY_RUN}" == "0" || "${DRY_RUN}" == "1" ]] || die "DRY_RUN='${DRY_RUN}' must be 0 or 1"
  check_count --nodes "${NODES}"
  check_count --gpus_per_node "${GPUS_PER_NODE}"
  check_count --cpus_per_gpu "${CPUS_PER_GPU}"
  local tasks_per_node cpus_per_task
  case "${PROCESS_PER}" in
    gpu) tasks_per_node="${GPUS_PER_NODE}"; cpus_per_task="${CPUS_PER_GPU}" ;;
    host) tasks_per_node=1; cpus_per_task=$((CPUS_PER_GPU * GPUS_PER_NODE)) ;;
    *) die "--process_per must be gpu or host (got '${PROCESS_PER}')" ;;
  esac
  if [[ "${LOG_DIR}" != /* ]]; then
    LOG_DIR="${REPO_ROOT}/${LOG_DIR}"
  fi
  # sbatch --export splits its list at commas, so no value in it may hold one.
  local name
  for name in LOG_DIR PYTHON; do
    [[ "${!name}" != *,* ]] || die "${name}='${!name}' may not contain a comma"
  done
  if [[ "${DRY_RUN}" != "1" ]] && ! command -v sbatch >/dev/null 2>&1; then
    die "sbatch is not on PATH: run this on a SLURM login node, or pass --dry_run to only print the commands"
  fi

  local settings=(
    "INSTRUCTJAX_PROCESS_PER=${PROCESS_PER}"
    "INSTRUCTJAX_GPUS_PER_NODE=${GPUS_PER_NODE}"
    "INSTRUCTJAX_LOG_DIR=${LOG_DIR}"
    "INSTRUCTJAX_PYTHON=${PYTHON}"
  )
  local export_list="ALL" setting
  for setting in "${settings[@]}"; do
    export_list+=",${setting}"
  done
  local sbatch=(
    sbatch
    "--job-name=${JOB_NAME}"
    "--nodes=${NODES}"
    "--ntasks-per-node=${tasks_per_node}"
    "--gpus-per-node=${GPUS_PER_NODE}"
    "--cpus-per-task=${cpus_per_task}"
  )
  [[ -z "${TIME_LIMIT}" ]] || sbatch+=("--time=${TIME_LIMIT}")
  [[ -z "${PARTITION}" ]] || sbatch+=("--partition=${PARTITION}")
  [[ -z "${ACCOUNT}" ]] || sbatch+=("--account=${ACCOUNT}")
  sbatch+=(
    "--chdir=${REPO_ROOT}"
    "--output=${LOG_DIR}/%x-%j.out"
    "--export=${export_list}"
    ${extra_sbatch_args[@]+"${extra_sbatch_args[@]}"}
    "${BATCH_SCRIPT}"
    "${run_args[@]}"
  )

  # SLURM does not create the directory of --output; a job whose log cannot be opened
  # fails without a word.
  run_command mkdir -p "${LOG_DIR}"
  run_command "${sbatch[@]}"
  if [[ "${DRY_RUN}" == "1" ]]; then
    printf '# in the job, %s runs:\n' "${BATCH_SCRIPT##*/}"
    (cd "${REPO_ROOT}" && env "${settings[@]}" INSTRUCTJAX_DRY_RUN=1 \
      bash "${BATCH_SCRIPT}" "${run_args[@]}")
  fi
}

main "$@"
