"""The loop every stage runs (pretraining, SFT, reward model, PPO).

step -> (at log steps) fetch metrics, check finiteness, write -> (at eval steps) evaluate ->
(at save steps) checkpoint with the data-iterator position. Everything stage-specific comes in as
functions (a supervised step on the next batch, or a PPO iteration over its phases), so each
stage's trainer is only the code that builds its data, state and step.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from instructjax import checkpoint, parallel
from instructjax.errors import InputError
from instructjax.metrics import MetricWriter, NonFiniteLossError, Progress
from instructjax.objectives import sft
from instructjax.trainers import common


def check_cadence(config) -> None:
  """log_every and save_every are >= 1; eval_every >= 0 (0: evaluate at the last step only)."""
  for name, least in (("log_every", 1), ("save_every", 1), ("eval_every", 0)):
    value = config[name]
    if not isinstance(value, int) or value < least:
      raise InputError(f"config.{name}", f"must be an integer >= {least}, got {value!r}"
                       + (" (0 evaluates at the last step only)" if name == "eval_every" else ""))


def checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
  """The stage's checkpoint manager in `<workdir>/checkpoints`, as the config asks (its cadence
  checked first: every stage builds one before its first step)."""
  check_cadence(config)
  return checkpoint.Checkpointer(f"{workdir}/checkpoints", save_every=config.save_every,
                                 keep=config.keep_checkpoints, async_save=config.async_checkpoints)


def restore_or_init(stage: str, ckpt: checkpoint.Checkpointer, abstract, create: Callable[[], Any],
                    data_iter) -> tuple[Any, dict]:
  """Resumes from the workdir's latest checkpoint (state + data position), else `create()`s."""
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(abstract)
    data_iter.set_state(extra["data"])
    print(f"[{stage}] resumed from step {int(state['step'])}", flush=True)
    return state, extra
  return create(), {}


def init_params_from(init_from: str, abstract_params, path=("params",)):
  """Parameters of another stage's latest checkpoint, placed on this stage's shardings."""
  return checkpoint.restore_subtree(common.checkpoint_dir(init_from), abstract_params, path=path)


def stop_if_nonfinite(state, metrics, step: int) -> None:
  """Stops the run before anything is saved once a step had a non-finite loss or gradient.

  The step itself skipped those updates (`sft.apply_if_finite`), so the parameters are still the
  last good ones; checking here, at log and save steps only, keeps host syncs off the hot path.
  """
  if int(state["bad_steps"]):
    host = jax.device_get(metrics)
    name = "loss" if not np.isfinite(host["loss"]) else "grad_norm"
    raise NonFiniteLossError(step, name, float(host[name]))


def summed_over_processes(counts: Mapping[str, int]) -> dict[str, int]:
  """Host-side counters (e.g. skipped records) summed over all processes.

  Each process counts only its own slice of the data while only process 0 writes metrics; every
  process logs at the same steps, so this collective is safe there.
  """
  values = np.array(list(counts.values()), np.int64)
  if jax.process_count() > 1:
    values = multihost_utils.process_allgather(values).sum(axis=0)
  return {k: int(v) for k, v in zip(counts, values)}


def heldout_loss(eval_step, params, eval_data_fn: Callable, layout: common.Layout,
                 max_batches: int) -> dict[str, float]:
  """A language model's summed held-out loss over one pass of `eval_data_fn()` (or its first
  `max_batches` batches): eval_loss and eval_perplexity (`objectives.sft.eval_metrics`)."""
  sums = {"loss_sum": 0.0, "target_tokens": 0.0}
  for i, local in enumerate(eval_data_fn()):
    if max_batches and i >= max_batches:
      break
    out = eval_step(params, parallel.global_batch(local, layout.mesh))
    for k in sums:
      sums[k] += float(out[k])
  return sft.eval_metrics(sums)


def batch_steps(step_fn: Callable, data_iter: Iterator, layout: common.Layout) -> Callable:
  """A supervised stage's loop step: its jitted step on the next global batch of `data_iter`."""
  return lambda state, step: step_fn(state, parallel.global_batch(next(data_iter), layout.mesh))


