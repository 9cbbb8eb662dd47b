"""PPO-ptx, the InstructGPT RL objective, as pure jit-able functions.

The policy maximises

    E_{(x, y) ~ pi}[ r(x, y) - beta * log(pi(y | x) / pi_SFT(y | x)) ]
      + gamma * E_{x ~ D_pretrain}[ log pi(x) ]

Each episode is a bandit: a prompt, one sampled response, the reward model's score at the last
response token and a KL penalty on every response token. PPO (clipped surrogate, GAE, a separate
value model) optimises the first term; the second (`ptx_coef`, gamma = 0 is plain PPO) is added
to the SAME policy gradient. Every implementation detail is a field of `PPOConfig`, so each one
can be switched off for an ablation.

An iteration is three phases; the trainer owns sampling, data and checkpoints:
  1. sample responses (`instructjax.sampling`), then `score_phase`: old and reference
     log-probs, values and reward-model scores of the rollout;
  2. `advantage_phase`: KL-shaped rewards, GAE advantages and returns, rollout metrics;
  3. `ppo_update`: `ppo_epochs` x `num_minibatches` optimiser steps in one `lax.scan`.
Before the first update the trainer may refit the value head to the first rollout
(`value_head_fit`: the least-squares scale and bias of the values against their own returns).

Rollout layout (the sampler's):
  tokens         int32 [B, P + N]  a LEFT-padded prompt (P slots), then the response (N slots),
                                   RIGHT-padded with pad after its EOS
  mask           [B, P + N]        1 on real tokens of prompt and response (EOS included)
  response_mask  [B, N]            mask[:, P:]; N, and so P, is read from its shape
  sample_logp    [B, N], optional  the sampler's log-probs of the response tokens. The sampler's
                                   decode step and the training forward are different code, so
                                   in bfloat16 they disagree slightly: the rollout was drawn from
                                   pi_sampler, not from the pi_old that scoring computes.
                                   advantage_phase reports the gap, and `is_weight_cap`
                                   corrects for it.
Every per-token rollout array ([B, N]: logp, ref_logp, values, kl, rewards, advantages, returns)
is indexed by response token and is 0 on padding.

Position conventions:
  * The logits at position t predict token t + 1, so response token i (position P + i) is scored
    by the logits at position P + i - 1. Left padding makes position P - 1 every row's last
    prompt token, so the slice is the same for every row.
  * The value of the state before response token i, V(prompt + response[:i]), is the value
    head at that same position P + i - 1: the value is read where the action is chosen.
  * The episode ends after the last response token, so the value bootstrapped there is 0.
  * The reward model's score is read at the last real token of prompt + response.

Train state (a dict pytree, checkpointed as is):
  params      {"policy": LanguageModel params, "value": ScalarModel params}
  opt_state   {"policy": ..., "value": ...}, one optimiser per model (see `init_state`)
  step        int32, optimiser steps taken (one per minibatch)
  rng         uint32[2]; the shuffle key of an update is fold_in(rng, step)
  kl_coef     float32, beta; the adaptive controller changes it after each update
  bad_steps   int32, minibatch steps skipped for a non-finite loss or gradient
Dropout is never applied: PPO's ratio must be exactly 1 before the first step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from instructjax.errors import InputError
from instructjax.models.decoder import last_token
from instructjax.objectives.sft import apply_if_finite, token_cross_entropy
from instructjax import parallel
from instructjax.parallel import logical_constraint

Array = jax.Array
State = dict[str, Any]
Rollout = Mapping[str, Array]

KL_ESTIMATORS = ("k1", "k3")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Every PPO-ptx detail; defaults follow InstructGPT and lm-human-preferences."""
  kl_coef: float = 0.02              # beta: per-token KL penalty (the initial value if adaptive)
  adaptive_kl: bool = False          # Ziegler et al. (2019) proportional controller on beta
  kl_target: float = 6.0             # nats per sequence the controller steers towards
  kl_horizon: float = 10_000.0       # episodes over which the controller closes the gap
  kl_estimator: str = "k1"           # "k1": logp - ref_logp; "k3": non-negative, lower variance
  gamma_discount: float = 1.0
  gae_lambda: float = 0.95
  clip_eps: float = 0.2              # policy ratio clipping
  value_clip_eps: float | None = 0.2  # None or 0 turns value clipping off
  vf_coef: float = 0.1
  ppo_epochs: int = 4
  num_minibatches: int = 1
  grad_accum: int = 1                # micro-batches per minibatch (exact: same gradient)
  whiten_rewards: bool = True        # scale (not shift) shaped rewards before GAE
  whiten_advantages: bool = True     # over the whole rollout, once, before the epochs
  reward_clip: float | None = None   # clip the score to [-c, c]; None = off
  eos_penalty: float | None = None   # score given to responses that never emitted EOS; None = off
  temperature: float = 1.0           # log-probs use logits / temperature, as sampling does
  ptx_coef: float = 27.8             # gamma of PPO-ptx; 0 = plain PPO
  normalise_reward: bool = True      # score = gain * raw + bias (the RM's normalisation)
  entropy_coef: float = 0.0
  # Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
  # you off-policy RL training"): each token's policy-gradient term is weighted by
  # min(pi_old / pi_sampler, cap), computed once from the rollout's sample_logp. None = off.
  is_weight_cap: float | None = None

  def __post_init__(self):
    problems = []
    if self.kl_estimator not in KL_ESTIMATORS:
      problems.append(f"kl_estimator={self.kl_estimator!r} is not one of {KL_ESTIMATORS}")
    for name in ("ppo_epochs", "num_minibatches", "grad_accum"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        problems.append(f"{name} must be a positive integer, got {value!r}")
    if not self.temperature > 0:
      problems.append(f"temperature must be > 0, got {self.temperature!r}")
    if not 0 <= self.gamma_discount <= 1 or not 0 <= self.gae_lambda <= 1:
      problems.append(f"gamma_discount and gae_lambda must be in [0, 1], got "
                      f"{self.gamma_discount!r} and {self.gae_lambda!r}")
    if self.clip_eps < 0 or (self.value_clip_eps or 0) < 0:
      problems.append("clip_eps and value_clip_eps must be >= 0")
    if self.kl_coef < 0 or self.ptx_coef < 0 or self.vf_coef < 0:
      problems.append("kl_coef, ptx_coef and vf_coef must be >= 0")
    if self.adaptive_kl and not (self.kl_target > 0 and self.kl_horizon > 0):
      problems.append("adaptive_kl needs kl_target > 0 and kl_horizon > 0")
    if self.reward_clip is not None and not self.reward_clip > 0:
      problems.append(f"reward_clip must be > 0 or None, got {self.reward_clip!r}")
    if self.is_weight_cap is not None and not self.is_weight_cap >= 1:
      problems.append(f"is_weight_cap must be >= 1 or None, got {self.is_weight_cap!r} (a cap "
                      "below 1 would shrink every on-policy token's gradient)")
    if problems:
      raise InputError("ppo config", "; ".join(problems))

  @classmethod
  def from_mapping(cls, fields: Mapping[str, Any]) -> "PPOConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise InputError("ppo config", f"unknown fields {unknown}; known: {sorted(known)}")
    return cls(**fields)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------

def masked_mean(x: Array, mask: Array, denominator=None) -> Array:
  """Mean of x over mask; `denominator` replaces the mask's count (exact gradient accumulation
  divides every micro-batch by the whole minibatch's count)."""
  mask = mask > 0
  count = mask.sum() if denominator is None else denominator
  return jnp.where(mask, x, 0.0).sum() / jnp.maximum(count, 1.0)


def masked_var(x: Array, mask: Array) -> Array:
  """Population variance over mask (numpy's np.var of the masked entries)."""
  mean = masked_mean(x, mask)
  return masked_mean(jnp.square(x - mean), mask)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """(x - mean) / std over the masked entries; shift_mean=False keeps the mean (only rescales),
  as lm-human-preferences does for rewards. Entries outside the mask become 0."""
  mean = masked_mean(x, mask)
  white = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
  if not shift_mean:
    white = white + mean
  return jnp.where(mask > 0, white, 0.0)


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
  """1 - Var(returns - values) / Var(returns) over the mask (1 = perfect, <= 0 = useless)."""
  var_returns = masked_var(returns, mask)
  ratio = masked_var(returns - values, mask) / jnp.maximum(var_returns, 1e-12)
  return jnp.where(var_returns > 0, 1.0 - ratio, 0.0)


def token_entropy(logits: Array) -> Array:
  """Entropy of softmax(logits) over the last axis."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -(jnp.exp(log_probs) * log_probs).sum(-1)


def entropy_from_logits(logits: Array, mask: Array) -> Array:
  """Mean per-token entropy over the masked tokens; logits [B, N, V], mask [B, N]."""
  return masked_mean(token_entropy(logits), mask)


# ---------------------------------------------------------------------------------------------
# Rewards, KL and advantages
# ---------------------------------------------------------------------------------------------

def kl_per_token(logp: Array, ref_logp: Array, estimator: str = "k1") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

  k1 = log(pi / pi_ref): unbiased but can be negative on a token.
  k3 = (r - 1) - log r with r = pi_ref / pi: unbiased, never negative, lower variance.
  """
  if estimator == "k1":
    return logp - ref_logp
  if estimator == "k3":
    log_ratio = ref_logp - logp
    return jnp.expm1(log_ratio) - log_ratio
  raise InputError("ppo.kl_estimator", f"{estimator!r} is not one of {KL_ESTIMATORS}")


def last_response_index(response_mask: Array) -> Array:
  """Index of each row's last real response token, [B] (0 for an empty response)."""
  n = response_mask.shape[-1]
  return (n - 1) - jnp.argmax(jnp.flip(response_mask > 0, -1), axis=-1)


def final_score(score: Array, ended: Array | None, cfg: PPOConfig) -> Array:
  """The score that enters the return: EOS penalty first, then clipping, so the clip bounds it."""
  if cfg.eos_penalty is not None:
    if ended is None:
      raise InputError("ppo.eos_penalty", "needs `ended` (did each response emit EOS?)")
    score = jnp.where(ended, score, cfg.eos_penalty)
  if cfg.reward_clip is not None:
    score = jnp.clip(score, -cfg.reward_clip, cfg.reward_clip)
  return score


def shaped_rewards(score: Array, kl: Array, response_mask: Array, beta, cfg: PPOConfig,
                   ended: Array | None = None) -> Array:
  """Per-token rewards [B, N]: -beta * kl on every response token, plus the (EOS-penalised,
  clipped) score on each row's last response token. Responses may have different lengths."""
  real = response_mask > 0
  score = final_score(score, ended, cfg)
  at_last = jnp.arange(real.shape[-1]) == last_response_index(response_mask)[:, None]
  rewards = -beta * kl + jnp.where(at_last, score[:, None], 0.0)
  return jnp.where(real, rewards, 0.0)


def gae(rewards: Array, values: Array, mask: Array, gamma, lam) -> tuple[Array, Array]:
  """Generalised advantage estimation by a reverse scan over time.

    delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next

  where "next" is the next real token of the row; after the last one the episode is over, so
  V_next = A_next = 0. Masked steps get A = 0 and pass the carry through unchanged. Returns
  (advantages, returns = advantages + values), both 0 outside the mask.
  """
  real = mask > 0

  def step(carry, xs):
    next_value, next_advantage = carry
    reward, value, is_real = xs
    delta = reward + gamma * next_value - value
    advantage = delta + gamma * lam * next_advantage
    carry = (jnp.where(is_real, value, next_value), jnp.where(is_real, advantage, next_advantage))
    return carry, jnp.where(is_real, advantage, 0.0)

  zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
  time_major = (rewards.T.astype(jnp.float32), values.T.astype(jnp.float32), real.T)
  _, advantages = jax.lax.scan(step, (zeros, zeros), time_major, reverse=True)
  advantages = advantages.T
  return advantages, jnp.where(real, advantages + values, 0.0)


def value_affine_fit(values: Array, rewards: Array, mask: Array, gamma, lam,
                     eps: float = 1e-6) -> dict[str, Array]:
  """The affine map (scale, bias) of the value predictions that best matches the returns GAE
  computes with the mapped values themselves: the minimiser over (a, b) of

      L(a, b) = mean over real tokens of (V' - returns(rewards, V'))^2,   V' = a * values + b,

  where returns(rewards, V') = advantages + V' of `gae(rewards, V', mask, gamma, lam)`. With
  lam < 1 the returns bootstrap from V', so the target moves with the fit; but returns are
  linear in (rewards, V'): returns(r, a v + b) = returns(r, 0) + a returns(0, v) + b returns(0, 1)
  (1 on real tokens), and L is an ordinary least squares in (a, b) with the columns
  x = v - returns(0, v), u = 1 - returns(0, 1) and the target y = returns(r, 0) (the discounted
  lambda-return of the rewards alone). Solved in closed form from the 2 x 2 normal equations.
  When `values` carry no direction of their own (x is constant or collinear with u, e.g. a zero
  head) only the bias is fitted (scale 1).

  `rewards` are what GAE sees (after whitening). Returns a dict of float32 scalars: scale, bias,
  loss (0.5 L(scale, bias): the unclipped value loss the rollout's values would have after the
  fit, before any update) and loss_before (0.5 L(1, 0)).
  """
  real = mask > 0
  w = real.astype(jnp.float32)
  values = jnp.where(real, values.astype(jnp.float32), 0.0)
  rewards = jnp.where(real, rewards.astype(jnp.float32), 0.0)
  zeros = jnp.zeros_like(values)
  returns = lambda r, v: gae(r, v, real, gamma, lam)[1]
  y = returns(rewards, zeros)
  x = values - returns(zeros, values)
  u = w - returns(zeros, w)
  dot = lambda p, q: (w * p * q).sum()
  xx, xu, uu, xy, uy = dot(x, x), dot(x, u), dot(u, u), dot(x, y), dot(u, y)
  det = xx * uu - xu * xu
  identifiable = det > eps * jnp.maximum(xx * uu, 1e-30)
  safe_det = jnp.where(identifiable, det, 1.0)
  scale = jnp.where(identifiable, (uu * xy - xu * uy) / safe_det, 1.0)
  bias = jnp.where(identifiable, (xx * uy - xu * xy) / safe_det,
                   (uy - dot(u, x)) / jnp.maximum(uu, 1e-30))
  n = jnp.maximum(w.sum(), 1.0)
  loss = lambda a, b: 0.5 * dot(a * x + b * u - y, a * x + b * u - y) / n
  return dict(scale=scale, bias=bias, loss=loss(scale, bias), loss_before=loss(1.0, 0.0))


def kl_controller_update(beta, observed_kl, n_steps, target, horizon) -> Array:
  """Adaptive KL coefficient (Ziegler et al. 2019): a proportional controller whose error is
  clipped to +-0.2, so one batch moves beta by at most 20% * n_steps / horizon."""
  error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
  return beta * (1.0 + error * n_steps / horizon)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, clip_eps: float,
                denominator=None, weights: Array | None = None
                ) -> tuple[Array, dict[str, Array]]:
  """PPO's clipped surrogate, a masked token mean of max(-A r, -A clip(r, 1 - eps, 1 + eps)),
  each token's term times `weights` (truncated importance weights; None = 1).

  aux: clipfrac (tokens where the clipped term is the larger), approx_kl = mean 0.5 (log r)^2
  (lm-human-preferences), ratio (mean r).
  """
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  per_token = jnp.maximum(unclipped, clipped)
  if weights is not None:
    per_token = per_token * jax.lax.stop_gradient(weights)
  loss = masked_mean(per_token, mask, denominator)
  aux = dict(clipfrac=masked_mean((clipped > unclipped).astype(jnp.float32), mask, denominator),
             approx_kl=masked_mean(0.5 * jnp.square(log_ratio), mask, denominator),
             ratio=masked_mean(ratio, mask, denominator))
  return loss, jax.lax.stop_gradient(aux)


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
               clip_eps: float | None, denominator=None) -> tuple[Array, dict[str, Array]]:
  """0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clip(V - old, +-eps);
  clip_eps None or 0 is the plain squared error. aux: clipfrac."""
  unclipped = jnp.square(values - returns)
  if not clip_eps:
    no_clipping = dict(clipfrac=jnp.zeros((), jnp.float32))
    return 0.5 * masked_mean(unclipped, mask, denominator), no_clipping
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  clipped = jnp.square(clipped_values - returns)
  loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask, denominator)
  clipfrac = masked_mean((clipped > unclipped).astype(jnp.float32), mask, denominator)
  return loss, dict(clipfrac=jax.lax.stop_gradient(clipfrac))


