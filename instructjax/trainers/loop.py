"""The loop shared by the supervised stages (pretraining, SFT, reward model).

step -> (at log steps) fetch metrics, check finiteness, write -> (at eval steps) evaluate ->
(at save steps) checkpoint with the data-iterator position. Everything stage-specific comes in as
functions, so each stage's trainer is only the code that builds its data and state.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from instructjax import checkpoint, parallel
from instructjax.metrics import MetricWriter, NonFiniteLossError, Progress
from instructjax.trainers import common


def checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
  """The stage's checkpoint manager in `<workdir>/checkpoints`, as the config asks."""
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


def train_loop(config, workdir: str, layout: common.Layout, *, state, data_iter: Iterator,
               step_fn: Callable, ckpt: checkpoint.Checkpointer,
               evaluate: Callable[[Any], Mapping[str, float]],
               final_eval: Callable[[Any], Mapping[str, float]] | None = None,
               items_per_step: tuple[str, float] | None = None,
               host_metrics: Callable[[], Mapping[str, float]] | None = None,
               save_extra: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """Runs steps `state.step + 1 .. config.steps`; returns the last logged and eval metrics.

  items_per_step: e.g. ("tokens_per_second", batch * seq_len) to log a throughput.
  host_metrics: extra host-side counters to log (e.g. skipped records).
  save_extra: JSON-able things to keep in each checkpoint besides the data position.
  """
  start = int(state["step"])
  writer = MetricWriter(workdir, config.stage)
  progress = Progress(config.stage, config.steps, start_step=start)
  final: dict[str, Any] = {}
  last_time, last_step = time.perf_counter(), start
  for step in range(start + 1, config.steps + 1):
    state, metrics = step_fn(state, parallel.global_batch(next(data_iter), layout.mesh))
    is_last = step == config.steps
    log_now = step % config.log_every == 0 or is_last
    save_now = ckpt.should_save(step) or is_last
    if log_now or save_now:
      stop_if_nonfinite(state, metrics, step)
    if log_now:
      now = time.perf_counter()
      rate = (step - last_step) / max(now - last_time, 1e-9)
      last_time, last_step = now, step
      host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
      host["steps_per_second"] = rate
      if items_per_step:
        host[items_per_step[0]] = rate * items_per_step[1]
      host.update(host_metrics() if host_metrics else {})
      writer.write(step, host)
      progress.update(step, loss=host["loss"])
      final.update(host)
    if step % config.eval_every == 0 or is_last:
      evals = dict(evaluate(state))
      if final_eval is not None and is_last:
        evals.update(final_eval(state))
      writer.write(step, evals)
      final.update(evals)
    if save_now:
      extra = {"data": data_iter.get_state(), "stage": config.stage}
      extra.update(save_extra() if save_extra else {})
      ckpt.save(step, state, extra, force=is_last)
  ckpt.wait()
  ckpt.close()
  writer.close()
  return final
