"""The PPO-ptx stage (InstructGPT step 3): a thin loop around `objectives/ppo.py`.

  models   policy and reference from the SFT checkpoint (`init_from`); the reference is frozen
           (no optimizer state) and, like the reward model, may be stored in bfloat16
           (`frozen_dtype`). Value model from the reward model (`reward_from`;
           `ppo.value_init="reward"`) or a zero head on the SFT backbone ("zero"), optionally
           with the head's scale and bias refitted to the first rollout's returns
           (`ppo.value_head_fit="first_rollout"`, kept in value_head_fit.json). The reward
           model is frozen with its normalisation (gain, bias); with `reward_source="gold"`
           the synthetic task's gold scorer takes its place (an oracle, scored on the host).
           Every model is sharded on the mesh by its parameters' logical axes; both optimizer
           states mirror their models.
  data     prompts: the synthetic task's "ppo" split or JSONL {"prompt"} files, a grain stream of
           fixed-shape left-padded batches, repeated forever and reshuffled every epoch.
           ptx: packed pretraining rows (synthetic corpus or files), ppo_epochs *
           num_minibatches minibatches of `ptx.batch_size` rows per iteration; with
           ptx_coef == 0 this stream is never built (the held-out split still is, for the
           alignment-tax metric). Both iterators' positions are checkpointed.
  loop     one iteration = four jitted phases, each timed on the host:
             rollout    the Sampler (KV cache, while_loop) draws responses of the policy;
             score      log-probs of policy and reference, values, reward-model scores;
             advantage  KL-shaped rewards, GAE, whitening, rollout metrics;
             update     ppo_epochs x num_minibatches optimiser steps in one scan (state donated),
                        then the adaptive KL controller (kl_coef lives in the state).
           A checkpoint step is an iteration; the state's `step` counts optimiser steps.
  metrics  at log steps: RM score (raw and normalised), KL to the reference per response, beta,
           entropy, clip fractions, approx KL, losses, explained variance, response length, EOS
           fraction, grad norms, seconds per phase, rollouts/s and, on the synthetic task, the
           gold score of the rollouts (so RM score and gold score can be plotted against KL).
           At eval steps (and at step 0 with `eval_at_start`): the greedy gold score on held-out
           "eval" prompts and the held-out pretraining loss (`eval_ptx_loss`, the alignment tax).

Timing: the host blocks at the end of every phase. The phases depend on each other anyway, so
this only gives up the overlap of dispatching one phase while the previous one runs (about a
millisecond), and it makes every phase's time exact rather than only the iteration's.

Resuming (the same command on the same workdir) restores the whole RL state: both models and
their optimizers, the optimiser step, the RNG, beta and both data positions; the rollout key is
derived from the state's RNG and the iteration, so a killed and resumed run ends bit for bit
where an unbroken one ends (same mesh). A non-finite loss or gradient stops the run before it
saves (`loop.stop_if_nonfinite`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from instructjax import parallel
from instructjax.data import pipeline, records
from instructjax.errors import InputError
from instructjax.models.decoder import LanguageModel, ScalarModel
from instructjax.objectives import ppo, sft
from instructjax.sampling import SampleOutput, Sampler
from instructjax.trainers import common, data_sources, loop, sft_eval, workdirs
from instructjax.trainers.data_sources import lm_sources, synthetic_task
from instructjax.trainers.workdirs import load_reward_model

VALUE_INITS = ("reward", "zero")
# none: the value head as value_init leaves it. first_rollout: before the first update, the head's
# scale and bias are refitted (least squares, objectives.ppo.value_affine_fit) so the values of
# the first rollout match its returns as GAE computes them (whitening, gamma, lambda included).
VALUE_HEAD_FITS = ("none", "first_rollout")
VALUE_HEAD_FIT = "value_head_fit.json"
# model: the reward model of `reward_from`. gold: the synthetic task's gold scorer as an oracle
# reward, to tell a reward model's errors from PPO's own (reward-model overoptimisation studies).
REWARD_SOURCES = ("model", "gold")
GOLD_NORMALISATION = "gold_normalisation.json"
FROZEN_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TRAINER_ONLY_PPO_FIELDS = ("value_init", "value_head_fit")
PHASES = ("rollout", "score", "advantage", "update")
# Keeps the rollout keys apart from the update's shuffle keys, which also derive from state rng.
_ROLLOUT_SALT = 0x526F6C6C


# ----------------------------------------------------------------------------- config


def ppo_config(config: ml_collections.ConfigDict) -> ppo.PPOConfig:
  """The objective's PPOConfig from `config.ppo` (without the trainer's own fields)."""
  fields = {k: v for k, v in config.ppo.to_dict().items() if k not in TRAINER_ONLY_PPO_FIELDS}
  return ppo.PPOConfig.from_mapping(fields)


def check_config(config, cfg: ppo.PPOConfig, layout: common.Layout) -> None:
  """Everything that can be wrong before a model is loaded, reported as InputError."""
  if not config.init_from:
    raise InputError("config.init_from", "PPO needs the SFT workdir (policy and reference)")
  if config.reward_source not in REWARD_SOURCES:
    raise InputError("config.reward_source", f"{config.reward_source!r} is not one of "
                     f"{REWARD_SOURCES}")
  if config.reward_source == "gold":
    if config.data.source != "synthetic":
      raise InputError("config.reward_source", "'gold' scores with the synthetic task's gold "
                       "scorer, so it needs config.data.source='synthetic'")
    if config.ppo.value_init == "reward" and not config.reward_from:
      raise InputError("config.ppo.value_init", "'reward' starts the value model from "
                       "config.reward_from, which is empty; give it or use value_init='zero'")
  elif not config.reward_from:
    raise InputError("config.reward_from", "PPO needs the reward model's workdir")
  if config.ppo.value_init not in VALUE_INITS:
    raise InputError("config.ppo.value_init", f"{config.ppo.value_init!r} is not one of "
                     f"{VALUE_INITS}")
  if config.ppo.value_head_fit not in VALUE_HEAD_FITS:
    raise InputError("config.ppo.value_head_fit", f"{config.ppo.value_head_fit!r} is not one of "
                     f"{VALUE_HEAD_FITS}")
  if config.frozen_dtype not in FROZEN_DTYPES:
    raise InputError("config.frozen_dtype", f"{config.frozen_dtype!r} is not one of "
                     f"{sorted(FROZEN_DTYPES)}")
  if config.sampling.temperature != cfg.temperature:
    raise InputError("config.sampling.temperature", f"{config.sampling.temperature} differs from "
                     f"ppo.temperature {cfg.temperature}: PPO's ratio needs the sampler's "
                     "distribution")
  if config.iterations < 1:
    raise InputError("config.iterations", f"must be >= 1, got {config.iterations}")
  parallel.check_global_batch(config.rollout_batch_size, layout.mesh,
                              "config.rollout_batch_size", rules=layout.rules)
  if config.rollout_batch_size % cfg.num_minibatches:
    raise InputError("config.rollout_batch_size", f"{config.rollout_batch_size} episodes do not "
                     f"split into {cfg.num_minibatches} minibatches (ppo.num_minibatches)")
  if config.ptx.source not in ("synthetic", "files", "none"):
    raise InputError("config.ptx.source", f"{config.ptx.source!r} is not synthetic, files or none")
  if cfg.ptx_coef > 0:
    if config.ptx.source == "none":
      raise InputError("config.ptx.source", "is 'none' but ppo.ptx_coef > 0 needs pretraining "
                       "text (or set ppo.ptx_coef=0 for plain PPO)")
    parallel.check_global_batch(config.ptx.batch_size, layout.mesh, "config.ptx.batch_size",
                                rules=layout.rules)
  ppo.check_micro_batches(config.rollout_batch_size // cfg.num_minibatches,
                          config.ptx.batch_size if cfg.ptx_coef > 0 else None, cfg.grad_accum,
                          parallel.batch_divisor(layout.mesh, layout.rules),
                          where=("config.rollout_batch_size", "config.ptx.batch_size"))
  if config.ptx.source != "none" or config.data.source == "synthetic":
    parallel.check_global_batch(config.sampling.batch_size, layout.mesh,
                                "config.sampling.batch_size", rules=layout.rules)


def check_settings(config, layout: common.Layout, model_cfg, trained=None) -> None:
  """Everything the stage uses after step 0, checked before it: `check_config`, the cadence,
  rollouts (prompt_len + max_new_tokens) within the policy's positions and the reward model's
  (which scores them; read from `reward_from`'s config.json, or `trained[reward_from]` for a
  reward model a pipeline has still to train), the ptx rows, the prompt and ptx files, and the
  held-out greedy evaluation on the synthetic task (`sft_eval.check_settings`)."""
  cfg = ppo_config(config)
  check_config(config, cfg, layout)
  loop.check_cadence(config)
  s = config.sampling
  rollout, where = s.prompt_len + s.max_new_tokens, "config.sampling.prompt_len + max_new_tokens"
  common.check_seq_len(model_cfg, rollout, where)
  if config.reward_source == "model" or config.ppo.value_init == "reward":
    reward_cfg = (trained or {}).get(config.reward_from)
    stored = None if reward_cfg else workdirs.read_config(config.reward_from)
    if stored is not None:
      common.check_same_tokenizer(config, common.tokenizer_from_config(config), stored,
                                  config.reward_from, "config.reward_from")
      reward_cfg = common.ran_with(stored, common.tokenizer_from_config(stored))
    if reward_cfg is not None:
      common.check_seq_len(reward_cfg, rollout, f"{where} (scored by the reward model)")
  if config.ptx.source != "none":
    common.check_seq_len(model_cfg, config.ptx.seq_len, "config.ptx.seq_len")
  if config.data.source == "files":
    data_sources.check_files(config, "data.files")
  if config.ptx.source == "files":
    data_sources.check_files(config, "ptx.files", "ptx.eval_files")
  if config.data.source == "synthetic":
    sft_eval.check_settings(config, layout, model_cfg)


def make_optimizers(config, total_steps: int):
  """One AdamW per model (the value model's lr is `value_lr`, default the policy's)."""
  optimizers, schedules = {}, {}
  lr = config.optimizer.lr
  for name, lr in (("policy", lr), ("value", config.value_lr or lr)):
    schedules[name], optimizers[name] = common.make_optimizer(config.optimizer, total_steps, lr)
  return optimizers, schedules


# ----------------------------------------------------------------------------- data


def prompt_records(config, task) -> list[dict]:
  """The PPO prompts: the synthetic task's "ppo" split, or the user's JSONL files."""
  if config.data.source == "synthetic":
    return [{"prompt": p, "source": f"synthetic ppo prompt {i}"}
            for i, p in enumerate(task.prompts(config.data.num_prompts, "ppo"))]
  if config.data.source == "files":
    paths = data_sources.split_paths(config.data.files, "config.data.files")
    if not paths:
      raise InputError("config.data.files", "source=files needs at least one prompt file")
    prompts = [record for path in paths for record in records.read_prompts(path)]
    if not prompts:
      raise InputError("config.data.files", "no prompts in " + ", ".join(map(str, paths)))
    return prompts
  raise InputError("config.data.source", f"{config.data.source!r} is not 'synthetic' or 'files'")


def ptx_sources(config, workdir: str) -> dict | None:
  """Train and validation sources of the pretraining text (None for ptx.source "none")."""
  x = config.ptx
  if x.source == "none":
    return None
  if x.source == "files":
    if not data_sources.split_paths(x.files, "config.ptx.files"):
      raise InputError("config.ptx.files", "ptx.source=files needs at least one file")
    data_sources.split_paths(x.eval_files, "config.ptx.eval_files")
  # The pretraining stage's own data path, pointed at the ptx section.
  view = ml_collections.ConfigDict(dict(
      data=dict(source=x.source, format="text", train_files=x.files, eval_files=x.eval_files,
                num_train=x.num_train, num_eval=x.num_eval),
      synthetic=config.synthetic.to_dict()))
  return lm_sources(view, workdir)


class Streams:
  """The prompt and pretraining iterators, checkpointed together as one position."""

  def __init__(self, prompts, ptx=None):
    self.prompts, self.ptx = prompts, ptx

  def get_state(self) -> dict[str, Any]:
    return {"prompts": self.prompts.get_state(),
            "ptx": None if self.ptx is None else self.ptx.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self.prompts.set_state(state["prompts"])
    if self.ptx is not None:
      if state.get("ptx") is None:
        raise InputError("checkpoint", "has no pretraining-stream position: it was written "
                         "with ptx_coef=0; resume it with the same ptx_coef")
      self.ptx.set_state(state["ptx"])


@dataclasses.dataclass
class Data:
  records: list[dict]                 # the prompts (gold scoring reads their text back)
  streams: Streams
  ptx_eval: Callable[[], Any] | None  # one pass over the held-out pretraining rows
  stats: pipeline.PipelineStats


def datasets(config, workdir: str, tokenizer, task, cfg: ppo.PPOConfig) -> Data:
  n_proc, index = jax.process_count(), jax.process_index()
  stats = pipeline.PipelineStats()
  prompts = prompt_records(config, task)
  prompt_ds = pipeline.prompt_dataset(
      prompts, tokenizer, prompt_len=config.sampling.prompt_len,
      batch_size=config.rollout_batch_size // n_proc, seed=config.seed, stats=stats,
      process_index=index, process_count=n_proc)
  sources = ptx_sources(config, workdir)
  ptx_iter, ptx_eval = None, None
  if sources is not None:
    kwargs = dict(seq_len=config.ptx.seq_len, process_index=index, process_count=n_proc)
    if cfg.ptx_coef > 0:
      ptx_iter = iter(pipeline.pretrain_dataset(
          sources["train"], tokenizer, batch_size=config.ptx.batch_size // n_proc,
          seed=config.seed, **kwargs))
    ptx_eval = lambda: iter(pipeline.eval_dataset(
        sources["validation"], tokenizer, kind="pretrain",
        batch_size=config.sampling.batch_size // n_proc, **kwargs))
  return Data(prompts, Streams(iter(prompt_ds), ptx_iter), ptx_eval, stats)


def next_ptx_batch(streams: Streams, minibatches: int) -> dict[str, np.ndarray] | None:
  """This process's rows of one iteration's pretraining batch, [minibatches, b, T]."""
  if streams.ptx is None:
    return None
  rows = [next(streams.ptx) for _ in range(minibatches)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Models:
  """Graph, config and parameter layout of each model."""
  policy: common.ModelHandle      # also the reference's
  value: common.ModelHandle
  reward: common.ModelHandle | None  # None for the gold reward


@dataclasses.dataclass
class Sources:
  """What a fresh run's train state starts from, read from disk once by `load_models`: the SFT
  policy and, when the value starts from it, the reward model with its normalisation."""
  policy: Any
  reward: Any | None = None
  gain: float = 1.0
  bias: float = 0.0


def _frozen_copy(params, dtype, shardings, keep_source: bool):
  """`params` in `dtype` for a frozen model. A copy when the source still seeds the train state
  (which the update donates, so no buffer may be shared); else cast in place."""
  cast = lambda p: jax.tree.map(lambda x: jnp.copy(x).astype(dtype), p)
  return jax.jit(cast, out_shardings=shardings,
                 donate_argnums=() if keep_source else 0)(params)


def load_models(config, layout, model_cfg, fresh: bool
                ) -> tuple[Models, dict[str, Any], Sources | None]:
  """The models' layouts, and the frozen ones score_phase reads: the SFT reference and the reward
  model with its normalisation, stored in `frozen_dtype`. Each checkpoint is read once: on a
  `fresh` run the parameters read also seed the train state (returned as `Sources`), on a resumed
  one the state comes from the workdir's checkpoint and they are only frozen. With the gold
  reward there is no reward model, and its normalisation is set after the first rollout
  (`gold_normalisation`)."""
  dtype = FROZEN_DTYPES[config.frozen_dtype]
  policy, sft_params = workdirs.restore_model(config.init_from, LanguageModel, model_cfg, layout)
  sources = Sources(policy=sft_params) if fresh else None
  frozen = dict(reference=_frozen_copy(sft_params, dtype, policy.param_shardings, fresh))
  reward, reward_cfg, value_from_reward = None, None, False
  if config.reward_source == "model" or config.ppo.value_init == "reward":
    graphdef, params, reward_cfg, gain, bias = load_reward_model(config.reward_from, layout)
    value_from_reward = fresh and config.ppo.value_init == "reward"
    if value_from_reward:
      sources.reward, sources.gain, sources.bias = params, gain, bias
  if config.reward_source == "model":
    reward = common.ModelHandle(graphdef, reward_cfg, jax.tree.map(lambda x: x.sharding, params))
    frozen["reward"] = _frozen_copy(params, dtype, reward.param_shardings, value_from_reward)
    frozen.update(_gain_and_bias(gain, bias, layout.mesh))
  else:  # The gold reward's normalisation: a placeholder until the first rollout fits it.
    frozen.update(_gain_and_bias(1.0, 0.0, layout.mesh))
  # The value model is a copy of the reward model, or the policy's backbone under a new head.
  value_cfg = reward_cfg if config.ppo.value_init == "reward" else model_cfg
  value_graphdef, value_abstract = common.split_model(
      lambda rngs: ScalarModel(value_cfg, rngs=rngs))
  value_specs = parallel.param_specs(value_abstract, layout.rules, layout.mesh)
  value = common.ModelHandle(value_graphdef, value_cfg, parallel.named(layout.mesh, value_specs))
  return Models(policy, value, reward), frozen, sources


def _gain_and_bias(gain, bias, mesh) -> dict[str, jax.Array]:
  replicated = parallel.replicated(mesh)
  return dict(reward_gain=jax.device_put(jnp.float32(gain), replicated),
              reward_bias=jax.device_put(jnp.float32(bias), replicated))


def gold_normalisation(workdir: str, first_scores: np.ndarray | None) -> tuple[float, float]:
  """The gold reward's (gain, bias): mean 0 and std 1 on the gold scores of the first rollout
  (the SFT policy's samples, as the reward model's normalisation uses SFT samples), fitted once
  and kept in `<workdir>/gold_normalisation.json` so a resumed run uses the same."""
  path = os.path.join(workdir, GOLD_NORMALISATION)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    return float(saved["gain"]), float(saved["bias"])
  # All-equal scores (a policy that always answers alike) have no spread to scale: only centre.
  target_std = 1.0 if np.std(first_scores) > 1e-6 else None
  gain, bias = (float(x) for x in ppo.reward_normalisation(first_scores, 0.0, target_std))
  if jax.process_index() == 0:
    common.save_json(path, dict(gain=gain, bias=bias, reference="gold scores of the first "
                                f"rollout ({len(first_scores)} SFT samples)"))
  return gain, bias


def _abstract_params(handle: common.ModelHandle, model_cls) -> Any:
  _, abstract = common.split_model(lambda rngs: model_cls(handle.cfg, rngs=rngs))
  return common.abstract_with_shardings(nnx.to_pure_dict(abstract), handle.param_shardings)


def fold_normalisation(scalar_params, gain, bias):
  """The scalar model whose output is `gain * output + bias`: the normalisation folded into its
  head, which is linear, so the value function starts on the normalised reward's scale."""
  return dict(scalar_params, head_w=scalar_params["head_w"] * gain,
              head_b=scalar_params["head_b"] * gain + bias)


