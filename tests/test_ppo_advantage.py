"""PPO's advantage phase and update as configured, against slow, obviously-correct references.

Each test here names the one-line mistake it exists to catch: reward whitening that also shifts
the rewards' mean (lm-human-preferences whitens rewards with `shift_mean=False`), advantage
whitening switched off, the same minibatch permutation in every epoch, and the entropy bonus with
its sign flipped. The references are plain Python loops over real tokens, with no masking tricks.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel, ScalarModel
from instructjax.objectives import ppo

EPS = 1e-8  # lm-human-preferences' whiten: (x - mean) * rsqrt(var + 1e-8)


# ---------------------------------------------------------------------------------------------
# The reference: lm-human-preferences' PPOTrainer.loss, one real token at a time
# ---------------------------------------------------------------------------------------------

def _real_positions(response_mask):
  return [(b, t) for b in range(response_mask.shape[0]) for t in range(response_mask.shape[1])
          if response_mask[b, t]]


def _mean_and_var(values):
  mean = sum(values) / len(values)
  return mean, sum((v - mean) ** 2 for v in values) / len(values)


def whiten_reference(x, response_mask, shift_mean):
  """lm-human-preferences' `utils.whiten` over the real tokens only (padding stays 0)."""
  real = _real_positions(response_mask)
  mean, var = _mean_and_var([float(x[p]) for p in real])
  out = np.zeros(x.shape, np.float64)
  for p in real:
    out[p] = (float(x[p]) - mean) / math.sqrt(var + EPS)
    if not shift_mean:
      out[p] += mean
  return out


def advantage_reference(rollout, beta, cfg: ppo.PPOConfig):
  """(rewards before whitening, advantages, returns) as lm-human-preferences computes them,
  for rows of different lengths: k1 KL penalty on every real token, the score on each row's last
  real token, rewards whitened without shifting their mean, GAE, then advantages whitened (mean
  shifted) over the whole rollout."""
  mask = np.asarray(rollout["response_mask"])
  logp, ref_logp = np.asarray(rollout["logp"], np.float64), np.asarray(rollout["ref_logp"])
  values, score = np.asarray(rollout["values"], np.float64), np.asarray(rollout["score"])
  B, N = mask.shape
  rewards = np.zeros((B, N))
  for b in range(B):
    real = [t for t in range(N) if mask[b, t]]
    for t in real:
      rewards[b, t] = -beta * (logp[b, t] - ref_logp[b, t])
    if real:
      rewards[b, real[-1]] += score[b]
  gae_rewards = whiten_reference(rewards, mask, shift_mean=False) if cfg.whiten_rewards else rewards
  advantages = np.zeros((B, N))
  for b in range(B):
    next_value = next_advantage = 0.0
    for t in reversed(range(N)):
      if not mask[b, t]:
        continue
      delta = gae_rewards[b, t] + cfg.gamma_discount * next_value - values[b, t]
      next_advantage = delta + cfg.gamma_discount * cfg.gae_lambda * next_advantage
      next_value = values[b, t]
      advantages[b, t] = next_advantage
  returns = np.where(mask > 0, advantages + values, 0.0)
  if cfg.whiten_advantages:
    advantages = whiten_reference(advantages, mask, shift_mean=True)
  return rewards, advantages, returns


