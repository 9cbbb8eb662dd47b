"""The thin loop for the two language-modelling stages: pretraining and SFT.

Build state (sharded at creation, or restored, or initialised from the previous stage), iterate the
grain pipeline, step, log, evaluate, checkpoint. The maths is in `instructjax/objectives/sft.py`.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from instructjax import checkpoint, parallel
from instructjax.data import pipeline
from instructjax.metrics import MetricWriter, NonFiniteLossError, Progress
from instructjax.models.decoder import LanguageModel
from instructjax.objectives import sft
from instructjax.trainers import common
from instructjax.trainers.data_sources import lm_sources


def build_model_state(config, layout: common.Layout, model_cfg, optimizer):
  """Graph definition, abstract sharded state and an initialiser that creates it sharded."""
  graphdef, abstract_nnx = common.split_model(lambda rngs: LanguageModel(model_cfg, rngs=rngs))
  p_specs = parallel.param_specs(abstract_nnx, layout.rules, layout.mesh)
  params_abstract = nnx.to_pure_dict(abstract_nnx)
  specs = dict(params=p_specs,
               opt_state=common.opt_state_specs(optimizer, params_abstract, p_specs),
               step=parallel.PartitionSpec(), rng=parallel.PartitionSpec(),
               bad_steps=parallel.PartitionSpec())
  shardings = parallel.named(layout.mesh, specs)

  def init():
    model = LanguageModel(model_cfg, rngs=nnx.Rngs(config.seed))
    params = nnx.to_pure_dict(nnx.split(model)[1])
    return sft.init_state(params, optimizer, config.seed)

  abstract = common.abstract_with_shardings(jax.eval_shape(init), shardings)
  return graphdef, abstract, shardings, init


def jit_steps(graphdef, optimizer, schedule, shardings, layout, use_dropout: bool):
  batch_sharding = parallel.batch_sharding(layout.mesh)
  train = jax.jit(
      functools.partial(sft.train_step, graphdef=graphdef, optimizer=optimizer,
                        schedule=schedule, use_dropout=use_dropout),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, parallel.replicated(layout.mesh)),
      donate_argnums=0)
  evaluate = jax.jit(functools.partial(sft.eval_step, graphdef=graphdef),
                     in_shardings=(shardings["params"], batch_sharding),
                     out_shardings=parallel.replicated(layout.mesh))
  return train, evaluate


def run_eval(evaluate, params, eval_data_fn: Callable, layout, max_batches: int) -> dict[str, float]:
  """Summed held-out loss over the eval split (or its first `max_batches` batches)."""
  sums = {"loss_sum": 0.0, "target_tokens": 0.0}
  for i, local in enumerate(eval_data_fn()):
    if max_batches and i >= max_batches:
      break
    out = evaluate(params, parallel.global_batch(local, layout.mesh))
    for k in sums:
      sums[k] += float(out[k])
  return sft.eval_metrics(sums)


def train(config: ml_collections.ConfigDict, workdir: str,
          extra_eval: Callable[..., dict[str, float]] | None = None) -> dict[str, Any]:
  """Runs (or resumes) a pretraining or SFT stage in `workdir`; returns the final metrics.

  `extra_eval(params, graphdef, model_cfg, tokenizer, layout)` adds stage-specific held-out
  metrics (SFT: the gold score of greedy samples on the synthetic task).
  """
  layout = common.Layout.from_config(config)
  tokenizer = common.tokenizer_from_config(config)
  model_cfg = common.model_config(config, tokenizer)
  common.check_seq_len(model_cfg, config.data.seq_len)
  local_batch = parallel.check_global_batch(config.batch_size, layout.mesh)
  schedule = sft.learning_rate_schedule(config.optimizer.lr, config.optimizer.warmup_steps,
                                        config.steps, config.optimizer.decay,
                                        config.optimizer.end_fraction)
  optimizer = sft.make_optimizer(schedule, weight_decay=config.optimizer.weight_decay,
                                 b1=config.optimizer.b1, b2=config.optimizer.b2,
                                 eps=config.optimizer.eps, clip_norm=config.optimizer.clip_norm)
  sources = lm_sources(config, workdir)
  stats = pipeline.PipelineStats()
  data_kwargs = dict(seq_len=config.data.seq_len, batch_size=local_batch,
                     process_index=jax.process_index(), process_count=jax.process_count(),
                     stats=stats)
  if config.data.format == "demonstrations":
    data_kwargs.update(max_prompt_len=config.data.max_prompt_len, too_long=config.data.too_long)
    train_ds = pipeline.sft_dataset(sources["train"], tokenizer, seed=config.seed, **data_kwargs)
  else:
    train_ds = pipeline.pretrain_dataset(sources["train"], tokenizer, seed=config.seed,
                                         **data_kwargs)
  eval_kind = "sft" if config.data.format == "demonstrations" else "pretrain"
  eval_kwargs = {k: v for k, v in data_kwargs.items() if k != "stats"}
  eval_data_fn = lambda: iter(pipeline.eval_dataset(sources["validation"], tokenizer,
                                                    kind=eval_kind, **eval_kwargs))

  with layout.scope():
    graphdef, abstract, shardings, init = build_model_state(config, layout, model_cfg, optimizer)
    train_step, eval_step = jit_steps(graphdef, optimizer, schedule, shardings, layout,
                                      use_dropout=model_cfg.dropout > 0)
    ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", save_every=config.save_every,
                                   keep=config.keep_checkpoints,
                                   async_save=config.async_checkpoints)
    state, data_iter = restore_or_init(config, ckpt, abstract, shardings, init, train_ds)
    start = int(state["step"])
    writer = MetricWriter(workdir, config.stage)
    progress = Progress(config.stage, config.steps, start_step=start)
    common.save_json(f"{workdir}/config.json", config.to_dict())
    final: dict[str, Any] = {}
    tokens_per_step = config.batch_size * config.data.seq_len
    last_time, last_step = time.perf_counter(), start
    for step in range(start + 1, config.steps + 1):
      state, metrics = train_step(state, parallel.global_batch(next(data_iter), layout.mesh))
      is_last = step == config.steps
      log_now = step % config.log_every == 0 or is_last
      save_now = ckpt.should_save(step) or is_last
      if log_now or save_now:
        stop_if_nonfinite(state, metrics, step)
      if log_now:
        now = time.perf_counter()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        host.update(tokens_per_second=rate * tokens_per_step, steps_per_second=rate,
                    truncated_records=stats.truncated, skipped_records=stats.skipped)
        writer.write(step, host)
        progress.update(step, loss=host["loss"])
        final.update(host)
      if step % config.eval_every == 0 or is_last:
        evals = run_eval(eval_step, state["params"], eval_data_fn, layout, config.eval_batches)
        if extra_eval is not None and is_last:
          evals.update(extra_eval(state["params"], graphdef, model_cfg, tokenizer, layout))
        writer.write(step, evals)
        final.update(evals)
      if save_now:
        ckpt.save(step, state, {"data": data_iter.get_state(), "stage": config.stage},
                  force=is_last)
    ckpt.wait()
    ckpt.close()
    writer.close()
  return final


def restore_or_init(config, ckpt: checkpoint.Checkpointer, abstract, shardings, init, train_ds):
  """Resumes from the latest checkpoint in the workdir, else creates a fresh (sharded) state."""
  data_iter = iter(train_ds)
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(abstract)
    data_iter.set_state(extra["data"])
    print(f"[{config.stage}] resumed from step {int(state['step'])}", flush=True)
    return state, data_iter
  state = common.create_sharded(init, shardings)
  if config.init_from:
    params = checkpoint.restore_subtree(common.checkpoint_dir(config.init_from),
                                        abstract["params"], path=("params",))
    state = dict(state, params=params)
    print(f"[{config.stage}] initialised from {config.init_from}", flush=True)
  return state, data_iter


def stop_if_nonfinite(state, metrics, step: int) -> None:
  """Stops the run before anything is saved once a step had a non-finite loss or gradient.

  The step itself skipped those updates (`sft.apply_if_finite`), so the parameters are still the
  last good ones; checking here, at log and save steps only, keeps host syncs off the hot path.
  """
  if int(state["bad_steps"]):
    host = jax.device_get(metrics)
    name = "loss" if not np.isfinite(host["loss"]) else "grad_norm"
    raise NonFiniteLossError(step, name, float(host[name]))
