"""The thin loop for the two language-modelling stages: pretraining and SFT.

Build state (sharded at creation, or restored, or initialised from the previous stage), iterate the
grain pipeline, step, log, evaluate, checkpoint. The maths is in `instructjax/objectives/sft.py`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import ml_collections

from instructjax import parallel
from instructjax.data import formatting, pipeline
from instructjax.models.decoder import LanguageModel
from instructjax.objectives import sft
from instructjax.trainers import common, loop
from instructjax.trainers.data_sources import lm_sources


def build_model_state(config, layout: common.Layout, model_cfg, optimizer):
  """Graph definition, abstract sharded state and an initialiser that creates it sharded."""
  return common.supervised_state(config.seed, layout,
                                 lambda rngs: LanguageModel(model_cfg, rngs=rngs), optimizer)


def jit_steps(graphdef, optimizer, schedule, shardings, layout, use_dropout: bool):
  train = functools.partial(sft.train_step, graphdef=graphdef, optimizer=optimizer,
                            schedule=schedule, use_dropout=use_dropout)
  return common.jit_supervised(train, functools.partial(sft.eval_step, graphdef=graphdef),
                               shardings, layout)


def datasets(config, workdir, tokenizer, local_batch, stats):
  """The training iterator's dataset and a factory of one-pass held-out iterators."""
  sources = lm_sources(config, workdir)
  kwargs = dict(seq_len=config.data.seq_len, batch_size=local_batch,
                process_index=jax.process_index(), process_count=jax.process_count())
  if config.data.format == "demonstrations":
    kwargs.update(max_prompt_len=config.data.max_prompt_len, too_long=config.data.too_long,
                  fmt=formatting.from_config(config))
    train_ds = pipeline.sft_dataset(sources["train"], tokenizer, seed=config.seed, stats=stats,
                                    **kwargs)
    kind = "sft"
  else:
    train_ds = pipeline.pretrain_dataset(sources["train"], tokenizer, seed=config.seed,
                                         stats=stats, **kwargs)
    kind = "pretrain"
  eval_data_fn = lambda: iter(pipeline.eval_dataset(sources["validation"], tokenizer, kind=kind,
                                                    **kwargs))
  return train_ds, eval_data_fn


def check_settings(config, layout: common.Layout, model_cfg, trained=None) -> None:
  """Every setting the stage uses after step 0, checked before it: its files exist, the rows fit
  the model, the batch fits the mesh, the cadence, and for SFT on the synthetic task the final gold-score
  evaluation's sampling (`sft_eval.check_settings`)."""
  del trained  # a language-modelling stage reads no other workdir's model
  from instructjax.trainers import data_sources, sft_eval
  if config.data.source == "files":
    data_sources.check_files(config, "data.train_files", "data.eval_files")
  common.check_seq_len(model_cfg, config.data.seq_len)
  parallel.check_global_batch(config.batch_size, layout.mesh, rules=layout.rules)
  loop.check_cadence(config)
  if config.stage == "sft" and config.data.source == "synthetic":
    sft_eval.check_settings(config, layout, model_cfg)


def train(config: ml_collections.ConfigDict, workdir: str,
          extra_eval: Callable[..., dict[str, float]] | None = None) -> dict[str, Any]:
  """Runs (or resumes) a pretraining or SFT stage in `workdir`; returns the final metrics.

  `extra_eval(params, model: common.ModelHandle, tokenizer, layout)` adds stage-specific held-out
  metrics at the end (SFT: the gold score of greedy samples on the synthetic task).
  """
  layout = common.Layout.from_config(config)
  tokenizer = common.tokenizer_from_config(config)
  model_cfg = common.model_config(config, tokenizer)
  check_settings(config, layout, model_cfg)
  local_batch = parallel.check_global_batch(config.batch_size, layout.mesh, rules=layout.rules)
  schedule, optimizer = common.make_optimizer(config.optimizer, config.steps)
  stats = pipeline.PipelineStats()
  train_ds, eval_data_fn = datasets(config, workdir, tokenizer, local_batch, stats)

  with layout.scope():
    graphdef, abstract, shardings, init = build_model_state(config, layout, model_cfg, optimizer)
    train_step, eval_step = jit_steps(graphdef, optimizer, schedule, shardings, layout,
                                      use_dropout=model_cfg.dropout > 0)
    ckpt = loop.checkpointer(config, workdir)
    data_iter = iter(train_ds)

    def create():
      state = common.create_sharded(init, shardings)
      if config.init_from:
        state = dict(state, params=loop.init_params_from(config.init_from, abstract["params"]))
        print(f"[{config.stage}] initialised from {config.init_from}", flush=True)
      elif config.model.init_from_hf:
        state = dict(state, params=common.hf_params(config, layout, model_cfg))
        print(f"[{config.stage}] initialised from {config.model.init_from_hf}", flush=True)
      return state

    state, _ = loop.restore_or_init(config.stage, ckpt, abstract, create, data_iter)
    common.save_config(workdir, config, model_cfg)
    model = common.ModelHandle(graphdef, model_cfg, shardings["params"])
    final_eval = None
    if extra_eval is not None:
      final_eval = lambda state: extra_eval(state["params"], model, tokenizer, layout)
    return loop.train_loop(
        config, workdir, state=state, step_fn=loop.batch_steps(train_step, data_iter, layout),
        data_state=data_iter, ckpt=ckpt,
        evaluate=lambda state: loop.heldout_loss(eval_step, state["params"], eval_data_fn, layout,
                                        config.eval_batches),
        final_eval=final_eval,
        items_per_step=("tokens_per_second", config.batch_size * config.data.seq_len),
        host_metrics=lambda _: loop.summed_over_processes(
            dict(truncated_records=stats.truncated, skipped_records=stats.skipped,
                 boundary_cases=stats.boundary_cases)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The entry for `experiments.run`: SFT adds the gold-score evaluation of greedy samples."""
  from instructjax.trainers import sft_eval
  extra = sft_eval.for_config(config) if config.stage == "sft" else None
  return train(config, workdir, extra_eval=extra)
