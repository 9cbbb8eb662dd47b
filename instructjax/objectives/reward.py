"""Reward-model objective: the K-way ranking loss of InstructGPT step 2.

Labelers rank K = 4..9 responses to one prompt. All C(K, 2) comparisons of a prompt stay
together as ONE batch element, so its K responses go through the model once and the
prompt's pairs are not spread over many batches (InstructGPT found that shuffling
correlated pairs into separate batch elements overfits in one epoch). The loss is

  loss = mean over prompts with >= 1 pair of
         -1 / #pairs(b) * sum_{(w, l): rank_w < rank_l} log sigmoid(r_w - r_l).

Ties make no pair, and a prompt with no pair at all (e.g. a padding element) contributes
nothing, not even to the number of prompts averaged over. K varies per prompt up to `max_k`;
the batch carries `valid` [B, max_k] to mark the real responses.

Batch layout (see `instructjax.data.ranking_batches`):
  tokens  int32 [B, K, T]  prompt + response + eos per response, right-padded
  mask    int32 [B, K, T]  1 = real token
  ranks   int32 [B, K]     0 = best; equal ranks tie
  valid   bool  [B, K]     real responses (padding responses are ignored)

Pair accuracy counts a pair as correct when r_w > r_l and a tie r_w == r_l as HALF correct,
so a constant reward model scores exactly chance (0.5) instead of 0.

The train state is the dict of `instructjax.objectives.sft` (params, opt_state, step, rng,
bad_steps) holding a `ScalarModel`'s parameters; its optimizer, schedule and non-finite guard
are reused from there.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from instructjax.errors import InputError
from instructjax.models.decoder import last_token
from instructjax.objectives.sft import apply_gradients
from instructjax.objectives.sft import (  # noqa: F401  (re-exported for the benchmark and tests)
    init_state, learning_rate_schedule, make_optimizer)

Batch = Mapping[str, jax.Array]
State = dict[str, Any]


# ----------------------------------------------------------------------------- loss


def pair_matrix(ranks: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, K, K] bool: (i, j) is a pair with i the winner, iff both valid and rank_i < rank_j."""
  valid = valid.astype(bool)
  both = valid[:, :, None] & valid[:, None, :]
  return both & (ranks[:, :, None] < ranks[:, None, :])