def random_rollout(seed=0, batch=6, n=7, score_mean=3.0):
  """A scored rollout (no model needed): rows of 1..n real tokens, rewards whose mean is far
  from 0 (so whitening that shifts it is visible), values of another scale."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, n + 1, batch)
  lengths[0] = n
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
  logp = np.where(mask > 0, rng.normal(-2.0, 0.5, (batch, n)), 0.0).astype(np.float32)
  ref_logp = np.where(mask > 0, logp - rng.normal(0.1, 0.3, (batch, n)), 0.0).astype(np.float32)
  values = np.where(mask > 0, rng.normal(1.0, 2.0, (batch, n)), 0.0).astype(np.float32)
  score = rng.normal(score_mean, 1.5, batch).astype(np.float32)
  return dict(response_mask=jnp.asarray(mask), logp=jnp.asarray(logp),
              ref_logp=jnp.asarray(ref_logp), values=jnp.asarray(values),
              score=jnp.asarray(score))


# ---------------------------------------------------------------------------------------------
# Advantage phase: whitening of rewards and advantages, on and off
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("whiten_rewards", [True, False])
@pytest.mark.parametrize("whiten_advantages", [True, False])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_advantage_phase_matches_lm_human_preferences(whiten_rewards, whiten_advantages, gamma,
                                                      lam):
  """Catches: reward whitening that shifts the mean (returns move by about the mean times the
  remaining length), advantage whitening switched off, either flag ignored."""
  cfg = ppo.PPOConfig(whiten_rewards=whiten_rewards, whiten_advantages=whiten_advantages,
                      gamma_discount=gamma, gae_lambda=lam)
  rollout = random_rollout()
  beta = 0.05
  out, _ = ppo.advantage_phase(rollout, beta, cfg)
  rewards, advantages, returns = advantage_reference(rollout, beta, cfg)
  mask = np.asarray(rollout["response_mask"]) > 0
  np.testing.assert_allclose(out["rewards"], rewards, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["returns"], returns, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["advantages"], advantages, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out["advantages"])[~mask] == 0)
  assert np.all(np.asarray(out["returns"])[~mask] == 0)


def test_defaults_whiten_rewards_without_shifting_and_advantages_with():
  """lm-human-preferences' defaults: both whitenings on. Catches a default turned off."""
  cfg = ppo.PPOConfig()
  assert cfg.whiten_rewards and cfg.whiten_advantages
  rollout = random_rollout(seed=1)
  out, _ = ppo.advantage_phase(rollout, cfg.kl_coef, cfg)
  _, advantages, returns = advantage_reference(rollout, cfg.kl_coef, cfg)
  np.testing.assert_allclose(out["advantages"], advantages, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["returns"], returns, rtol=1e-5, atol=1e-5)


def test_whitened_rewards_keep_their_mean():
  """With gamma = lambda = 1 and no advantage whitening, the return at each row's first token is
  the row's sum of (whitened) rewards. Whitening without a shift keeps the mean, so the returns'
  total is the raw rewards' total; a whitening that shifts the mean makes it 0."""
  cfg = ppo.PPOConfig(whiten_rewards=True, whiten_advantages=False, gamma_discount=1.0,
                      gae_lambda=1.0)
  rollout = random_rollout(seed=2, score_mean=4.0)
  out, _ = ppo.advantage_phase(rollout, 0.05, cfg)
  mask = np.asarray(rollout["response_mask"]) > 0
  raw_total = float(np.asarray(out["rewards"], np.float64)[mask].sum())
  assert raw_total > 1.0  # far from 0: a mean-shifting whitening is visible
  first_returns = np.asarray(out["returns"], np.float64)[:, 0]  # every row has a real token 0
  np.testing.assert_allclose(first_returns.sum(), raw_total, rtol=1e-4)
  # ... and the whitened rewards do have unit spread: the returns are not the raw ones.
  plain, _ = ppo.advantage_phase(rollout, 0.05, dataclasses.replace(cfg, whiten_rewards=False))
  assert not np.allclose(out["returns"], plain["returns"], atol=1e-3)