def initial_value_params(config, models: Models, sources: Sources):
  """The value model at the start: the reward model ("reward"), or the SFT backbone under a
  zero head ("zero": every value is 0, so the first advantages are the rewards-to-go).

  From the reward model, the reward normalisation is folded into the head when PPO normalises
  rewards (as in lm-human-preferences, whose RM carries its gain and bias): otherwise the first
  values sit on the raw RM scale (a mean of -2.5 and std 4.9 in one tiny run) while the returns
  are on the normalised one, and the advantages of the first iterations are mostly value error.
  """
  if config.ppo.value_init == "reward":
    # The reward model of reward_from, even when PPO's reward is the gold scorer.
    if not config.ppo.normalise_reward:
      return sources.reward
    return jax.jit(fold_normalisation, donate_argnums=0)(
        sources.reward, jnp.float32(sources.gain), jnp.float32(sources.bias))
  abstract = _abstract_params(models.value, ScalarModel)
  zeros = lambda name: jax.device_put(jnp.zeros(abstract[name].shape, abstract[name].dtype),
                                      abstract[name].sharding)
  # A copy: the policy's backbone buffers go into the state too, and each is donated once.
  backbone = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(sources.policy["backbone"])
  return {"backbone": backbone, "head_w": zeros("head_w"), "head_b": zeros("head_b")}