def ranking_loss(rewards: jax.Array, ranks: jax.Array,
                 valid: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The K-way pairwise ranking loss and its summed statistics.

  Args:
    rewards: [B, K] float, one scalar per response.
    ranks: [B, K] int, 0 = best; equal ranks are ties and make no pair.
    valid: [B, K] bool, the real responses; the rest are padding.

  Returns:
    (loss, aux). `loss` is the mean over prompts that have at least one pair of each
    prompt's mean -log sigmoid(r_w - r_l); 0 when the batch has no pair. `aux` holds sums
    (add them over batches and shards before dividing):
      loss_sum       sum of the per-prompt losses
      prompts        number of prompts with >= 1 pair
      correct        correct pairs (r_w > r_l; a tie counts 1/2)
      pairs          number of pairs
      correct_by_k   [K + 1] correct pairs of prompts with k valid responses, at index k
      pairs_by_k     [K + 1] pairs of prompts with k valid responses, at index k
      reward_sum, reward_sq_sum, responses: over valid responses, for mean and std.
  """
  rewards = rewards.astype(jnp.float32)
  valid = valid.astype(bool)
  max_k = rewards.shape[1]
  is_pair = pair_matrix(ranks, valid)
  pair_weight = is_pair.astype(jnp.float32)
  # Padding rewards may be anything; `where` keeps them (and their gradient) out of the sums.
  margin = jnp.where(is_pair, rewards[:, :, None] - rewards[:, None, :], 0.0)
  nll = jnp.where(is_pair, -jax.nn.log_sigmoid(margin), 0.0)

  pairs_per_prompt = pair_weight.sum((1, 2))
  has_pairs = pairs_per_prompt > 0
  prompt_loss = nll.sum((1, 2)) / jnp.maximum(pairs_per_prompt, 1.0)
  loss_sum = jnp.where(has_pairs, prompt_loss, 0.0).sum()
  prompts = has_pairs.astype(jnp.float32).sum()
  loss = loss_sum / jnp.maximum(prompts, 1.0)

  correct_per_pair = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0)) * pair_weight
  correct_per_prompt = correct_per_pair.sum((1, 2))
  k_per_prompt = valid.sum(1)
  by_k = jax.nn.one_hot(k_per_prompt, max_k + 1, dtype=jnp.float32)  # [B, K + 1]

  valid_f = valid.astype(jnp.float32)
  safe_rewards = jnp.where(valid, rewards, 0.0)
  aux = dict(
      loss_sum=loss_sum,
      prompts=prompts,
      correct=correct_per_prompt.sum(),
      pairs=pairs_per_prompt.sum(),
      correct_by_k=correct_per_prompt @ by_k,
      pairs_by_k=pairs_per_prompt @ by_k,
      reward_sum=safe_rewards.sum(),
      reward_sq_sum=(safe_rewards**2).sum(),
      responses=valid_f.sum(),
  )
  return loss, aux


def _mean_std(total, total_sq, count):
  """Mean and (population) std from sums; count 0 gives (0, 0)."""
  count = jnp.maximum(count, 1.0)
  mean = total / count
  return mean, jnp.sqrt(jnp.maximum(total_sq / count - mean**2, 0.0))


# ----------------------------------------------------------------------------- model


def reward_forward(params, graphdef: nnx.GraphDef, tokens: jax.Array, mask: jax.Array,
                   dropout_rng: jax.Array | None = None) -> jax.Array:
  """Rewards [B, K] of responses [B, K, T]: one forward of the ScalarModel over B * K rows.

  The reward is the scalar head's value at each row's last real token (the EOS unless the
  response was truncated). All-padding rows give a finite, meaningless reward.
  """
  B, K, T = tokens.shape
  model = nnx.merge(graphdef, params)
  flat_mask = mask.reshape(B * K, T)
  values = model(tokens.reshape(B * K, T), flat_mask, dropout_rng=dropout_rng)
  return last_token(values, flat_mask).reshape(B, K)


def reward_loss(params, graphdef: nnx.GraphDef, batch: Batch, dropout_rng=None):
  """(loss, (aux, rewards)) of one batch; the function differentiated by `train_step`."""
  rewards = reward_forward(params, graphdef, batch["tokens"], batch["mask"], dropout_rng)
  loss, aux = ranking_loss(rewards, batch["ranks"], batch["valid"])
  return loss, (aux, rewards)


# ----------------------------------------------------------------------------- steps


def train_step(state: State, batch: Batch, *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               use_dropout: bool = False) -> tuple[State, dict[str, jax.Array]]:
  """One AdamW update on the ranking loss. Pure: jit it with donated state.

  Metrics: loss, accuracy (pair accuracy, ties half), grad_norm, learning_rate, reward_mean,
  reward_std (over valid responses), pairs and prompts (counts in this batch).
  """
  dropout_rng = jax.random.fold_in(state["rng"], state["step"]) if use_dropout else None
  grad_fn = jax.value_and_grad(reward_loss, has_aux=True)
  (loss, (aux, _)), grads = grad_fn(state["params"], graphdef, batch, dropout_rng)
  new_state, grad_norm = apply_gradients(state, grads, loss, optimizer)
  reward_mean, reward_std = _mean_std(aux["reward_sum"], aux["reward_sq_sum"], aux["responses"])
  metrics = dict(loss=loss, accuracy=aux["correct"] / jnp.maximum(aux["pairs"], 1.0),
                 grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                 reward_mean=reward_mean, reward_std=reward_std, pairs=aux["pairs"],
                 prompts=aux["prompts"])
  return new_state, metrics


def eval_step(params, batch: Batch, *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
  """Summed statistics of one held-out batch (see `ranking_loss`); add them over batches."""
  _, (aux, _) = reward_loss(params, graphdef, batch)
  return aux


def eval_metrics(sums: Mapping[str, Any]) -> dict[str, float]:
  """Held-out metrics from summed `eval_step` outputs.

  Returns eval_loss (mean over prompts), eval_accuracy (over pairs), eval_accuracy_k{K} for
  every K that had pairs, eval_reward_mean and eval_reward_std, eval_pairs, eval_prompts.
  """
  prompts, pairs, responses = (float(sums[k]) for k in ("prompts", "pairs", "responses"))
  metrics = dict(eval_loss=float(sums["loss_sum"]) / max(prompts, 1.0),
                 eval_accuracy=float(sums["correct"]) / max(pairs, 1.0),
                 eval_pairs=pairs, eval_prompts=prompts)
  correct_by_k = np.asarray(sums["correct_by_k"], np.float64)
  pairs_by_k = np.asarray(sums["pairs_by_k"], np.float64)
  for k in range(2, len(pairs_by_k)):
    if pairs_by_k[k] > 0:
      metrics[f"eval_accuracy_k{k}"] = float(correct_by_k[k] / pairs_by_k[k])
  mean = float(sums["reward_sum"]) / max(responses, 1.0)
  variance = float(sums["reward_sq_sum"]) / max(responses, 1.0) - mean**2
  metrics.update(eval_reward_mean=mean, eval_reward_std=math.sqrt(max(variance, 0.0)))
  return metrics


# ----------------------------------------------------------------------------- normalisation


def normalisation(rewards: np.ndarray, *, target_mean: float = 0.0,
                  target_std: float = 1.0) -> tuple[float, float]:
  """(gain, bias) such that gain * r + bias has the target mean and std on `rewards`.

  As in lm-human-preferences, the reward model is normalised once after training on a
  reference set (e.g. SFT samples for the RL prompts), so that PPO sees rewards of mean 0
  and std 1 there. The std is the population std (ddof = 0).

  Raises:
    InputError: the reference set is empty, non-finite or constant.
  """
  rewards = np.asarray(rewards, np.float64).reshape(-1)
  if rewards.size == 0:
    raise InputError("reward normalisation", "the reference set of rewards is empty")
  if not np.isfinite(rewards).all():
    bad = int((~np.isfinite(rewards)).sum())
    raise InputError("reward normalisation", f"{bad} of {rewards.size} reference rewards are "
                     "not finite")
  mean, std = float(rewards.mean()), float(rewards.std())
  if not std > 0:
    raise InputError("reward normalisation", f"all {rewards.size} reference rewards equal "
                     f"{mean}, so no gain can give them a std of {target_std}")
  gain = target_std / std
  return gain, target_mean - gain * mean


def apply_normalisation(rewards, gain: float, bias: float):
  """gain * rewards + bias (numpy or jax arrays)."""
  return gain * rewards + bias


# ----------------------------------------------------------------------------- initialisation


def init_from_sft(sft_params: Mapping[str, Any], scalar_params: Mapping[str, Any]) -> dict:
  """A ScalarModel's params whose backbone is a copy of an SFT LanguageModel's.

  The LM head (or the tied embedding's role as one) is dropped; the scalar head keeps its
  initialisation (head_w ~ N(0, 1/sqrt(d_model + 1)), head_b = 0). The backbone is copied
  bit for bit into new buffers, so donating the reward model's state never deletes the SFT
  model's arrays.

  Raises:
    InputError: the two backbones differ in structure, shape or dtype (different configs).
  """
  for name, params in (("sft params", sft_params), ("reward model params", scalar_params)):
    if "backbone" not in params:
      raise InputError(name, f"has no 'backbone' entry (have {sorted(params)})")
  source, target = sft_params["backbone"], scalar_params["backbone"]
  source_paths = dict(jax.tree_util.tree_flatten_with_path(source)[0])
  target_paths = dict(jax.tree_util.tree_flatten_with_path(target)[0])
  if source_paths.keys() != target_paths.keys():
    only_sft = sorted(jax.tree_util.keystr(p) for p in source_paths.keys() - target_paths.keys())
    only_rm = sorted(jax.tree_util.keystr(p) for p in target_paths.keys() - source_paths.keys())
    raise InputError("init_from_sft", f"backbones differ: only in the SFT model {only_sft}, only "
                     f"in the reward model {only_rm}; build both from the same model config")
  for path, value in source_paths.items():
    want = target_paths[path]
    if value.shape != want.shape or value.dtype != want.dtype:
      raise InputError(f"init_from_sft: backbone{jax.tree_util.keystr(path)}",
                       f"SFT has {value.dtype}{list(value.shape)}, the reward model expects "
                       f"{want.dtype}{list(want.shape)}; build both from the same model config")
  return {**scalar_params, "backbone": jax.tree.map(lambda x: x.copy(), source)}
