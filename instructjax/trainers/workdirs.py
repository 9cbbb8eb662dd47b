"""What a stage left in its workdir, read back: the config it ran with and a model restored from
its latest checkpoint onto any layout. Every stage that starts from another (the reward model and
PPO from SFT, PPO from the reward model, evaluation and sampling from any) reads it through here.

A workdir holds `config.json` (written by every trainer) and `checkpoints/` (orbax). Callers may
name either the workdir or its `checkpoints/` directory.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from instructjax import checkpoint, parallel
from instructjax.errors import InputError
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel, ScalarModel
from instructjax.trainers import common

# A reward model's normalisation (gain, bias), kept in its final checkpoint's extra and a file.
NORMALISATION_FILE = "reward_normalisation.json"
NORMALISATION_KEY = "reward_normalisation"
# Where each stage keeps its language model inside the train state.
POLICY_PATHS = {"pretrain": ("params",), "sft": ("params",), "ppo": ("params", "policy")}


def stage_dir(path: str) -> str:
  """The workdir of `path`, which may name the workdir or its checkpoints/ directory."""
  path = path.rstrip("/")
  return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def read_config(path: str, required: str | None = None) -> ml_collections.ConfigDict | None:
  """The config a stage ran with (its workdir's config.json). Missing: None, or with
  `required` (what the caller needed the workdir for) an InputError naming the file."""
  file = os.path.join(stage_dir(path), "config.json")
  if not os.path.isfile(file):
    if required:
      raise InputError(file, f"not found: {path} is not a finished stage's workdir ({required})")
    return None
  with open(file) as f:
    return ml_collections.ConfigDict(json.load(f))


def policy_path(trained: ml_collections.ConfigDict | None) -> tuple[str, ...]:
  """Where the language model sits in a stage's checkpoint (PPO keeps it under "policy")."""
  stage = trained.get("stage", "sft") if trained is not None else "sft"
  return POLICY_PATHS.get(stage, ("params",))


def handle(model_fn: Callable[[nnx.Rngs], nnx.Module], model_cfg: ModelConfig,
           layout: common.Layout) -> common.ModelHandle:
  """Graph and parameter layout of a model on `layout` (its logical axes through the rules)."""
  graphdef, abstract = common.split_model(model_fn)
  specs = parallel.param_specs(abstract, layout.rules, layout.mesh)
  return common.ModelHandle(graphdef, model_cfg, parallel.named(layout.mesh, specs))


def restore_model(path: str, model_cls, model_cfg: ModelConfig, layout: common.Layout,
                  in_checkpoint: tuple[str, ...] = ("params",)
                  ) -> tuple[common.ModelHandle, Any]:
  """(handle, params) of `model_cls` (LanguageModel or ScalarModel) from the latest checkpoint
  of the workdir `path`, restored straight onto `layout`'s shardings (the mesh may differ from
  the one it was trained on); `in_checkpoint` is where the parameters sit in the state."""
  model_fn = lambda rngs: model_cls(model_cfg, rngs=rngs)
  model = handle(model_fn, model_cfg, layout)
  _, abstract = common.split_model(model_fn)
  target = common.abstract_with_shardings(nnx.to_pure_dict(abstract), model.param_shardings)
  params = checkpoint.restore_subtree(common.checkpoint_dir(path), target, path=in_checkpoint)
  return model, params


def restore_policy(path: str, model_cfg: ModelConfig, layout: common.Layout,
                   trained: ml_collections.ConfigDict | None = None):
  """The language model of a pretrain, SFT or PPO workdir: (handle, params)."""
  trained = trained if trained is not None else read_config(path)
  return restore_model(path, LanguageModel, model_cfg, layout, policy_path(trained))


def restore_scalar(path: str, layout: common.Layout):
  """A reward model's workdir: (handle, params), its ModelConfig rebuilt from its config.json."""
  trained = read_config(path, required="a reward model")
  model_cfg = common.ran_with(trained, common.tokenizer_from_config(trained))
  return restore_model(path, ScalarModel, model_cfg, layout)


def latest_step(path: str) -> int | None:
  """The latest checkpointed step of a workdir, or None."""
  steps = checkpoint.Checkpointer(common.checkpoint_dir(path), save_every=1, keep=1)
  try:
    return steps.latest_step()
  finally:
    steps.close()


def checkpoint_extra(directory: str, step: int) -> dict[str, Any]:
  """The JSON `extra` saved with checkpoint `step` (data position, stage facts)."""
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"extra": ocp.JsonCheckpointHandler()})
  try:
    return manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
  finally:
    manager.close()


def read_normalisation(path: str) -> tuple[float, float]:
  """(gain, bias) of a finished reward-model run: the final checkpoint's, else the JSON file's."""
  workdir = stage_dir(path)
  directory = common.checkpoint_dir(workdir)
  latest = latest_step(workdir)
  stored = checkpoint_extra(directory, latest).get(NORMALISATION_KEY) if latest else None
  if not stored:
    file = os.path.join(workdir, NORMALISATION_FILE)
    if not os.path.isfile(file):
      raise InputError(workdir, f"no reward normalisation in its last checkpoint or in "
                       f"{NORMALISATION_FILE}; was the run finished with config.normalise=True?")
    with open(file) as f:
      stored = json.load(f)
  return float(stored["gain"]), float(stored["bias"])


def load_reward_model(path: str, layout: common.Layout):
  """A trained reward model: (graphdef, params, model_cfg, gain, bias).

  Params come from the latest checkpoint, restored straight onto `layout`'s shardings (the mesh
  may differ from training's); the model config is rebuilt from the run's config.json. The
  reward PPO uses is `gain * r + bias`: mean 0, std 1 on the SFT policy's samples of the PPO
  prompts.
  """
  model, params = restore_scalar(path, layout)
  gain, bias = read_normalisation(path)
  return model.graphdef, params, model.cfg, gain, bias
