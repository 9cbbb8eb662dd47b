"""Sampling responses from a policy: one prefill, then a KV-cached `lax.while_loop` decode.

Every stage after SFT needs samples: K responses per prompt for reward-model comparisons, PPO
rollouts (the hot loop) and evaluation. `sample` is a pure function (jit it with the config and
token ids static); `Sampler` owns a jitted, optionally sharded version that compiles once per
shape. `sample_uncached` recomputes the full forward at every step: the slow reference that
tests and the benchmark compare against.

Conventions:
  * Prompts are LEFT-padded, [B, P] with a mask (1 = real token); each row needs at least one
    real token. The model derives positions from the mask, so padding does not change the result.
  * Responses are [B, N] with N = max_new_tokens. A row ends at its first EOS: the EOS is part of
    the response (mask 1); later slots hold `pad_id` with mask 0 and log-prob 0.
  * `log_probs` are log_softmax(logits / temperature) of the chosen tokens: the distribution the
    training forward sees, NOT renormalised over the top-k / top-p survivors. PPO's ratio
    pi_new / pi_old must compare like with like, and the training forward never filters.
    Greedy decoding reports them at the configured temperature (1.0 by default).
  * Randomness: row b at step i draws from fold_in(fold_in(rng, b), i). Rows are independent, so
    repeated prompts differ, and the result does not depend on how the batch is sharded.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instructjax import parallel
from instructjax.errors import InputError
from instructjax.models.decoder import KVCache, in_compute_dtype


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each next token. top_k=0 and top_p=1.0 switch those filters off."""
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    problems = []
    if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
      problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
    if not self.temperature > 0:
      problems.append(f"temperature must be > 0, got {self.temperature!r} (use greedy=True for "
                      "argmax decoding)")
    if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
      problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      problems.append(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
    if problems:
      raise InputError("sampling config", "; ".join(problems))


class SampleOutput(NamedTuple):
  tokens: jax.Array     # [B, N] int32 response tokens, pad_id after the row's EOS
  mask: jax.Array       # [B, N] int32, 1 up to and including the EOS
  log_probs: jax.Array  # [B, N] float32 log_softmax(logits / T) of each token, 0 where mask is 0
  num_steps: jax.Array  # [] int32 sampling steps run (the first one comes from the prefill)


# ---------------------------------------------------------------------------------------------
# Choosing a token
# ---------------------------------------------------------------------------------------------

def top_k_keep(logits: jax.Array, k: int) -> jax.Array:
  """Boolean mask [..., V] of the k largest logits of each row (exactly k, ties by index)."""
  k = min(k, logits.shape[-1])
  _, index = jax.lax.top_k(logits, k)
  keep = jnp.zeros(logits.shape, bool)
  return jnp.put_along_axis(keep, index, True, axis=-1, inplace=False)


def top_p_keep(logits: jax.Array, p: float) -> jax.Array:
  """Boolean mask [..., V] of the nucleus: the smallest set of tokens, taken in descending
  probability, whose total probability reaches p. The token that crosses p is kept, and so is
  the most likely token always (whatever p)."""
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_before < p
  keep = jnp.zeros(logits.shape, bool)
  return jnp.put_along_axis(keep, order, keep_sorted, axis=-1, inplace=False)


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature-scaled logits with the filters' rejects set to -inf: top-k first, then top-p
  over the renormalised top-k survivors (Hugging Face's order). The sorts only run when a filter
  is on."""
  scaled = logits / config.temperature
  if config.top_k > 0:
    scaled = jnp.where(top_k_keep(scaled, config.top_k), scaled, -jnp.inf)
  if config.top_p < 1.0:
    scaled = jnp.where(top_p_keep(scaled, config.top_p), scaled, -jnp.inf)
  return scaled


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
  """One key per row, from the row's index in the global batch."""
  return jax.vmap(lambda row: jax.random.fold_in(rng, row))(jnp.arange(batch))


def choose(logits: jax.Array, keys: jax.Array, step, config: SamplingConfig):
  """Next token [B] and its log-prob under log_softmax(logits / T), from float32 logits [B, V]."""
  logits = logits.astype(jnp.float32)
  if config.greedy:
    token = jnp.argmax(logits, axis=-1)
  else:
    filtered = filter_logits(logits, config)
    draw = lambda key, row: jax.random.categorical(jax.random.fold_in(key, step), row)
    token = jax.vmap(draw)(keys, filtered)
  token = token.astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits / config.temperature, axis=-1)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def response_mask(tokens: jax.Array, eos_id: int) -> jax.Array:
  """1 up to and including each row's first EOS (works when pad_id == eos_id too)."""
  is_eos = (tokens == eos_id).astype(jnp.int32)
  eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos
  return (eos_before == 0).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The loop both implementations share
# ---------------------------------------------------------------------------------------------

class _Loop(NamedTuple):
  step: jax.Array       # next response slot to fill
  token: jax.Array      # [B] the token chosen at step - 1
  done: jax.Array       # [B] the row has emitted EOS
  tokens: jax.Array     # [B, N]
  log_probs: jax.Array  # [B, N]
  model_state: Any      # the cache (cached decode) or nothing


def _record(loop: _Loop, token, log_prob, *, eos_id, pad_id) -> tuple:
  """Writes step `loop.step`'s choice; a finished row writes pad and log-prob 0."""
  token = jnp.where(loop.done, pad_id, token)
  log_prob = jnp.where(loop.done, 0.0, log_prob)
  tokens = jax.lax.dynamic_update_slice_in_dim(loop.tokens, token[:, None], loop.step, axis=1)
  log_probs = jax.lax.dynamic_update_slice_in_dim(loop.log_probs, log_prob[:, None], loop.step,
                                                  axis=1)
  return token, loop.done | (token == eos_id), tokens, log_probs


def _generate(first_logits, next_logits: Callable, model_state, rng, *, config: SamplingConfig,
              eos_id: int, pad_id: int) -> SampleOutput:
  """Samples step 0 from the prefill's logits, then loops `next_logits` until every row is done.

  next_logits(model_state, step, token [B], tokens [B, N]) -> (logits [B, V], model_state) gives
  the logits for response slot `step`, `token` being the one chosen at slot step - 1.
  """
  batch, n = first_logits.shape[0], config.max_new_tokens
  keys = row_keys(rng, batch)
  loop = _Loop(jnp.int32(0), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool),
               jnp.full((batch, n), pad_id, jnp.int32), jnp.zeros((batch, n), jnp.float32),
               model_state)
  token, log_prob = choose(first_logits, keys, 0, config)
  token, done, tokens, log_probs = _record(loop, token, log_prob, eos_id=eos_id, pad_id=pad_id)
  loop = _Loop(jnp.int32(1), token, done, tokens, log_probs, model_state)

  def cond(loop):
    return (loop.step < n) & ~jnp.all(loop.done)

  def body(loop):
    logits, model_state = next_logits(loop.model_state, loop.step, loop.token, loop.tokens)
    token, log_prob = choose(logits, keys, loop.step, config)
    token, done, tokens, log_probs = _record(loop, token, log_prob, eos_id=eos_id, pad_id=pad_id)
    return _Loop(loop.step + 1, token, done, tokens, log_probs, model_state)

  loop = jax.lax.while_loop(cond, body, loop)
  return SampleOutput(loop.tokens, response_mask(loop.tokens, eos_id), loop.log_probs, loop.step)