def test_whitened_advantages_have_zero_mean_and_unit_variance_over_real_tokens():
  cfg = ppo.PPOConfig(whiten_advantages=True)
  rollout = random_rollout(seed=3)
  out, _ = ppo.advantage_phase(rollout, cfg.kl_coef, cfg)
  real = np.asarray(out["advantages"], np.float64)[np.asarray(rollout["response_mask"]) > 0]
  assert abs(real.mean()) < 1e-5 and abs(real.std() - 1.0) < 1e-4
  off, _ = ppo.advantage_phase(rollout, cfg.kl_coef, dataclasses.replace(cfg,
                                                                        whiten_advantages=False))
  unwhitened = np.asarray(off["advantages"], np.float64)[np.asarray(rollout["response_mask"]) > 0]
  assert abs(unwhitened.mean()) > 0.1 or abs(unwhitened.std() - 1.0) > 0.1


# ---------------------------------------------------------------------------------------------
# value_head_fit: the value head's (scale, bias) fitted to the first rollout's returns
# ---------------------------------------------------------------------------------------------

def value_fit_reference(rollout, beta, cfg: ppo.PPOConfig):
  """numpy least squares of the fixed point: with V' = a * values + b, the residual
  e(a, b) = V' - returns(V') over real tokens, returns by the loop reference above (shaping,
  whitening and GAE one token at a time). GAE is linear, so e is affine in (a, b) and its three
  evaluations at (0, 0), (1, 0), (0, 1) give the design; np.linalg.lstsq solves it.
  Returns (a, b, 0.5 * mean e^2, e as a function of (a, b))."""
  mask = np.asarray(rollout["response_mask"]) > 0
  values = np.asarray(rollout["values"], np.float64)

  def residual(a, b):
    mapped = np.where(mask, a * values + b, 0.0)
    _, _, returns = advantage_reference(dict(rollout, values=mapped), beta, cfg)
    return (mapped - returns)[mask]

  e00, e10, e01 = residual(0.0, 0.0), residual(1.0, 0.0), residual(0.0, 1.0)
  design = np.stack([e10 - e00, e01 - e00], axis=1)
  (a, b), *_ = np.linalg.lstsq(design, -e00, rcond=None)
  return a, b, 0.5 * np.mean(residual(a, b) ** 2), residual


