#!/usr/bin/env bash
# Runs InstructJAX on a Cloud TPU pod slice (e.g. v5litepod-16: 4 hosts x 4 chips).
#
# Every host of a pod runs the same `python -m experiments.run ...` command; with
# INSTRUCTJAX_DISTRIBUTED=1 the project calls jax.distributed.initialize(), which finds the
# other hosts by itself on Cloud TPU. Each host writes its own log file.
#
# Usage: launch/tpu_pod.sh [flags] SUBCOMMAND [flags] [-- ARGS TO experiments.run]
# See `launch/tpu_pod.sh --help` and launch/README.md.
set -euo pipefail

readonly PROG="tpu_pod.sh"
# The repository holds this script in launch/.
REPO_ROOT="$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [flags] SUBCOMMAND [flags] [-- ARGS TO experiments.run]

Subcommands:
  create   create the TPU VM slice (reused when it already exists)
  setup    copy this checkout to every worker and install it in a venv there
  run      start `python -m experiments.run ARGS` on every worker, detached,
           with INSTRUCTJAX_DISTRIBUTED=1; each worker logs to
           ~/$REMOTE_LOG_DIR/worker-$(hostname).log
  logs     copy every worker's log into $LOCAL_LOG_DIR
  tail     follow one worker's log (--worker, default 0)
  stop     stop the run on every worker (the TPUs stay up, and billed)
  delete   delete the TPU VM slice (gcloud asks to confirm unless --yes)

Flags (each also read from the environment variable in brackets):
  --name NAME                 [TPU_NAME]          default: instructjax
  --zone ZONE                 [ZONE]              required, e.g. us-west4-a
  --accelerator_type TYPE     [ACCELERATOR_TYPE]  default: v5litepod-16
  --runtime_version VERSION   [RUNTIME_VERSION]   default: v2-alpha-tpuv5-lite
  --project PROJECT           [PROJECT]           default: gcloud's configured project
  --python PYTHON             [REMOTE_PYTHON]     Python >= 3.11 on the workers that
                                                  makes the venv; default: python3
  --worker N                  [WORKER]            worker for `tail`; default: 0
  --local_log_dir DIR         [LOCAL_LOG_DIR]     default: ./instructjax-logs/NAME
  --yes                       [YES=1]             `delete` without asking
  --dry_run                   [DRY_RUN=1]         print every command, run none
Paths on the workers, relative to the home directory there:
  [REMOTE_DIR] instructjax   [REMOTE_VENV] instructjax-venv
  [REMOTE_LOG_DIR] instructjax-logs

The run's --workdir must be a path that every host sees, i.e. gs://BUCKET/... on Cloud TPU.

Example:
  export ZONE=us-west4-a TPU_NAME=rlhf ACCELERATOR_TYPE=v5litepod-16
  launch/tpu_pod.sh create && launch/tpu_pod.sh setup
  launch/tpu_pod.sh run -- --config experiments/configs/sft.py --workdir gs://BUCKET/sft
EOF
}

die() {
  printf '%s: %s\n' "${PROG}" "$*" >&2
  exit 1
}

warn() {
  printf '%s: warning: %s\n' "${PROG}" "$*" >&2
}