def state_shardings(models: Models, optimizers, layout, cfg: ppo.PPOConfig, seed: int):
  """Abstract train state (the layout in objectives/ppo.py) and its shardings."""
  spec = lambda s: s.spec
  p_specs = {"policy": jax.tree.map(spec, models.policy.param_shardings),
             "value": jax.tree.map(spec, models.value.param_shardings)}
  abstract_params = {"policy": _abstract_params(models.policy, LanguageModel),
                     "value": _abstract_params(models.value, ScalarModel)}
  P = PartitionSpec
  specs = dict(params=p_specs,
               opt_state={name: common.opt_state_specs(optimizers[name], abstract_params[name],
                                                       p_specs[name]) for name in p_specs},
               step=P(), rng=P(), kl_coef=P(), bad_steps=P())
  shardings = parallel.named(layout.mesh, specs)
  shapes = jax.eval_shape(lambda p, v: ppo.init_state(p, v, optimizers, cfg, seed),
                          abstract_params["policy"], abstract_params["value"])
  return common.abstract_with_shardings(shapes, shardings), shardings


# ----------------------------------------------------------------------------- phases


def ptx_sharding(mesh) -> NamedSharding:
  """[minibatches, rows, T]: the rows of each minibatch over the batch axes."""
  return parallel.batch_sharding(mesh, 3, leading=1)