@pytest.mark.parametrize("whiten_rewards", [True, False])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_value_head_fit_is_the_least_squares_fixed_point(whiten_rewards, gamma, lam):
  """Catches: a fit against returns computed with the old values (with lam < 1 the returns
  bootstrap from the values, so they move with the fit), against unwhitened rewards while GAE
  sees whitened ones, padding counted in the sums, or a wrong 2 x 2 solve."""
  cfg = ppo.PPOConfig(whiten_rewards=whiten_rewards, gamma_discount=gamma, gae_lambda=lam)
  rollout, beta = random_rollout(seed=3, batch=8), 0.05
  fit = jax.device_get(jax.jit(functools.partial(ppo.value_head_fit, cfg=cfg))(rollout, beta))
  a, b, loss, residual = value_fit_reference(rollout, beta, cfg)
  np.testing.assert_allclose([fit["scale"], fit["bias"]], [a, b], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(fit["loss"], loss, rtol=1e-4)
  np.testing.assert_allclose(fit["loss_before"], 0.5 * np.mean(residual(1.0, 0.0) ** 2), rtol=1e-4)
  # A minimum: no nearby (a, b) does better, and the values were off (the fit had work to do).
  for da, db in ((1e-2, 0), (-1e-2, 0), (0, 1e-2), (0, -1e-2)):
    assert 0.5 * np.mean(residual(a + da, b + db) ** 2) > loss
  assert fit["loss_before"] > 2 * fit["loss"]
  assert fit["explained_variance_after"] > fit["explained_variance_before"]
  if (gamma, lam) == (1.0, 1.0):  # Monte Carlo returns: the textbook regression on the values
    mask = np.asarray(rollout["response_mask"]) > 0
    _, _, returns = advantage_reference(rollout, beta, cfg)  # lam = 1: independent of values
    x = np.asarray(rollout["values"], np.float64)[mask]
    slope, intercept = np.polyfit(x, returns[mask], 1)
    np.testing.assert_allclose([fit["scale"], fit["bias"]], [slope, intercept], rtol=1e-4,
                               atol=1e-5)


def test_value_head_fit_of_a_zero_head_fits_the_bias_only():
  """A zero head (value_init="zero") has no direction to scale: scale stays 1, the bias is the
  one-parameter least squares, nothing is NaN."""
  cfg = ppo.PPOConfig()
  rollout = random_rollout(seed=4)
  rollout = dict(rollout, values=jnp.zeros_like(rollout["values"]))
  fit = jax.device_get(ppo.value_head_fit(rollout, 0.05, cfg))
  assert fit["scale"] == 1.0
  _, _, _, residual = value_fit_reference(rollout, 0.05, cfg)
  e0, slope = residual(1.0, 0.0), residual(1.0, 1.0) - residual(1.0, 0.0)
  np.testing.assert_allclose(fit["bias"], -(slope @ e0) / (slope @ slope), rtol=1e-4)
  assert all(np.isfinite(v) for v in fit.values())


def test_after_the_fit_the_first_value_loss_is_what_the_fit_promised():
  """The rollout scored again with the fitted head has values scale * v + bias: its advantage
  phase's value loss, and the first minibatch's (clipped) value loss, which equals it because
  values and old values coincide before the first step, are the fit's `loss`."""
  cfg = ppo.PPOConfig()
  rollout, beta = random_rollout(seed=5), 0.05
  fit = ppo.value_head_fit(rollout, beta, cfg)
  real = rollout["response_mask"] > 0
  fitted = dict(rollout, values=jnp.where(real, fit["scale"] * rollout["values"] + fit["bias"],
                                          0.0))
  out, metrics = ppo.advantage_phase(fitted, beta, cfg)
  np.testing.assert_allclose(metrics["rollout_value_loss"], fit["loss"], rtol=1e-5)
  first_step, _ = ppo.value_loss(out["values"], out["values"], out["returns"], real,
                                 cfg.value_clip_eps)
  np.testing.assert_allclose(first_step, fit["loss"], rtol=1e-5)
  _, before = ppo.advantage_phase(rollout, beta, cfg)
  np.testing.assert_allclose(before["rollout_value_loss"], fit["loss_before"], rtol=1e-5)
  np.testing.assert_allclose(metrics["explained_variance"], fit["explained_variance_after"],
                             rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The update's minibatches: a fresh permutation every epoch, keyed by fold_in(rng, step)
# ---------------------------------------------------------------------------------------------

def _recorded_minibatches(monkeypatch, cfg, state, rows):
  """Runs ppo_update with each optimiser step replaced by one that records the rows it got
  (their ids in token 0) and counts the step; returns (state, [epochs][minibatches] row ids)."""
  seen = []

  def fake_step(state, minibatch, ptx, **_):
    jax.debug.callback(lambda ids: seen.append(np.asarray(ids).tolist()),
                       minibatch["tokens"][:, 0], ordered=True)
    return dict(state, step=state["step"] + 1), dict(loss=jnp.zeros((), jnp.float32))

  monkeypatch.setattr(ppo, "_optimizer_step", fake_step)
  n, prompt = 3, 2
  rollout = dict(
      tokens=jnp.concatenate([jnp.arange(rows, dtype=jnp.int32)[:, None],
                              jnp.ones((rows, prompt - 1 + n), jnp.int32)], 1),
      mask=jnp.ones((rows, prompt + n), jnp.int32), response_mask=jnp.ones((rows, n), jnp.int32),
      **{k: jnp.zeros((rows, n), jnp.float32)
         for k in ("logp", "values", "advantages", "returns")})
  state, _ = ppo.ppo_update(state, rollout, None, policy_graphdef=None, value_graphdef=None,
                            optimizers={}, cfg=cfg)
  jax.effects_barrier()
  per_epoch = cfg.num_minibatches
  return state, [seen[e * per_epoch:(e + 1) * per_epoch] for e in range(cfg.ppo_epochs)]


def _state(seed=0, step=0):
  return dict(params={}, opt_state={}, step=jnp.asarray(step, jnp.int32),
              rng=jax.random.PRNGKey(seed), kl_coef=jnp.float32(0.1),
              bad_steps=jnp.zeros((), jnp.int32))


def test_every_epoch_reshuffles_the_rollout_into_new_minibatches(monkeypatch):
  """Catches: the same permutation every epoch (or none at all)."""
  rows = 16
  cfg = ppo.PPOConfig(ppo_epochs=4, num_minibatches=4, ptx_coef=0.0)
  state, epochs = _recorded_minibatches(monkeypatch, cfg, _state(), rows)
  assert int(state["step"]) == 16
  assert [len(e) for e in epochs] == [4] * 4 and all(len(m) == 4 for e in epochs for m in e)
  orders = [tuple(row for minibatch in epoch for row in minibatch) for epoch in epochs]
  for order in orders:  # every row exactly once per epoch
    assert sorted(order) == list(range(rows)), orders
  assert len(set(orders)) == 4, orders  # a different permutation in each epoch
  assert all(order != tuple(range(rows)) for order in orders), orders  # and shuffled at all
  # Different minibatch compositions too, not only a reordering of the same minibatches.
  compositions = [frozenset(frozenset(m) for m in epoch) for epoch in epochs]
  assert len(set(compositions)) == 4


def test_the_shuffle_is_keyed_by_the_state_rng_and_step(monkeypatch):
  """Deterministic given (rng, step), so a resumed run repeats it; a later update (its step has
  moved on) or another seed shuffles differently."""
  cfg = ppo.PPOConfig(ppo_epochs=2, num_minibatches=2, ptx_coef=0.0)
  orders = lambda state: _recorded_minibatches(monkeypatch, cfg, state, 8)
  first_state, first = orders(_state(seed=0, step=0))
  _, again = orders(_state(seed=0, step=0))
  assert first == again
  _, next_update = orders(first_state)  # the carried state: step 4
  assert int(first_state["step"]) == 4 and next_update != first
  _, same_step_later = orders(_state(seed=0, step=4))
  assert same_step_later == next_update
  _, other_seed = orders(_state(seed=1, step=0))
  assert other_seed != first


# ---------------------------------------------------------------------------------------------
# The entropy bonus: more entropy, lower loss
# ---------------------------------------------------------------------------------------------

def _tiny(**kw):
  return ModelConfig(**dict(dict(flavour="gpt2", vocab_size=16, d_model=32, n_layers=1, n_heads=4,
                                 max_len=32), **kw))


# Zero advantages (below), vf_coef 0 and no ptx: the entropy bonus is the only term with a gradient.
ENTROPY_CFG = ppo.PPOConfig(entropy_coef=0.5, vf_coef=0.0, ptx_coef=0.0)


@pytest.fixture(scope="module")
def entropy_setup():
  """A sharpened tiny policy (logits x 4 via the final norm scale, far from uniform), a value
  model and a rollout whose advantages are 0: the policy term has no gradient, so the entropy
  bonus alone moves the policy."""
  policy_graphdef, state = nnx.split(LanguageModel(_tiny(), rngs=nnx.Rngs(0)))
  policy = nnx.to_pure_dict(state)
  policy["backbone"]["final_norm_scale"] = 4.0 * policy["backbone"]["final_norm_scale"]
  value_graphdef, value_state = nnx.split(ScalarModel(_tiny(), rngs=nnx.Rngs(1)))
  rng = np.random.default_rng(0)
  batch, prompt, n = 4, 3, 5
  tokens = jnp.asarray(rng.integers(1, 16, (batch, prompt + n)), jnp.int32)
  rollout = dict(tokens=tokens, mask=jnp.ones_like(tokens),
                 response_mask=jnp.ones((batch, n), jnp.int32))
  rollout["logp"] = jax.jit(ppo.response_logprobs, static_argnums=0)(
      policy_graphdef, policy, tokens, rollout["mask"], rollout["response_mask"])
  rollout["values"] = jnp.zeros((batch, n))
  rollout["advantages"] = jnp.zeros((batch, n))
  rollout["returns"] = jnp.zeros((batch, n))
  return policy_graphdef, policy, value_graphdef, nnx.to_pure_dict(value_state), rollout


def entropy_reference(graphdef, policy, rollout):
  """Mean entropy (nats) of the policy's next-token distributions over the response, numpy."""
  logits = np.asarray(_response_logits(graphdef, policy, rollout["tokens"], rollout["mask"],
                                       rollout["response_mask"]), np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return float(-(p * np.log(p)).sum(-1).mean())


_response_logits = jax.jit(ppo.response_logits, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("policy_graphdef", "value_graphdef", "cfg"))
def _minibatch_grads(params, rollout, *, policy_graphdef, value_graphdef, cfg):
  return ppo.minibatch_grads(params, rollout, None, policy_graphdef=policy_graphdef,
                             value_graphdef=value_graphdef, cfg=cfg)


def _loss_and_grads(setup, policy, cfg):
  policy_graphdef, _, value_graphdef, value, rollout = setup
  grads, metrics = _minibatch_grads(dict(policy=policy, value=value), rollout,
                                    policy_graphdef=policy_graphdef,
                                    value_graphdef=value_graphdef, cfg=cfg)
  return grads, jax.device_get(metrics)


def test_entropy_bonus_lowers_the_loss_of_a_higher_entropy_policy(entropy_setup):
  """Catches: the entropy bonus with its sign flipped (the loss would rise with entropy)."""
  policy_graphdef, sharp, _, _, rollout = entropy_setup
  cfg = ENTROPY_CFG
  coef = cfg.entropy_coef
  flat = jax.tree.map(lambda x: x, sharp)
  flat["backbone"]["final_norm_scale"] = sharp["backbone"]["final_norm_scale"] / 8.0
  h_sharp = entropy_reference(policy_graphdef, sharp, rollout)
  h_flat = entropy_reference(policy_graphdef, flat, rollout)
  assert h_flat > h_sharp + 0.3, (h_flat, h_sharp)
  _, sharp_metrics = _loss_and_grads(entropy_setup, sharp, cfg)
  _, flat_metrics = _loss_and_grads(entropy_setup, flat, cfg)
  for metrics, h in ((sharp_metrics, h_sharp), (flat_metrics, h_flat)):
    np.testing.assert_allclose(metrics["entropy"], h, rtol=1e-4)
    # The whole loss, from its parts: policy + vf_coef * value - entropy_coef * entropy.
    np.testing.assert_allclose(metrics["loss"], metrics["policy_loss"] - coef * h, rtol=1e-4,
                               atol=1e-5)
  assert flat_metrics["loss"] < sharp_metrics["loss"]
  np.testing.assert_allclose(flat_metrics["loss"] - sharp_metrics["loss"],
                             -coef * (h_flat - h_sharp), rtol=1e-3)


def test_a_gradient_step_on_the_entropy_bonus_raises_the_entropy(entropy_setup):
  """Descending the loss must ascend the entropy when entropy_coef > 0 (and only the bonus has a
  gradient here: zero advantages, vf_coef 0)."""
  policy_graphdef, sharp, _, _, rollout = entropy_setup
  grads, _ = _loss_and_grads(entropy_setup, sharp, ENTROPY_CFG)
  assert float(optax_norm(grads["policy"])) > 0
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, sharp, grads["policy"])
  before = entropy_reference(policy_graphdef, sharp, rollout)
  after = entropy_reference(policy_graphdef, stepped, rollout)
  assert after > before + 1e-3, (before, after)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))