# ---------------------------------------------------------------------------------------------
# Cached and uncached sampling
# ---------------------------------------------------------------------------------------------

def check_prompts(prompt_tokens, prompt_mask) -> None:
  """Shapes always; content (a real token per row, left padding) on concrete inputs only, since
  a traced value cannot be inspected."""
  if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
    raise InputError("prompts", f"tokens {prompt_tokens.shape} and mask {prompt_mask.shape} must "
                     "both be [batch, prompt_len]")
  if isinstance(prompt_mask, jax.core.Tracer) or (
      isinstance(prompt_mask, jax.Array) and not prompt_mask.is_fully_addressable):
    return
  mask = np.asarray(prompt_mask) > 0
  empty = np.flatnonzero(~mask.any(1))
  if empty.size:
    raise InputError(f"prompt row {empty[0]}", "has no real token (mask is all 0)")
  # Left padding: once a row's real tokens start, they continue to the last column.
  not_left = np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(1))
  if not_left.size:
    raise InputError(f"prompt row {not_left[0]}", "is not left-padded (a real token is followed "
                     "by padding); responses are appended after the last column")


def _check_length(cfg, prompt_len: int, config: SamplingConfig) -> None:
  total = prompt_len + config.max_new_tokens
  if cfg.position == "learned" and total > cfg.max_len:
    raise InputError("sampling config", f"prompt_len {prompt_len} + max_new_tokens "
                     f"{config.max_new_tokens} = {total} exceeds the model's max_len {cfg.max_len}")