def _rollout(prompt_tokens, prompt_mask, response_tokens, response_mask) -> dict[str, jax.Array]:
  """The objective's rollout layout from left-padded prompts and the sampler's responses."""
  return dict(tokens=jnp.concatenate([prompt_tokens, response_tokens], axis=1),
              mask=jnp.concatenate([prompt_mask.astype(jnp.int32), response_mask], axis=1),
              response_mask=response_mask)


@dataclasses.dataclass
class Phases:
  rollout: Sampler   # (policy params, prompt tokens, prompt mask, key) -> SampleOutput
  score: Callable    # (params, frozen, prompt tokens/mask, SampleOutput, gold score) -> rollout
  advantage: Callable  # (scored rollout, kl_coef) -> (rollout, metrics)
  update: Callable   # (state, rollout, ptx | None) -> (state, metrics); state donated
  value_fit: Callable  # (scored rollout, kl_coef) -> objectives.ppo.value_head_fit's dict
  fold: Callable     # (value params, scale, bias) -> value params; params donated


def jit_phases(config, layout, models: Models, frozen, shardings, optimizers,
               cfg: ppo.PPOConfig, tokenizer) -> Phases:
  """The four phases, jitted with explicit shardings: every per-episode array is split over the
  batch axes (data x fsdp), parameters and optimizer states follow their specs."""
  s, mesh = config.sampling, layout.mesh
  sampler = common.sampler(models.policy, common.sampling_config(s), tokenizer, layout)

  def score(params, frozen, prompt_tokens, prompt_mask, sample, score_raw):
    rollout = _rollout(prompt_tokens, prompt_mask, sample.tokens, sample.mask)
    rollout["sample_logp"] = sample.log_probs  # the sampler-vs-trainer gap (see objectives.ppo)
    if score_raw is not None:  # the gold reward, scored on the host
      rollout["score_raw"] = score_raw
    return ppo.score_phase(params, frozen, rollout,
                           policy_graphdef=models.policy.graphdef,
                           value_graphdef=models.value.graphdef,
                           reward_graphdef=models.reward and models.reward.graphdef, cfg=cfg,
                           eos_id=tokenizer.eos_id)

  # Every rollout array has the episode as its leading dimension: one sharding fits them all.
  episodes = parallel.batch_sharding(mesh, 1)
  whole = parallel.replicated(mesh)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  samples = SampleOutput(episodes, episodes, episodes, whole)
  score_jit = jax.jit(score, in_shardings=(shardings["params"], frozen_shardings, episodes,
                                           episodes, samples, episodes),
                      out_shardings=episodes)
  advantage_jit = jax.jit(functools.partial(ppo.advantage_phase, cfg=cfg),
                          in_shardings=(episodes, whole), out_shardings=(episodes, whole))
  update = functools.partial(ppo.ppo_update, policy_graphdef=models.policy.graphdef,
                             value_graphdef=models.value.graphdef, optimizers=optimizers,
                             cfg=cfg)
  update_jit = jax.jit(update, in_shardings=(shardings, episodes, ptx_sharding(mesh)),
                       out_shardings=(shardings, whole), donate_argnums=0)
  value_fit_jit = jax.jit(functools.partial(ppo.value_head_fit, cfg=cfg),
                          in_shardings=(episodes, whole), out_shardings=whole)
  value_shardings = shardings["params"]["value"]
  fold_jit = jax.jit(fold_normalisation, in_shardings=(value_shardings, whole, whole),
                     out_shardings=value_shardings, donate_argnums=0)
  return Phases(sampler, score_jit, advantage_jit, update_jit, value_fit_jit, fold_jit)