# Quotes one word for a POSIX shell, leaving plain words bare so that printed commands
# stay readable and can still be pasted into a shell.
quote_word() {
  local word="$1"
  if [[ "${word}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "${word}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Joins words into one shell command line, each word quoted.
join_command() {
  local line="" word
  for word in "$@"; do
    line+="${line:+ }$(quote_word "${word}")"
  done
  printf '%s' "${line}"
}

is_dry_run() {
  [[ "${DRY_RUN}" == "1" ]]
}

# Runs a command, or only prints it under --dry_run.
run_command() {
  if is_dry_run; then
    printf '%s\n' "$(join_command "$@")"
  else
    "$@"
  fi
}

# Paths on the workers are spliced unquoted after `~/` into remote commands, so they are
# restricted to characters that need no quoting and may not escape the home directory.
check_remote_path() {
  local name="$1" value="$2"
  if [[ ! "${value}" =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ || "${value}" == *..* ]]; then
    die "${name}='${value}' must be a plain path relative to the home directory on the workers (letters, digits, _ . / -)"
  fi
}

# The remote Python is spliced into remote commands too.
check_remote_python() {
  if [[ ! "${REMOTE_PYTHON}" =~ ^[A-Za-z0-9_./-]+$ ]]; then
    die "--python '${REMOTE_PYTHON}' must be a command name or path (letters, digits, _ . / -)"
  fi
}

# Joins remote shell commands into the one line that `gcloud ... ssh --command` takes.
join_remote() {
  local line="" part
  for part in "$@"; do
    line+="${line:+; }${part}"
  done
  printf '%s' "${line}"
}

# `gcloud compute tpus tpu-vm VERB NAME` plus the flags every such command needs.
tpu_vm() {
  local verb="$1"
  shift
  local command=(gcloud compute tpus tpu-vm "${verb}" "$@" "--zone=${ZONE}")
  if [[ -n "${PROJECT}" ]]; then
    command+=("--project=${PROJECT}")
  fi
  run_command "${command[@]}"
}

ssh_all_workers() {
  tpu_vm ssh "${TPU_NAME}" --worker=all "--command=$1"
}

# Warns when --workdir is not shared: each host would write its own partial checkpoint.
check_workdir() {
  local arg workdir="" previous=""
  for arg in "$@"; do
    case "${arg}" in
      --workdir=*) workdir="${arg#--workdir=}" ;;
      *) if [[ "${previous}" == "--workdir" ]]; then workdir="${arg}"; fi ;;
    esac
    previous="${arg}"
  done
  if [[ -z "${workdir}" ]]; then
    warn "no --workdir in the run's arguments"
  elif [[ "${workdir}" != gs://* ]]; then
    warn "--workdir ${workdir} is not a gs:// path; every host of the pod must see the same workdir"
  fi
}

cmd_create() {
  if is_dry_run; then
    printf '# reuses %s when this succeeds:\n' "${TPU_NAME}"
    tpu_vm describe "${TPU_NAME}" '--format=value(state)'
    printf '# otherwise creates it:\n'
  elif gcloud compute tpus tpu-vm describe "${TPU_NAME}" "--zone=${ZONE}" \
      ${PROJECT:+"--project=${PROJECT}"} --format='value(state)' >/dev/null 2>&1; then
    printf '%s: reusing the existing TPU VM %s in %s\n' "${PROG}" "${TPU_NAME}" "${ZONE}"
    return 0
  fi
  tpu_vm create "${TPU_NAME}" "--accelerator-type=${ACCELERATOR_TYPE}" \
    "--version=${RUNTIME_VERSION}"
}

cmd_setup() {
  local tarball="${TMPDIR:-/tmp}/instructjax-${TPU_NAME}.tar.gz"
  local remote_tarball="instructjax-code.tar.gz"
  if ! is_dry_run; then
    # shellcheck disable=SC2064  # the path is fixed now, on purpose
    trap "rm -f -- $(printf '%q' "${tarball}")" EXIT
  fi
  # The working tree, not `git archive`: uncommitted changes are what one wants to run.
  run_command tar -czf "${tarball}" --exclude=./.git --exclude=./workdirs \
    --exclude=./instructjax-logs --exclude=__pycache__ --exclude=.pytest_cache -C "${REPO_ROOT}" .
  tpu_vm scp "${tarball}" "${TPU_NAME}:${remote_tarball}" --worker=all
  # shellcheck disable=SC2088  # the ~ is expanded on the worker, in its home
  local venv_python="~/${REMOTE_VENV}/bin/python"
  # shellcheck disable=SC2088  # the ~ is expanded on the worker, in its home
  local pid_file="~/${REMOTE_LOG_DIR}/run.pid"
  local install=(
    "set -euo pipefail"
    "if [ -f ${pid_file} ] && kill -0 \"\$(cat ${pid_file})\" 2>/dev/null; then echo \"\$(hostname): a run is still going: stop it before replacing its code\" >&2; exit 1; fi"
    "if ! ${REMOTE_PYTHON} -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then echo \"\$(hostname): ${REMOTE_PYTHON} is not Python >= 3.11; install one (Ubuntu 22.04: sudo apt-get install -y python3.11 python3.11-venv) and pass --python python3.11\" >&2; exit 1; fi"
    "rm -rf ~/${REMOTE_DIR}.new"
    "mkdir -p ~/${REMOTE_DIR}.new"
    "tar -xzf ~/${remote_tarball} -C ~/${REMOTE_DIR}.new"
    "rm -rf ~/${REMOTE_DIR}"
    "mv ~/${REMOTE_DIR}.new ~/${REMOTE_DIR}"
    "rm -f ~/${remote_tarball}"
    "if [ ! -x ${venv_python} ]; then ${REMOTE_PYTHON} -m venv ~/${REMOTE_VENV}; fi"
    "cd ~/${REMOTE_DIR}"
    "${venv_python} -m pip install --upgrade pip"
    "${venv_python} -m pip install -r requirements.txt 'jax[tpu]'"
  )
  ssh_all_workers "$(join_remote "${install[@]}")"
}

cmd_run() {
  if (($# == 0)); then
    die "run needs the arguments of experiments.run after --, e.g. run -- --config experiments/configs/sft.py --workdir gs://BUCKET/sft"
  fi
  check_workdir "$@"
  # shellcheck disable=SC2088  # the ~ is expanded on the worker, in its home
  local log_dir="~/${REMOTE_LOG_DIR}"
  local pid_file="${log_dir}/run.pid"
  # Detached (setsid nohup), so that a dropped ssh connection does not end the run; the
  # process id is also its process group id, which `stop` kills.
  local start=(
    "set -euo pipefail"
    "mkdir -p ${log_dir}"
    "if [ -f ${pid_file} ] && kill -0 \"\$(cat ${pid_file})\" 2>/dev/null; then echo \"\$(hostname): a run is still going (pid \$(cat ${pid_file})): stop it first\" >&2; exit 1; fi"
    "log=${log_dir}/worker-\$(hostname).log"
    "if [ -f \"\$log\" ]; then mv \"\$log\" \"\$log.prev\"; fi"
    "cd ~/${REMOTE_DIR}"
    "INSTRUCTJAX_DISTRIBUTED=1 setsid nohup ~/${REMOTE_VENV}/bin/python -m experiments.run $(join_command "$@") >\"\$log\" 2>&1 </dev/null & echo \$! >${pid_file}"
    "echo \"\$(hostname): started pid \$!, logging to \$log\""
  )
  ssh_all_workers "$(join_remote "${start[@]}")"
}

cmd_stop() {
  # shellcheck disable=SC2088  # the ~ is expanded on the worker, in its home
  local pid_file="~/${REMOTE_LOG_DIR}/run.pid"
  # TERM first so that the run can close its files; KILL after 30 s, because a process
  # still holding the TPU blocks the next run.
  local stop=(
    "if [ ! -f ${pid_file} ]; then echo \"\$(hostname): no run to stop\"; exit 0; fi"
    "pid=\$(cat ${pid_file})"
    "if kill -0 \"\$pid\" 2>/dev/null; then kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\"; for _ in \$(seq 30); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done; kill -KILL -- \"-\$pid\" 2>/dev/null || true; echo \"\$(hostname): stopped pid \$pid\"; else echo \"\$(hostname): pid \$pid had already ended\"; fi"
    "rm -f ${pid_file}"
  )
  ssh_all_workers "$(join_remote "${stop[@]}")"
}

cmd_logs() {
  run_command mkdir -p "${LOCAL_LOG_DIR}"
  tpu_vm scp "${TPU_NAME}:${REMOTE_LOG_DIR}/worker-*.log" "${LOCAL_LOG_DIR}/" --worker=all
  if ! is_dry_run; then
    printf '%s: logs of every worker are in %s\n' "${PROG}" "${LOCAL_LOG_DIR}"
  fi
}

cmd_tail() {
  if [[ ! "${WORKER}" =~ ^[0-9]+$ ]]; then
    die "--worker '${WORKER}' must be a worker number (0, 1, ...)"
  fi
  tpu_vm ssh "${TPU_NAME}" "--worker=${WORKER}" \
    "--command=tail -n 100 -F ~/${REMOTE_LOG_DIR}/worker-\$(hostname).log"
}

cmd_delete() {
  local confirm=()
  if [[ "${YES}" == "1" ]]; then
    confirm=(--quiet)
  fi
  tpu_vm delete "${TPU_NAME}" ${confirm[@]+"${confirm[@]}"}
}

main() {
  TPU_NAME="${TPU_NAME:-instructjax}"
  ZONE="${ZONE:-}"
  ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
  RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
  PROJECT="${PROJECT:-}"
  REMOTE_PYTHON="${REMOTE_PYTHON:-python3}"
  WORKER="${WORKER:-0}"
  LOCAL_LOG_DIR="${LOCAL_LOG_DIR:-}"
  YES="${YES:-0}"
  DRY_RUN="${DRY_RUN:-0}"
  REMOTE_DIR="${REMOTE_DIR:-instructjax}"
  REMOTE_VENV="${REMOTE_VENV:-instructjax-venv}"
  REMOTE_LOG_DIR="${REMOTE_LOG_DIR:-instructjax-logs}"

  local subcommand="" run_args=()
  while (($# > 0)); do
    local arg="$1" key value
    shift
    case "${arg}" in
      --) run_args=("$@"); break ;;
      -h | --help) usage; exit 0 ;;
      --dry_run | --dry-run) DRY_RUN=1; continue ;;
      --yes) YES=1; continue ;;
      --*=*) key="${arg%%=*}"; value="${arg#*=}" ;;
      --*)
        key="${arg}"
        (($# > 0)) || die "${arg} needs a value"
        value="$1"
        shift
        ;;
      *)
        [[ -z "${subcommand}" ]] || die "one subcommand only (got ${subcommand} and ${arg}); the run's arguments go after --"
        subcommand="${arg}"
        continue
        ;;
    esac
    case "${key//-/_}" in
      __name) TPU_NAME="${value}" ;;
      __zone) ZONE="${value}" ;;
      __accelerator_type) ACCELERATOR_TYPE="${value}" ;;
      __runtime_version) RUNTIME_VERSION="${value}" ;;
      __project) PROJECT="${value}" ;;
      __python) REMOTE_PYTHON="${value}" ;;
      __worker) WORKER="${value}" ;;
      __local_log_dir) LOCAL_LOG_DIR="${value}" ;;
      *) die "unknown flag ${key} (see --help)" ;;
    esac
  done
  LOCAL_LOG_DIR="${LOCAL_LOG_DIR:-instructjax-logs/${TPU_NAME}}"

  [[ -n "${subcommand}" ]] || { usage >&2; exit 2; }
  if ((${#run_args[@]} > 0)) && [[ "${subcommand}" != "run" ]]; then
    die "only run takes arguments after --"
  fi
  [[ "${DRY_RUN}" == "0" || "${DRY_RUN}" == "1" ]] || die "DRY_RUN='${DRY_RUN}' must be 0 or 1"
  [[ -n "${ZONE}" ]] || die "no zone: pass --zone or export ZONE (e.g. us-west4-a, which has v5e)"
  [[ "${TPU_NAME}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "TPU name '${TPU_NAME}' must be lowercase letters, digits and -, starting with a letter"
  check_remote_path REMOTE_DIR "${REMOTE_DIR}"
  check_remote_path REMOTE_VENV "${REMOTE_VENV}"
  check_remote_path REMOTE_LOG_DIR "${REMOTE_LOG_DIR}"
  check_remote_python
  if ! is_dry_run && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or pass --dry_run to only print the commands"
  fi

  case "${subcommand}" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ${run_args[@]+"${run_args[@]}"} ;;
    logs) cmd_logs ;;
    tail) cmd_tail ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    *) die "unknown subcommand '${subcommand}' (see --help)" ;;
  esac
}

main "$@"