# ---------------------------------------------------------------------------------------------
# Model read-outs over a rollout
# ---------------------------------------------------------------------------------------------

def _prompt_len(tokens: Array, response_mask: Array) -> int:
  n = response_mask.shape[-1]
  prompt_len = tokens.shape[-1] - n
  if response_mask.ndim != 2 or prompt_len < 1:
    raise InputError("rollout", f"tokens {tokens.shape} must be [B, P + N] with P >= 1 prompt "
                     f"slots before the response_mask's {response_mask.shape} N slots")
  return prompt_len


def response_logits(graphdef: nnx.GraphDef, params, tokens: Array, mask: Array,
                    response_mask: Array, temperature: float = 1.0) -> Array:
  """Logits / temperature that predict each response token, [B, N, V] (see the conventions).
  Only the N predicting positions are unembedded: the prompt's vocabulary projection is skipped."""
  prompt_len = _prompt_len(tokens, response_mask)
  model = nnx.merge(graphdef, params)
  hidden, _ = model.backbone(tokens, mask)
  return model.unembed(hidden[:, prompt_len - 1:-1]) / temperature


def _logp_and_entropy(graphdef, params, tokens, mask, response_mask, temperature):
  logits = response_logits(graphdef, params, tokens, mask, response_mask, temperature)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  response = tokens[:, tokens.shape[1] - response_mask.shape[1]:]
  logp = jnp.take_along_axis(log_probs, response[..., None], axis=-1)[..., 0]
  entropy = -(jnp.exp(log_probs) * log_probs).sum(-1)
  real = response_mask > 0
  return jnp.where(real, logp, 0.0), jnp.where(real, entropy, 0.0)