def scalars(metrics) -> dict[str, float]:
  """The scalar metrics, fetched to the host as floats."""
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}


def train_loop(config, workdir: str, *, state, step_fn: Callable, data_state,
               ckpt: checkpoint.Checkpointer, evaluate: Callable[[Any], Mapping[str, float]],
               total_steps: int | None = None, start: int | None = None,
               final_eval: Callable[[Any], Mapping[str, float]] | None = None,
               eval_at_start: bool = False,
               items_per_step: tuple[str, float] | None = None,
               host_metrics: Callable[[dict[str, float]], Mapping[str, float]] | None = None,
               save_extra: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """Runs loop steps `start + 1 .. total_steps`; returns the last logged and eval metrics.

  step_fn(state, step) -> (state, metrics): one loop step (a supervised stage's optimiser step,
    see `batch_steps`, or a PPO iteration); metrics stay on the device until a log step, and
    carry "loss" (and "grad_norm") for the non-finite check.
  data_state: what `get_state()`s the data position kept in each checkpoint.
  total_steps / start: default config.steps / the state's step.
  eval_at_start: also evaluate before the first step of a fresh run (step 0).
  items_per_step: e.g. ("tokens_per_second", batch * seq_len) to log a throughput.
  host_metrics(logged): extra host-side metrics at a log step, given what is logged so far
    (e.g. skipped records, a stage's own timings).
  save_extra: JSON-able things to keep in each checkpoint besides the data position.
  """
  total_steps = config.steps if total_steps is None else total_steps
  start = int(state["step"]) if start is None else start
  writer = MetricWriter(workdir, config.stage)
  progress = Progress(config.stage, total_steps, start_step=start)
  final: dict[str, Any] = {}
  if eval_at_start and start == 0:
    final.update(evaluate(state))
    writer.write(0, final)
  last_time, last_step = time.perf_counter(), start
  for step in range(start + 1, total_steps + 1):
    state, metrics = step_fn(state, step)
    is_last = step == total_steps
    log_now = step % config.log_every == 0 or is_last
    save_now = ckpt.should_save(step) or is_last
    if log_now or save_now:
      stop_if_nonfinite(state, metrics, step)
    if log_now:
      now = time.perf_counter()
      rate = (step - last_step) / max(now - last_time, 1e-9)
      last_time, last_step = now, step
      host = scalars(metrics)
      host["steps_per_second"] = rate
      if items_per_step:
        host[items_per_step[0]] = rate * items_per_step[1]
      host.update(host_metrics(host) if host_metrics else {})
      writer.write(step, host)
      progress.update(step, loss=host["loss"])
      final.update(host)
    if save_now:  # before any evaluation: a late failure never costs the trained parameters
      extra = {"data": data_state.get_state(), "stage": config.stage}
      extra.update(save_extra() if save_extra else {})
      ckpt.save(step, state, extra, force=is_last)
    if is_eval_step(config, step) and not is_last:
      evals = dict(evaluate(state))
      writer.write(step, evals)
      final.update(evals)
  done_file = os.path.join(workdir, FINAL_EVAL_FILE)
  if total_steps > start or not os.path.exists(done_file):
    # The last step's evaluation, once its checkpoint is on disk; a run resumed after this
    # failed (every step done, no record of it) evaluates again instead of training again.
    ckpt.wait()
    evals = dict(evaluate(state))
    if final_eval is not None:
      evals.update(final_eval(state))
    writer.write(total_steps, evals)
    final.update(evals)
    common.save_json(done_file, evals)
  ckpt.wait()
  ckpt.close()
  writer.close()
  return final


FINAL_EVAL_FILE = "final_eval.json"  # the last step's evaluation, written once it has run


def is_eval_step(config, step: int) -> bool:
  """config.eval_every steps apart; 0 evaluates only at the last step."""
  return config.eval_every > 0 and step % config.eval_every == 0
