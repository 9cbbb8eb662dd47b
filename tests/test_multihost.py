"""Multi-host on one machine: 2 processes x 4 CPU devices train exactly as 1 process x 8 devices.

Both processes run the real entry point (`python -m experiments.run`) with jax's multi-controller
runtime (INSTRUCTJAX_DISTRIBUTED=1, a coordinator on 127.0.0.1, gloo collectives on CPU) and one
shared workdir. The mesh (fsdp=4 x tensor=2) splits every 2-D weight over all 8 devices, so each
process holds, saves and restores only its own half of the state.

Each process reads only its slice of the data (every 2nd record of the shuffled set, 4 rows of the
global batch of 8). The single-process run reads the same 8 records in another order, which the
loss does not see, so the parameters agree to float rounding; a process that read the wrong slice
(or both reading the same one) would train on other records and differ at once.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import tiny
from experiments import sweep
from experiments.configs import sft
from instructjax import checkpoint
from instructjax.models.decoder import LanguageModel
from instructjax.trainers import common

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/sft.py:tiny"
TIMEOUT_S = 300  # per launch; a hung collective must not hang the suite

# A constant learning rate after warmup makes the schedule independent of `steps`, so that a run of
# 4 steps resumed to 6 equals an unbroken run of 6.
SETTINGS = {"steps": 4, "save_every": 2, "eval_every": 2, "eval_batches": 2, "log_every": 1,
            "optimizer.decay": "constant", "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}


def tiny_config(steps: int):
  return tiny.lm_config("sft", **dict(SETTINGS, steps=steps))


def flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def cli_args(config) -> list[str]:
  """`--config.x=y` for every field where `config` differs from the stage's `tiny` config."""
  wanted, default = flatten(config.to_dict()), flatten(sft.get_config("tiny").to_dict())
  assert wanted.keys() == default.keys()
  return sweep.override_args({k: v for k, v in wanted.items() if v != default[k]})


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, args, log_path, env):
  """Starts experiments.run in its own session, so that it (and only it) can be killed."""
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, "-m", "experiments.run", "--config", CONFIG,
                           "--workdir", str(workdir), *args], cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
  proc.log_path = log_path
  log.close()
  return proc


def two_processes(workdir, args, logs_dir, tag):
  port = free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", INSTRUCTJAX_DISTRIBUTED="1",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    procs.append(start(workdir, args, logs_dir / f"{tag}-process{i}.log", env))
  return procs


def one_process(workdir, args, logs_dir, tag):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env.pop("INSTRUCTJAX_DISTRIBUTED", None)
  return [start(workdir, args, logs_dir / f"{tag}.log", env)]


def wait_all(procs, timeout_s=TIMEOUT_S):
  """Waits for every process; on a failure or the deadline, kills the rest and reports the logs.

  A process whose partner died waits in a collective forever, so one failure ends all of them.
  """
  deadline = time.monotonic() + timeout_s
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  bad = [p for p in procs if p.returncode != 0]
  if bad:
    tails = "\n".join(f"--- {p.log_path} (exit {p.returncode}):\n"
                      + "\n".join(pathlib.Path(p.log_path).read_text().splitlines()[-25:])
                      for p in procs)
    pytest.fail(f"{len(bad)} of {len(procs)} processes failed or timed out after {timeout_s}s:\n"
                f"{tails}")


def params_at(workdir, step: int, config):
  """The params of the checkpoint of `step`, restored onto one device as numpy."""
  cfg = common.model_config(config, common.tokenizer_from_config(config))
  _, abstract = common.split_model(lambda rngs: LanguageModel(cfg, rngs=rngs))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                        nnx.to_pure_dict(abstract))
  return jax.device_get(checkpoint.restore_subtree(f"{workdir}/checkpoints", target, step=step))


def metrics_by_step(workdir):
  """{step: {metric: last value}}: a resumed run's repeated steps keep their latest values."""
  by_step = {}
  for line in open(pathlib.Path(workdir) / "metrics.jsonl"):
    record = json.loads(line)
    by_step.setdefault(record.pop("step"), {}).update(record)
  return by_step


def assert_same_training(multi, single, steps, resumed_at=None, rtol=1e-5):
  """Same losses, eval losses and record counts at each of `steps`.

  Record counts are summed over processes and count from the start of the process, so after a
  resume they equal the reference's counts since the resumed step.
  """
  for step in steps:
    m, s = multi[step], single[step]
    for key in ("loss", "grad_norm", "target_tokens", "eval_loss"):
      if key in s:
        np.testing.assert_allclose(m[key], s[key], rtol=rtol, err_msg=f"{key} at step {step}")
    for key in ("truncated_records", "skipped_records"):
      expected = s[key] - (single[resumed_at][key] if resumed_at else 0)
      assert m[key] == expected, (key, step, m[key], expected)


def assert_params_close(a, b):
  # Adam divides by sqrt(v): rounding differences of tiny gradients (summed in another order)
  # grow to ~lr * 1e-4 at most, far below the ~lr-sized updates a wrong batch would give.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-6), a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 2-process run of 4 steps and, at the same time, the 1-process reference of 6 steps."""
  root = tmp_path_factory.mktemp("multihost")
  multi, single = root / "two_processes", root / "one_process"
  procs = (two_processes(multi, cli_args(tiny_config(4)), root, "first")
           + one_process(single, cli_args(tiny_config(6)), root, "reference"))
  wait_all(procs)
  return root, multi, single


def test_two_processes_train_like_one(runs):
  root, multi, single = runs
  assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
  assert sorted(os.listdir(single / "checkpoints")) == ["4", "6"]
  # The CLI reproduced the test config exactly (only the length differs).
  written = json.loads((multi / "config.json").read_text())
  reference = json.loads((single / "config.json").read_text())
  assert dict(written, steps=6) == reference
  multi_metrics, single_metrics = metrics_by_step(multi), metrics_by_step(single)
  assert sorted(multi_metrics) == [1, 2, 3, 4]  # process 1 wrote no second copy of any line
  assert_same_training(multi_metrics, single_metrics, [1, 2, 3, 4])
  assert_params_close(params_at(multi, 4, tiny_config(4)), params_at(single, 4, tiny_config(6)))


def test_two_processes_resume_from_their_checkpoint(runs):
  root, multi, single = runs
  before = params_at(multi, 4, tiny_config(4))
  wait_all(two_processes(multi, cli_args(tiny_config(6)), root, "resumed"))
  log = (root / "resumed-process0.log").read_text()
  assert "resumed from step 4" in log
  assert sorted(os.listdir(multi / "checkpoints")) == ["4", "6"]
  assert_same_training(metrics_by_step(multi), metrics_by_step(single), [5, 6], resumed_at=4)
  after = params_at(multi, 6, tiny_config(6))
  assert_params_close(after, params_at(single, 6, tiny_config(6)))
  # Training went on from the restored state (not from a fresh one, nor standing still).
  assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