def response_logprobs(graphdef: nnx.GraphDef, params, tokens: Array, mask: Array,
                      response_mask: Array, temperature: float = 1.0) -> Array:
  """log softmax(logits / temperature) of each response token, [B, N], 0 on padding: the same
  numbers the sampler reports for the tokens it drew."""
  return _logp_and_entropy(graphdef, params, tokens, mask, response_mask, temperature)[0]


def response_values(graphdef: nnx.GraphDef, params, tokens: Array, mask: Array,
                    response_mask: Array) -> Array:
  """A ScalarModel's value of the state before each response token, [B, N], 0 on padding: the
  head at position P + i - 1, where token i is chosen."""
  prompt_len = _prompt_len(tokens, response_mask)
  values = nnx.merge(graphdef, params)(tokens, mask)[:, prompt_len - 1:-1]
  return jnp.where(response_mask > 0, values, 0.0)


def response_ended(tokens: Array, response_mask: Array, eos_id: int) -> Array:
  """[B] bool: the row's last real response token is EOS (it stopped rather than ran out)."""
  response = tokens[:, tokens.shape[1] - response_mask.shape[1]:]
  last = jnp.take_along_axis(response, last_response_index(response_mask)[:, None], axis=1)[:, 0]
  return (last == eos_id) & (response_mask > 0).any(-1)