def _prefill(model, prompt_tokens, prompt_mask, cache_len: int):
  """Runs the prompts through the model into a fresh cache; returns (last logits [B, V], cache)."""
  batch, prompt_len = prompt_tokens.shape
  key_valid = jnp.zeros((batch, cache_len), bool).at[:, :prompt_len].set(prompt_mask > 0)
  cache = KVCache.zeros(model.cfg, batch, cache_len)
  hidden, cache = model.backbone(prompt_tokens, prompt_mask, cache=cache, cache_index=0,
                                 key_valid=key_valid)
  # Left padding puts every row's last real token in the last column; only it is unembedded.
  return model.unembed(hidden[:, -1:])[:, 0], cache


def prefill(graphdef, params, prompt_tokens, prompt_mask, *, max_new_tokens: int):
  """The prefill alone (the benchmark times it): (last logits [B, V], KV cache)."""
  model = nnx.merge(graphdef, params)
  return _prefill(model, prompt_tokens, prompt_mask, prompt_tokens.shape[1] + max_new_tokens)


def sample(graphdef, params, prompt_tokens, prompt_mask, rng, *, config: SamplingConfig,
           eos_id: int, pad_id: int) -> SampleOutput:
  """Samples `config.max_new_tokens` tokens after each left-padded prompt, with a KV cache.

  One prefill over the prompts, then a `lax.while_loop` feeding one token per step into the cache
  (length P + N); it stops when every row has emitted EOS or N tokens are out. Pure: jit it with
  `config`, `eos_id` and `pad_id` static.
  """
  model = nnx.merge(graphdef, params)
  check_prompts(prompt_tokens, prompt_mask)
  _check_length(model.cfg, prompt_tokens.shape[1], config)
  batch, prompt_len = prompt_tokens.shape
  prompt_valid = prompt_mask > 0
  n_real = prompt_valid.sum(1).astype(jnp.int32)
  first_logits, cache = _prefill(model, prompt_tokens, prompt_mask,
                                 prompt_len + config.max_new_tokens)
  model = nnx.merge(graphdef, in_compute_dtype(params, model.cfg.compute_dtype))
  weights = model.backbone.decode_weights()
  response_slots = jnp.arange(config.max_new_tokens)

  def next_logits(cache, step, token, _):
    # The token chosen at slot step - 1 goes into cache slot P + step - 1; it is the row's
    # (n_real + step - 1)-th real token. Keys: the real prompt tokens and the responses so far.
    key_valid = jnp.concatenate(
        [prompt_valid, jnp.broadcast_to(response_slots < step, (batch, response_slots.size))], 1)
    return model.decode_step(weights, token, n_real + step - 1, cache, prompt_len + step - 1,
                             key_valid)

  return _generate(first_logits, next_logits, cache.heads_major(), rng, config=config,
                   eos_id=eos_id, pad_id=pad_id)


