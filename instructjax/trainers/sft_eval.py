"""SFT's task-level evaluation: the gold score of greedy samples on held-out synthetic prompts.

The held-out loss says the model fits the demonstrations; this says it follows instructions.
"""
from __future__ import annotations

import jax
import numpy as np

from instructjax.sampling import SamplingConfig
from instructjax.trainers import common, generate
from instructjax.trainers.data_sources import synthetic_task


def gold_score_eval(config, task, params, model, tokenizer, layout, *, prompts=None,
                    split: str = "eval") -> dict[str, float]:
  """Mean gold score, EOS rate and length of greedy responses to `config.eval_samples` prompts."""
  prompts = prompts if prompts is not None else task.prompts(config.eval_samples, split)
  sampler = common.sampler(model, SamplingConfig(config.sampling.max_new_tokens, greedy=True),
                           tokenizer, layout)
  completions = generate.complete(sampler, params, tokenizer, prompts, jax.random.PRNGKey(0),
                                  prompt_len=config.sampling.prompt_len,
                                  batch_size=config.sampling.batch_size, mesh=layout.mesh)
  scores = [task.score(c.prompt, c.text) for c in completions]
  return dict(eval_gold_score=float(np.mean(scores)),
              eval_ended_fraction=float(np.mean([c.ended for c in completions])),
              eval_response_length=float(np.mean([len(c.tokens) for c in completions])))


def check_settings(config, layout, model_cfg) -> None:
  """What `gold_score_eval` will use, checked before the stage trains: greedy sampling of
  `config.sampling` on the model (`stages.check_sampling`) and at least one prompt."""
  from instructjax.errors import InputError
  from instructjax.trainers import stages
  stages.check_sampling(config.sampling, layout, model_cfg, greedy=True)
  if config.eval_samples < 1:
    raise InputError("config.eval_samples", f"must be >= 1, got {config.eval_samples}")


def for_config(config):
  """The extra evaluation of an SFT run, or None when the data is not the synthetic task."""
  if config.data.source != "synthetic":
    return None
  task = synthetic_task(config)
  return lambda params, model, tokenizer, layout: gold_score_eval(config, task, params, model,
                                                                  tokenizer, layout)