def reward_normalisation(raw_scores: Array, target_mean: float = 0.0,
                         target_std: float | None = None) -> tuple[Array, Array]:
  """(gain, bias) such that gain * raw + bias has the target mean (and std, when given) on these
  scores, e.g. the RM's scores of SFT samples or labeler demonstrations (InstructGPT: mean 0)."""
  raw_scores = jnp.asarray(raw_scores, jnp.float32)
  gain = (jnp.ones((), jnp.float32) if target_std is None
          else target_std * jax.lax.rsqrt(jnp.var(raw_scores) + 1e-8))
  return gain, target_mean - gain * raw_scores.mean()


# ---------------------------------------------------------------------------------------------
# Phases 1 and 2: score a rollout, then compute its advantages
# ---------------------------------------------------------------------------------------------

def score_phase(params: Mapping[str, Any], frozen: Mapping[str, Any], rollout: Rollout, *,
                policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef,
                reward_graphdef: nnx.GraphDef | None, cfg: PPOConfig, eos_id: int | None,
                reference_graphdef: nnx.GraphDef | None = None) -> dict[str, Array]:
  """Everything the update needs from the models, with no gradient.

  params: the state's {"policy", "value"}; frozen: {"reference": LanguageModel params (the SFT
  policy), "reward": ScalarModel params, "reward_gain", "reward_bias" (only read when
  cfg.normalise_reward)}. rollout: {tokens, mask, response_mask} in the module's layout. The
  reference shares the policy's graphdef unless `reference_graphdef` is given. With
  reward_graphdef None the reward is programmatic: the rollout must carry score_raw [B] already.

  Returns the rollout plus logp and ref_logp (at cfg.temperature), values, score_raw (the RM at
  the last real token of prompt + response), score (normalised when cfg.normalise_reward) and
  ended (the response emitted EOS; all False when eos_id is None).
  """
  if cfg.eos_penalty is not None and eos_id is None:
    raise InputError("ppo.eos_penalty", "is set but eos_id is None: which token is EOS?")
  params, frozen = jax.lax.stop_gradient((params, frozen))
  tokens, mask, response_mask = rollout["tokens"], rollout["mask"], rollout["response_mask"]
  reference_graphdef = reference_graphdef or policy_graphdef
  logp = response_logprobs(policy_graphdef, params["policy"], tokens, mask, response_mask,
                           cfg.temperature)
  ref_logp = response_logprobs(reference_graphdef, frozen["reference"], tokens, mask,
                               response_mask, cfg.temperature)
  values = response_values(value_graphdef, params["value"], tokens, mask, response_mask)
  if reward_graphdef is None:
    if "score_raw" not in rollout:
      raise InputError("score_phase", "reward_graphdef is None, so the rollout needs score_raw")
    score_raw = rollout["score_raw"].astype(jnp.float32)
  else:
    score_raw = last_token(nnx.merge(reward_graphdef, frozen["reward"])(tokens, mask), mask)
  score = score_raw
  if cfg.normalise_reward:
    score = frozen["reward_gain"] * score_raw + frozen["reward_bias"]
  ended = (jnp.zeros(tokens.shape[:1], bool) if eos_id is None
           else response_ended(tokens, response_mask, eos_id))
  return dict(rollout, logp=logp, ref_logp=ref_logp, values=values, score_raw=score_raw,
              score=score, ended=ended)


