"""The sampling entry for people: completions of prompts from any stage's checkpoint.

The checkpoint's workdir holds the config it was trained with (config.json); its model, tokenizer
and synthetic-task sections decide how to rebuild the model and score the answers.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from instructjax.data import records
from instructjax.errors import InputError
from instructjax.trainers import common, generate, workdirs
from instructjax.trainers.data_sources import synthetic_task


def policy_params(checkpoint: str, trained, layout: common.Layout):
  """(ModelHandle, params, tokenizer) of the language model in a pretrain, SFT or PPO workdir."""
  tokenizer = common.tokenizer_from_config(trained)
  model, params = workdirs.restore_policy(checkpoint, common.ran_with(trained, tokenizer),
                                          layout, trained)
  return model, params, tokenizer


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if not config.checkpoint:
    raise InputError("config.checkpoint", "give a stage workdir to sample from")
  trained = workdirs.read_config(config.checkpoint, required="--config.checkpoint")
  layout = common.Layout.from_config(config)
  trained_on_task = trained.get("data", {}).get("source", "synthetic") == "synthetic"
  task = None  # the gold scorer judges the synthetic task's own prompts only
  if config.prompts_file:
    prompts = [r["prompt"] for r in records.read_prompts(config.prompts_file)]
    prompts = prompts[:config.num_prompts]
  elif trained_on_task and trained.get("synthetic"):
    task = synthetic_task(trained)
    prompts = task.prompts(config.num_prompts, config.split, style=config.style or None)
  else:
    raise InputError("config.prompts_file", "the checkpoint was not trained on the synthetic "
                     "task; give prompts")
  with layout.scope():
    model, params, tokenizer = policy_params(config.checkpoint, trained, layout)
    s = config.sampling
    sampler = common.sampler(model, common.sampling_config(s, config.greedy), tokenizer, layout)
    completions = generate.complete(sampler, params, tokenizer, prompts,
                                    jax.random.PRNGKey(config.seed), prompt_len=s.prompt_len,
                                    batch_size=s.batch_size, mesh=layout.mesh)
  rows = []
  for c in completions:
    row = dict(prompt=c.prompt, completion=c.text, ended=c.ended, log_prob=c.log_prob)
    if task is not None:
      row["gold_score"] = task.score(c.prompt, c.text)
    rows.append(row)
    if jax.process_index() == 0:
      gold = f"  [gold {row['gold_score']:.2f}]" if "gold_score" in row else ""
      print(f"--- prompt ---\n{c.prompt}\n--- completion{gold} ---\n{c.text}\n", flush=True)
  if jax.process_index() == 0:
    records.write_jsonl(os.path.join(workdir, "samples.jsonl"), rows)
  return {"num_samples": len(rows)}