# ----------------------------------------------------------------------------- metrics




def rollout_gold_scores(task, tokenizer, prompts: list[dict], indices, response_tokens,
                        response_mask) -> np.ndarray:
  """Gold score of each of the rollout's responses (their text, EOS and padding dropped) against
  the full text of its prompt, [episodes] float32, the same on every process."""
  indices, tokens, mask = parallel.to_host((indices, response_tokens, response_mask))
  scores = []
  for index, row, real in zip(np.asarray(indices), np.asarray(tokens), np.asarray(mask)):
    ids = [t for t, m in zip(row, real) if m]
    scores.append(task.score(prompts[int(index)]["prompt"], tokenizer.decode(ids)))
  return np.asarray(scores, np.float32)


def named_metrics(rollout_metrics: dict[str, float], update_metrics: dict[str, float]):
  """Both phases' metrics, with the names the evaluation's curves and the report read."""
  out = dict(rollout_metrics)
  out.update(update_metrics)
  out.update(rm_score=rollout_metrics["score"], rm_score_raw=rollout_metrics["score_raw"],
             kl=rollout_metrics["kl_sequence"], beta=update_metrics["kl_coef"],
             ended_fraction=rollout_metrics["eos_fraction"])
  return out


def evaluate(config, task, state, models: Models, tokenizer, layout, ptx_eval, eval_step):
  """Held-out: greedy gold score on "eval" prompts (synthetic task) and pretraining loss."""
  out = {}
  policy = state["params"]["policy"]
  if task is not None:
    out.update(sft_eval.gold_score_eval(config, task, policy, models.policy,
                                        tokenizer, layout))
  if ptx_eval is not None:
    losses = loop.heldout_loss(eval_step, policy, ptx_eval, layout, config.ptx.eval_batches)
    out.update(eval_ptx_loss=losses["eval_loss"], eval_ptx_perplexity=losses["eval_perplexity"])
  return out