def gae_inputs(rollout: Rollout, kl_coef, cfg: PPOConfig) -> tuple[Array, Array, Array]:
  """(kl, rewards, gae_rewards) of a scored rollout, each [B, N] and 0 on padding: the per-token
  KL estimate, the KL-shaped rewards with the final score at each row's last token, and what GAE
  sees, the rewards whitened over the rollout (without shifting their mean) when
  cfg.whiten_rewards."""
  real = rollout["response_mask"] > 0
  kl = jnp.where(real, kl_per_token(rollout["logp"], rollout["ref_logp"], cfg.kl_estimator), 0.0)
  rewards = shaped_rewards(rollout["score"], kl, real, kl_coef, cfg, rollout.get("ended"))
  gae_rewards = whiten(rewards, real, shift_mean=False) if cfg.whiten_rewards else rewards
  return kl, rewards, gae_rewards


def value_head_fit(rollout: Rollout, kl_coef, cfg: PPOConfig) -> dict[str, Array]:
  """`value_affine_fit` of a scored rollout's values to its returns as advantage_phase computes
  them (the configured KL shaping, whitening, gamma and lambda); the trainer folds the (scale,
  bias) into a linear value head before the first update. Adds the rollout's value mean and
  returns mean and the explained variance before and after the fit."""
  real = rollout["response_mask"] > 0
  _, _, gae_rewards = gae_inputs(rollout, kl_coef, cfg)
  fit = value_affine_fit(rollout["values"], gae_rewards, real, cfg.gamma_discount,
                         cfg.gae_lambda)
  out = dict(fit)
  for name, values in (("before", rollout["values"]),
                       ("after", fit["scale"] * rollout["values"] + fit["bias"])):
    values = jnp.where(real, values, 0.0)
    _, returns = gae(gae_rewards, values, real, cfg.gamma_discount, cfg.gae_lambda)
    out[f"value_mean_{name}"] = masked_mean(values, real)
    out[f"returns_mean_{name}"] = masked_mean(returns, real)
    out[f"explained_variance_{name}"] = explained_variance(values, returns, real)
  return out


