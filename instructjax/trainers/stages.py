"""Which trainer runs each `config.stage` (kept apart from experiments/run.py, whose absl flags can
be defined only once per process), and the settings checks every stage runs before its step 0.

A stage that samples — SFT's gold-score evaluation, the reward model's comparisons and
normalisation, PPO's rollouts, the evaluation — checks its sampling settings before it trains
(`check_sampling`), so that a trained model is never thrown away by a late error. Each trainer
module's `check_settings(config, layout, model_cfg, trained)` checks everything its stage will
use; the pipeline runs every stage's before its first stage trains (`check_settings` below).
"""
from __future__ import annotations

import importlib

# config.stage -> the module under instructjax/trainers whose `run(config, workdir)` runs it.
STAGES = {
    "pretrain": "lm",
    "sft": "lm",
    "reward": "reward",
    "ppo": "ppo",
    "sample": "sample",
    "evaluate": "evaluate",
    "pipeline": "pipeline",
}


def _module(stage: str):
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not one of {sorted(STAGES)}")
  return importlib.import_module(f"instructjax.trainers.{STAGES[stage]}")


def stage_runner(stage: str):
  """The `run(config, workdir)` of a stage, imported lazily so that `--help` stays fast."""
  return _module(stage).run


def check_settings(config, layout, model_cfg, trained=None) -> None:
  """The stage's own settings checks (`check_settings` of its trainer module; none for a stage
  without one). `model_cfg` is the ModelConfig the stage will run with (None for the
  evaluation, which reads each model's); `trained` maps workdirs that do not exist yet (a
  pipeline's later stages) to the ModelConfig they will hold."""
  check = getattr(_module(config.stage), "check_settings", None)
  if check is not None:
    check(config, layout, model_cfg, trained)


def check_sampling(sampling, layout, model_cfg, *, greedy: bool = False) -> None:
  """The one rule for a `sampling` section a stage samples with: a valid SamplingConfig,
  prompt_len >= 1, prompt_len + max_new_tokens within the model's learned positions
  (`common.check_seq_len`), and batch_size divisible over the mesh's batch shards and the
  processes (`parallel.check_global_batch`)."""
  from instructjax import parallel
  from instructjax.errors import InputError
  from instructjax.trainers import common
  where = "config.sampling"
  try:
    common.sampling_config(sampling, greedy)
  except InputError as e:
    raise InputError(where, e.problem) from None
  prompt_len = sampling.prompt_len
  if not isinstance(prompt_len, int) or prompt_len < 1:
    raise InputError(f"{where}.prompt_len", f"must be an integer >= 1, got {prompt_len!r}")
  common.check_seq_len(model_cfg, prompt_len + sampling.max_new_tokens,
                       f"{where}: prompt_len {prompt_len} + max_new_tokens "
                       f"{sampling.max_new_tokens}")
  parallel.check_global_batch(sampling.batch_size, layout.mesh, f"{where}.batch_size",
                              rules=layout.rules)