# ----------------------------------------------------------------------------- the loop


def _create_state(config, models, sources: Sources, optimizers, cfg, shardings):
  """A fresh state: the SFT policy and the initial value model, with new optimizer states."""
  value = initial_value_params(config, models, sources)
  init = lambda p, v: ppo.init_state(p, v, optimizers, cfg, config.seed)
  state = jax.jit(init, out_shardings=shardings, donate_argnums=(0, 1))(sources.policy, value)
  reward = (config.reward_from if config.reward_source == "model"
            else "the synthetic task's gold scorer")
  value = (config.reward_from if config.ppo.value_init == "reward"
           else "a zero head on the SFT backbone")
  print(f"[{config.stage}] policy and reference from {config.init_from}; value from {value}; "
        f"reward from {reward}", flush=True)
  return state


def rollout_key(state_rng, iteration: int):
  return jax.random.fold_in(jax.random.fold_in(state_rng, _ROLLOUT_SALT), iteration)


class Iteration:
  """One PPO iteration, the shared loop's step: rollout, score, advantage and update, each timed
  on the host (seconds per phase and per iteration, data included, summed until the next log
  step, where `host_metrics` reports and resets them)."""

  def __init__(self, config, cfg: ppo.PPOConfig, phases: Phases, data: Data, frozen, layout,
               task, tokenizer, workdir: str, schedule, fit_value_head: bool = False):
    self.config, self.cfg, self.phases, self.data = config, cfg, phases, data
    self.frozen, self.layout, self.task, self.tokenizer = frozen, layout, task, tokenizer
    self.workdir, self.schedule = workdir, schedule
    self.minibatches = cfg.ppo_epochs * cfg.num_minibatches
    self.gold_fitted = False  # the gold reward's normalisation, read or fitted at the first rollout
    self.fit_value_head = fit_value_head  # value_head_fit: still to do, at this run's 1st rollout
    self.last = None          # the last rollout's (prompt indices, sample, gold scores)
    self._reset_window()

  def _reset_window(self):
    self.window = dict.fromkeys((*PHASES, "iteration"), 0.0)
    self.iterations = 0

  def _timed(self, phase: str, outputs, started: float) -> float:
    """Waits for a phase's outputs and adds its seconds to the window; returns the time now."""
    jax.block_until_ready(outputs)
    now = time.perf_counter()
    self.window[phase] += now - started
    return now

  def __call__(self, state, iteration: int):
    mesh, streams = self.layout.mesh, self.data.streams
    iteration_started = time.perf_counter()
    batch = next(streams.prompts)
    indices = batch.pop("index")
    prompts = parallel.global_batch(batch, mesh)
    ptx_local = next_ptx_batch(streams, self.minibatches)
    ptx_rows = None if ptx_local is None else {
        k: jax.make_array_from_process_local_data(ptx_sharding(mesh), v)
        for k, v in ptx_local.items()}

    started = time.perf_counter()
    sample = self.phases.rollout(state["params"]["policy"], prompts["tokens"], prompts["mask"],
                                 rollout_key(state["rng"], iteration))
    started = self._timed("rollout", sample, started)
    gold, gold_reward = self._gold_reward(indices, sample)
    scored = self.phases.score(state["params"], self.frozen, prompts["tokens"], prompts["mask"],
                               sample, gold_reward)
    started = self._timed("score", scored, started)
    fit_metrics = {}
    if self.fit_value_head:
      state, scored, fit_metrics = self._fit_value_head(state, prompts, sample, gold_reward,
                                                        scored)
      started = self._timed("score", scored, started)
    rollout, rollout_metrics = self.phases.advantage(scored, state["kl_coef"])
    started = self._timed("advantage", rollout, started)
    state, update_metrics = self.phases.update(state, rollout, ptx_rows)
    done = self._timed("update", state, started)
    self.window["iteration"] += done - iteration_started
    self.iterations += 1
    self.last = (indices, sample, gold)
    metrics = named_metrics(rollout_metrics, update_metrics)
    metrics.update(fit_metrics)
    metrics["grad_norm"] = update_metrics["policy_grad_norm"] + update_metrics["value_grad_norm"]
    metrics["optimizer_steps"] = state["step"]
    return state, metrics

  def _fit_value_head(self, state, prompts, sample, gold_reward, scored):
    """value_head_fit="first_rollout": fold the least-squares (scale, bias) of the first rollout's
    values against its returns into the value head, score the rollout again with it (so its
    values are the model's), and record the fit in <workdir>/value_head_fit.json. Only a fresh
    run fits: a resumed one restores the fitted head from its checkpoint."""
    fit = {k: float(v) for k, v in jax.device_get(
        self.phases.value_fit(scored, state["kl_coef"])).items()}
    if not all(np.isfinite(v) for v in fit.values()):
      raise FloatingPointError(f"value_head_fit: the fit on the first rollout is not finite: {fit}")
    value = self.phases.fold(state["params"]["value"], jnp.float32(fit["scale"]),
                             jnp.float32(fit["bias"]))
    state = dict(state, params=dict(state["params"], value=value))
    scored = self.phases.score(state["params"], self.frozen, prompts["tokens"], prompts["mask"],
                               sample, gold_reward)
    cfg = self.cfg
    common.save_json(os.path.join(self.workdir, VALUE_HEAD_FIT), dict(
        fit, episodes=self.config.rollout_batch_size, whiten_rewards=cfg.whiten_rewards,
        gamma_discount=cfg.gamma_discount, gae_lambda=cfg.gae_lambda,
        value_init=self.config.ppo.value_init,
        meaning="value head := scale * head + bias, fitted before the first update so the "
                "first rollout's values match its returns (loss: 0.5 * mean squared error "
                "after the fit; loss_before: with the head as value_init left it)"))
    print(f"[{self.config.stage}] value head fitted to the first rollout's returns: scale "
          f"{fit['scale']:.4g}, bias {fit['bias']:.4g}; value loss {fit['loss_before']:.4g} -> "
          f"{fit['loss']:.4g}, explained variance {fit['explained_variance_before']:.3f} -> "
          f"{fit['explained_variance_after']:.3f}", flush=True)
    self.fit_value_head = False
    return state, scored, {f"value_fit_{k}": v for k, v in fit.items()}

  def _gold_reward(self, indices, sample):
    """With reward_source="gold", the rollout's gold scores (host) and their global array; scoring
    on the host is this reward's score phase. (None, None) for the reward model."""
    if self.config.reward_source != "gold":
      return None, None
    gold = rollout_gold_scores(self.task, self.tokenizer, self.data.records, indices,
                               sample.tokens, sample.mask)
    if not self.gold_fitted:
      self.frozen.update(_gain_and_bias(*gold_normalisation(self.workdir, gold),
                                        self.layout.mesh))
      self.gold_fitted = True
    sharding = parallel.batch_sharding(self.layout.mesh, 1)
    return gold, jax.make_array_from_callback(gold.shape, sharding, lambda index: gold[index])

  def host_metrics(self, logged: dict[str, float]) -> dict[str, float]:
    """Seconds per phase, rollouts/s, learning rate and optimiser steps since the last log step,
    and on the synthetic task the gold score of the last rollout."""
    n = max(self.iterations, 1)
    out = {f"{name}_s": seconds / n for name, seconds in self.window.items()}
    optimizer_steps = int(round(logged["optimizer_steps"]))
    out.update(rollouts_per_second=(self.iterations * self.config.rollout_batch_size
                                    / max(self.window["iteration"], 1e-9)),
               learning_rate=float(self.schedule(optimizer_steps - 1)))
    if self.task is not None:
      indices, sample, gold = self.last
      if gold is None:
        gold = rollout_gold_scores(self.task, self.tokenizer, self.data.records, indices,
                                   sample.tokens, sample.mask)
      out["gold_score"] = float(gold.mean())
    out.update(loop.summed_over_processes(dict(truncated_prompts=self.data.stats.truncated)))
    self._reset_window()
    return out


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) PPO-ptx in `workdir` for `config.iterations`; returns the final metrics."""
  cfg = ppo_config(config)
  layout = common.Layout.from_config(config)
  tokenizer = common.tokenizer_from_config(config)
  model_cfg = common.model_config(config, tokenizer)
  check_settings(config, layout, model_cfg)
  task = synthetic_task(config) if config.data.source == "synthetic" else None
  minibatches = cfg.ppo_epochs * cfg.num_minibatches
  optimizers, schedules = make_optimizers(config, config.iterations * minibatches)
  data = datasets(config, workdir, tokenizer, task, cfg)

  with layout.scope():
    ckpt = loop.checkpointer(config, workdir)
    models, frozen, sources = load_models(config, layout, model_cfg,
                                          fresh=ckpt.latest_step() is None)
    abstract, shardings = state_shardings(models, optimizers, layout, cfg, config.seed)
    phases = jit_phases(config, layout, models, frozen, shardings, optimizers, cfg, tokenizer)
    eval_step = jax.jit(functools.partial(sft.eval_step, graphdef=models.policy.graphdef),
                        in_shardings=(models.policy.param_shardings,
                                      parallel.batch_sharding(layout.mesh)),
                        out_shardings=parallel.replicated(layout.mesh))
    state, _ = loop.restore_or_init(
        config.stage, ckpt, abstract,
        lambda: _create_state(config, models, sources, optimizers, cfg, shardings), data.streams)
    sources = None  # the state holds what it needs: free the rest before the first step
    common.save_config(workdir, config, model_cfg)
    steps_done = int(state["step"])
    if steps_done % minibatches:
      raise InputError(f"{workdir}/checkpoints", f"step {steps_done} is not a whole number of "
                       f"iterations of {minibatches} minibatches; were ppo_epochs or "
                       "num_minibatches changed?")
    iteration = Iteration(config, cfg, phases, data, frozen, layout, task, tokenizer, workdir,
                          schedules["policy"], fit_value_head=(
                              steps_done == 0 and config.ppo.value_head_fit == "first_rollout"))
    return loop.train_loop(
        config, workdir, state=state, step_fn=iteration, data_state=data.streams, ckpt=ckpt,
        evaluate=lambda state: evaluate(config, task, state, models, tokenizer, layout,
                                        data.ptx_eval, eval_step),
        total_steps=config.iterations, start=steps_done // minibatches,
        eval_at_start=config.eval_at_start, host_metrics=iteration.host_metrics)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The entry for `experiments.run` (config.stage == "ppo")."""
  return train(config, workdir)