def advantage_phase(rollout: Rollout, kl_coef, cfg: PPOConfig
                    ) -> tuple[dict[str, Array], dict[str, Array]]:
  """KL-shaped rewards, GAE advantages and returns of a scored rollout, and its metrics.

  Adds kl (per token), kl_sequence ([B], what the adaptive controller sees), rewards (before
  whitening), advantages (whitened over the rollout when cfg.whiten_advantages) and returns.
  """
  real = rollout["response_mask"] > 0
  kl, rewards, gae_rewards = gae_inputs(rollout, kl_coef, cfg)
  advantages, returns = gae(gae_rewards, rollout["values"], real, cfg.gamma_discount,
                            cfg.gae_lambda)
  if cfg.whiten_advantages:
    advantages = whiten(advantages, real)
  kl_sequence = kl.sum(-1)
  ended = rollout.get("ended", jnp.zeros(real.shape[:1], bool))
  sampler_metrics, is_weight = sampler_gap(rollout, real, cfg)
  metrics = dict(**sampler_metrics,
      score_raw=rollout.get("score_raw", rollout["score"]).mean(),
      score=rollout["score"].mean(),
      score_final=final_score(rollout["score"], ended, cfg).mean(),
      kl_sequence=kl_sequence.mean(),
      kl_coef=jnp.asarray(kl_coef, jnp.float32),
      non_score_reward=(-kl_coef * kl_sequence).mean(),
      return_total=rewards.sum(-1).mean(),
      response_length=real.sum(-1).astype(jnp.float32).mean(),
      eos_fraction=ended.astype(jnp.float32).mean(),
      value_mean=masked_mean(rollout["values"], real),
      returns_mean=masked_mean(returns, real),
      # The unclipped value loss of the rollout's own values, before the update changes them.
      rollout_value_loss=0.5 * masked_mean(jnp.square(rollout["values"] - returns), real),
      explained_variance=explained_variance(rollout["values"], returns, real))
  out = dict(rollout, kl=kl, kl_sequence=kl_sequence, rewards=rewards, advantages=advantages,
             returns=returns)
  if is_weight is not None:
    out["is_weight"] = is_weight
  return out, metrics


def sampler_gap(rollout: Rollout, real: Array, cfg: PPOConfig
                ) -> tuple[dict[str, Array], Array | None]:
  """How far the sampler's log-probs are from scoring's (pi_old), and the truncated importance
  weights when cfg.is_weight_cap is set.

  Metrics over real response tokens (none without sample_logp): sampler_logp_gap (mean
  |logp - sample_logp|), sampler_logp_gap_max, sampler_ratio_max and sampler_ratio_min (the
  importance ratio pi_old / pi_sampler), and is_weight_mean (the weights' mean, 1 when uncapped
  and on-policy).
  """
  if "sample_logp" not in rollout:
    if cfg.is_weight_cap is not None:
      raise InputError("ppo.is_weight_cap", "is set but the rollout carries no sample_logp (the "
                       "sampler's log-probs)")
    return {}, None
  log_ratio = jnp.where(real, rollout["logp"] - rollout["sample_logp"], 0.0)
  ratio = jnp.exp(log_ratio)
  metrics = dict(sampler_logp_gap=masked_mean(jnp.abs(log_ratio), real),
                 sampler_logp_gap_max=jnp.abs(log_ratio).max(),
                 sampler_ratio_max=jnp.where(real, ratio, -jnp.inf).max(),
                 sampler_ratio_min=jnp.where(real, ratio, jnp.inf).min())
  if cfg.is_weight_cap is None:
    return metrics, None
  is_weight = jnp.where(real, jnp.minimum(ratio, cfg.is_weight_cap), 0.0)
  metrics["is_weight_mean"] = masked_mean(is_weight, real)
  return metrics, is_weight


# ---------------------------------------------------------------------------------------------
# Phase 3: the update
# ---------------------------------------------------------------------------------------------

TRAIN_FIELDS = ("tokens", "mask", "response_mask", "logp", "values", "advantages", "returns")


def train_fields(cfg: PPOConfig) -> tuple[str, ...]:
  """The rollout fields the update reads: TRAIN_FIELDS, and the importance weights if capped."""
  return TRAIN_FIELDS + (("is_weight",) if cfg.is_weight_cap is not None else ())


def init_state(policy_params, value_params, optimizers: Mapping[str, optax.GradientTransformation],
               cfg: PPOConfig, seed: int) -> State:
  """A fresh PPO train state (layout in the module docstring); `optimizers` has one
  optax transformation per model, {"policy": ..., "value": ...}, e.g. sft.make_optimizer."""
  params = dict(policy=policy_params, value=value_params)
  return dict(params=params,
              opt_state={name: optimizers[name].init(params[name]) for name in params},
              step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed),
              kl_coef=jnp.asarray(cfg.kl_coef, jnp.float32), bad_steps=jnp.zeros((), jnp.int32))