def sample_uncached(graphdef, params, prompt_tokens, prompt_mask, rng, *, config: SamplingConfig,
                    eos_id: int, pad_id: int) -> SampleOutput:
  """Reference for `sample` with the same semantics and randomness: every step recomputes the
  full forward over prompt + response so far (length P + N, the rest masked). Slow on purpose."""
  model = nnx.merge(graphdef, params)
  check_prompts(prompt_tokens, prompt_mask)
  _check_length(model.cfg, prompt_tokens.shape[1], config)
  prompt_len = prompt_tokens.shape[1]
  response_slots = jnp.arange(config.max_new_tokens)

  def logits_at(step, tokens):
    """Logits predicting response slot `step`, given response tokens [B, N] filled before it."""
    batch = tokens.shape[0]
    generated = jnp.broadcast_to(response_slots < step, (batch, response_slots.size))
    sequence = jnp.concatenate([prompt_tokens, tokens], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), generated.astype(jnp.int32)], 1)
    logits, _ = model(sequence, mask)
    return jax.lax.dynamic_index_in_dim(logits, prompt_len + step - 1, axis=1, keepdims=False)

  batch = prompt_tokens.shape[0]
  empty = jnp.full((batch, config.max_new_tokens), pad_id, jnp.int32)
  first_logits = logits_at(0, empty)
  next_logits = lambda state, step, token, tokens: (logits_at(step, tokens), state)
  return _generate(first_logits, next_logits, (), rng, config=config, eos_id=eos_id,
                   pad_id=pad_id)


def repeat_prompts(tokens, mask, k: int):
  """Each prompt k times in a row ([B, P] -> [B * k, P]), for K samples per prompt; row b * k + j
  is sample j of prompt b."""
  if k < 1:
    raise InputError("repeat_prompts", f"k must be >= 1, got {k}")
  return jnp.repeat(tokens, k, axis=0), jnp.repeat(mask, k, axis=0)


# ---------------------------------------------------------------------------------------------
# A jitted, optionally sharded sampler
# ---------------------------------------------------------------------------------------------

class Sampler:
  """`sample` jitted once for a model and a SamplingConfig.

  Without a mesh it is a plain jit. With a mesh, prompts and outputs are sharded over the batch
  axes (data x fsdp), parameters are laid out by `param_shardings` (NamedShardings, e.g. from
  `parallel.named(mesh, parallel.param_specs(...))`; replicated when None), and tracing runs
  under the mesh and the logical-axis rules so the model's activation constraints apply. The
  same shapes never recompile; `trace_count` counts traces (one per new shape).
  """

  def __init__(self, graphdef, config: SamplingConfig, *, eos_id: int, pad_id: int,
               mesh: Mesh | None = None, param_shardings: Any = None,
               rules: parallel.Rules = parallel.DEFAULT_RULES, fn: Callable = sample):
    self.config = config
    self.mesh = mesh
    self.rules = tuple(rules)
    self.trace_count = 0

    def traced(params, prompt_tokens, prompt_mask, rng):
      self.trace_count += 1  # runs at trace time only
      return fn(graphdef, params, prompt_tokens, prompt_mask, rng, config=config, eos_id=eos_id,
                pad_id=pad_id)

    if mesh is None:
      self._jitted = jax.jit(traced)
    else:
      rows = parallel.batch_sharding(mesh, 2)
      whole = NamedSharding(mesh, PartitionSpec())
      params_in = whole if param_shardings is None else param_shardings
      self._jitted = jax.jit(traced, in_shardings=(params_in, rows, rows, whole),
                             out_shardings=SampleOutput(rows, rows, rows, whole))

  def __call__(self, params, prompt_tokens, prompt_mask, rng) -> SampleOutput:
    check_prompts(prompt_tokens, prompt_mask)  # inside jit the content could not be checked
    if self.mesh is None:
      return self._jitted(params, prompt_tokens, prompt_mask, rng)
    batch, shards = prompt_tokens.shape[0], parallel.batch_divisor(self.mesh)
    if batch % shards:
      raise InputError("prompts", f"batch {batch} is not divisible by the {shards} batch shards "
                       "(data x fsdp); pad the batch or change the mesh")
    with jax.set_mesh(self.mesh), parallel.axis_rules(self.rules):
      return self._jitted(params, prompt_tokens, prompt_mask, rng)