def _batch_constraint(tree, leading: int = 0):
  """Keeps the (micro-)batch dimension sharded after a gather or reshape."""
  def pin(x):
    names = (None,) * leading + ("batch",) + (None,) * (x.ndim - leading - 1)
    return logical_constraint(x, names)
  return jax.tree.map(pin, tree)


def batch_shards() -> int:
  """How many ways the active mesh and rules split a batch dimension (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if parallel.current_rules() is None or mesh is None or mesh.empty:
    return 1
  return parallel.batch_divisor(mesh)


def check_micro_batches(rows: int, ptx_rows: int | None, accum: int, shards: int | None = None,
                        where=("ppo rollout micro-batch", "ppo pretraining micro-batch")) -> None:
  """Each micro-batch of a minibatch's `rows` rollout rows (and `ptx_rows` pretraining rows)
  must split evenly over the batch shards (default: the active mesh's). Besides wasting
  devices, an uneven split made XLA's partitioner return a wrong embedding gradient (seen with
  2 rows on 4 shards). The trainer calls it before step 0 with its config's names as `where`."""
  shards = batch_shards() if shards is None else shards
  for name, n, place in (("rollout", rows, where[0]), ("pretraining", ptx_rows, where[1])):
    if n is None:
      continue
    if n % accum:
      raise InputError("ppo.grad_accum", f"{accum} micro-batches do not divide the minibatch's "
                       f"{n} {name} rows")
    if (n // accum) % shards:
      raise InputError(place, f"{n // accum} rows (a minibatch of {n} in {accum} micro-batches) "
                       f"do not split evenly over the {shards} batch shards; make each "
                       "micro-batch a multiple of them")


def _minibatch_loss(params, micro: Rollout, ptx: Rollout | None, denominators, *,
                    policy_graphdef, value_graphdef, cfg: PPOConfig):
  """The PPO-ptx loss of one micro-batch, each term divided by its whole minibatch's count."""
  n_tokens, n_ptx = denominators
  real = micro["response_mask"] > 0
  logp, entropy = _logp_and_entropy(policy_graphdef, params["policy"], micro["tokens"],
                                    micro["mask"], micro["response_mask"], cfg.temperature)
  pg_loss, pg_aux = policy_loss(logp, micro["logp"], micro["advantages"], real, cfg.clip_eps,
                                n_tokens, micro.get("is_weight"))
  values = response_values(value_graphdef, params["value"], micro["tokens"], micro["mask"],
                           micro["response_mask"])
  vf_loss, vf_aux = value_loss(values, micro["values"], micro["returns"], real,
                               cfg.value_clip_eps, n_tokens)
  mean_entropy = masked_mean(entropy, real, n_tokens)
  loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * mean_entropy
  ptx_loss = jnp.zeros((), jnp.float32)
  if ptx is not None:
    # With gamma = 0 the pretraining loss is still reported, but no gradient flows through it.
    policy = params["policy"] if cfg.ptx_coef else jax.lax.stop_gradient(params["policy"])
    logits, _ = nnx.merge(policy_graphdef, policy)(ptx["tokens"], ptx["mask"])
    total, _ = token_cross_entropy(logits, ptx["tokens"], ptx["loss_mask"])
    ptx_loss = total / jnp.maximum(n_ptx, 1.0)
    loss = loss + cfg.ptx_coef * ptx_loss
  metrics = dict(loss=loss, policy_loss=pg_loss, value_loss=vf_loss, ptx_loss=ptx_loss,
                 entropy=jax.lax.stop_gradient(mean_entropy), policy_clipfrac=pg_aux["clipfrac"],
                 value_clipfrac=vf_aux["clipfrac"], approx_kl=pg_aux["approx_kl"],
                 ratio=pg_aux["ratio"])
  return loss, jax.lax.stop_gradient(metrics)


def minibatch_grads(params, minibatch: Rollout, ptx: Rollout | None = None, *,
                    policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef,
                    cfg: PPOConfig) -> tuple[Any, dict[str, Array]]:
  """Gradient of the PPO-ptx loss of one minibatch with respect to {"policy", "value"}, and its
  metrics. cfg.grad_accum > 1 sums micro-batch gradients in a scan; every micro-batch divides by
  the whole minibatch's token count, so the result equals the one-shot gradient.

  minibatch: TRAIN_FIELDS of rows of an advantage_phase rollout. ptx: {tokens, mask, loss_mask}
  of pretraining text (or None); its token-mean NLL enters the policy loss times cfg.ptx_coef.
  """
  accum = cfg.grad_accum
  check_micro_batches(minibatch["tokens"].shape[0],
                       None if ptx is None else ptx["tokens"].shape[0], accum)
  n_tokens = (minibatch["response_mask"] > 0).sum().astype(jnp.float32)
  n_ptx = (jnp.zeros((), jnp.float32) if ptx is None
           else (ptx["loss_mask"][:, 1:] > 0).sum().astype(jnp.float32))
  grad_fn = jax.grad(_minibatch_loss, has_aux=True)
  kwargs = dict(policy_graphdef=policy_graphdef, value_graphdef=value_graphdef, cfg=cfg)
  if accum == 1:
    return grad_fn(params, minibatch, ptx, (n_tokens, n_ptx), **kwargs)

  split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
  micro_batches = _batch_constraint(jax.tree.map(split, (minibatch, ptx)), leading=1)

  def accumulate(total, micro):
    grads, metrics = grad_fn(params, *micro, (n_tokens, n_ptx), **kwargs)
    return jax.tree.map(jnp.add, total, (grads, metrics)), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  metric_shapes = jax.eval_shape(lambda: grad_fn(params, *first, (n_tokens, n_ptx), **kwargs)[1])
  zeros = (jax.tree.map(jnp.zeros_like, params),
           jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
  (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro_batches)
  return grads, metrics


def _optimizer_step(state: State, minibatch: Rollout, ptx: Rollout | None, *, policy_graphdef,
                    value_graphdef, optimizers, cfg: PPOConfig) -> tuple[State, dict[str, Array]]:
  grads, metrics = minibatch_grads(state["params"], minibatch, ptx, policy_graphdef=policy_graphdef,
                                   value_graphdef=value_graphdef, cfg=cfg)
  new_params, new_opt_state = {}, {}
  for name, params in state["params"].items():
    updates, new_opt_state[name] = optimizers[name].update(grads[name], state["opt_state"][name],
                                                           params)
    new_params[name] = optax.apply_updates(params, updates)
  norms = {name: optax.tree.norm(g) for name, g in grads.items()}
  metrics = dict(metrics, policy_grad_norm=norms["policy"], value_grad_norm=norms["value"])
  state = apply_if_finite(state, new_params, new_opt_state, metrics["loss"],
                          norms["policy"] + norms["value"])
  return state, metrics


def ppo_update(state: State, rollout: Rollout, ptx: Rollout | None = None, *,
               policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef,
               optimizers: Mapping[str, optax.GradientTransformation],
               cfg: PPOConfig) -> tuple[State, dict[str, Array]]:
  """One PPO-ptx update: ppo_epochs x num_minibatches optimiser steps in a single lax.scan.

  Each epoch reshuffles the rollout's rows with a key from fold_in(state["rng"], state["step"]).
  ptx: pretraining rows {tokens, mask, loss_mask}, each [ppo_epochs * num_minibatches, b, T]
  (scanned alongside, so every minibatch sees its own rows), or None for plain PPO. Afterwards
  the adaptive controller (cfg.adaptive_kl) moves kl_coef using the rollout's mean kl_sequence,
  counting its B episodes as the controller's n_steps. Pure: jit it with the keyword arguments
  bound and the state donated. Returns (state, metrics averaged over the minibatches).
  """
  rows = rollout["tokens"].shape[0]
  epochs, per_epoch = cfg.ppo_epochs, cfg.num_minibatches
  if rows % per_epoch:
    raise InputError("ppo.num_minibatches", f"{per_epoch} minibatches do not divide the "
                     f"rollout's {rows} rows")
  if cfg.ptx_coef and ptx is None:
    raise InputError("ppo.ptx_coef", f"is {cfg.ptx_coef} but no pretraining batch was given "
                     "(set ptx_coef=0 for plain PPO)")
  if ptx is not None and ptx["tokens"].shape[0] != epochs * per_epoch:
    raise InputError("ppo ptx batch", f"leading dimension {ptx['tokens'].shape[0]} must be "
                     f"ppo_epochs * num_minibatches = {epochs * per_epoch}")

  keys = jax.random.split(jax.random.fold_in(state["rng"], state["step"]), epochs)
  order = jax.vmap(lambda key: jax.random.permutation(key, rows))(keys)
  order = order.reshape(epochs * per_epoch, rows // per_epoch)
  fields = {name: rollout[name] for name in train_fields(cfg)}

  def step(state, xs):
    rows_of_minibatch, ptx_rows = xs
    minibatch = _batch_constraint(jax.tree.map(lambda x: x[rows_of_minibatch], fields))
    return _optimizer_step(state, minibatch, ptx_rows, policy_graphdef=policy_graphdef,
                           value_graphdef=value_graphdef, optimizers=optimizers, cfg=cfg)

  state, metrics = jax.lax.scan(step, state, (order, ptx))
  metrics = jax.tree.map(jnp.mean, metrics)
  if cfg.adaptive_kl:
    observed_kl = rollout["kl_sequence"].mean()
    state = dict(state, kl_coef=kl_controller_update(state["kl_coef"], observed_kl, rows,
                                                     cfg.kl_target, cfg.kl_horizon))
  metrics = dict(metrics, kl_coef=state["kl_coef"], bad_steps=state["bad_steps"])
  return state, metrics
