"""The decoder backbone and its heads, as Flax NNX modules used functionally.

Every parameter is an `nnx.Param` with `logical_axes` metadata (see `instructjax.parallel`). The
layers are stored stacked along a leading "layers" axis and run with `lax.scan`, so compile time
does not grow with depth. Callers `nnx.split` a model once and pass its parameters as a pure dict
into jitted steps, where `nnx.merge(graphdef, params)` rebuilds it.

Padding: `mask` marks real tokens. Position ids come from the mask (`cumsum(mask) - 1`), and
padding keys are hidden from attention, so left-padded and unpadded prompts give the same logits
for their real tokens.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from instructjax.models import layers
from instructjax.models.config import ModelConfig
from instructjax.parallel import logical_constraint


def _param(key, shape, std, names, dtype=jnp.float32):
  value = jnp.zeros(shape, dtype) if std == 0 else std * jax.random.normal(key, shape, dtype)
  return nnx.Param(value, logical_axes=names)


def _ones(shape, names):
  return nnx.Param(jnp.ones(shape, jnp.float32), logical_axes=names)


# Finite (not -inf) so that p * log p and masked sums stay 0 rather than NaN.
PADDING_LOGIT = -1e9


class KVCache(NamedTuple):
  """Keys and values of every layer: [layers, batch, cache_length, kv_heads, head_dim]."""
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  LOGICAL_AXES = ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")

  def heads_major(self) -> tuple:
    """Per layer (k, v), each [B, K, S, H]: the decode step's layout (`Decoder.decode_step`)."""
    names = ("batch", "act_kv_heads", "cache_length", "head_dim")
    to = lambda x: logical_constraint(jnp.swapaxes(x, 1, 2), names)
    return tuple((to(self.k[i]), to(self.v[i])) for i in range(self.k.shape[0]))


class StackedLayers(nnx.Module):
  """All transformer blocks' parameters, stacked on a leading layer axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    L, D, N, K, H, F = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                        cfg.d_ff)
    std = cfg.init_std
    residual_std = std / (2 * L) ** 0.5  # GPT-2: keep the residual stream's variance flat in depth
    self.attn_norm_scale = _ones((L, D), ("layers", "embed"))
    self.mlp_norm_scale = _ones((L, D), ("layers", "embed"))
    self.wq = _param(rngs.params(), (L, D, N, H), std, ("layers", "embed", "heads", "head_dim"))
    self.wk = _param(rngs.params(), (L, D, K, H), std, ("layers", "embed", "kv_heads", "head_dim"))
    self.wv = _param(rngs.params(), (L, D, K, H), std, ("layers", "embed", "kv_heads", "head_dim"))
    self.wo = _param(rngs.params(), (L, N, H, D), residual_std,
                     ("layers", "heads", "head_dim", "embed"))
    if cfg.mlp == "swiglu":
      self.w_gate = _param(rngs.params(), (L, D, F), std, ("layers", "embed", "mlp"))
      self.w_up = _param(rngs.params(), (L, D, F), std, ("layers", "embed", "mlp"))
      self.w_down = _param(rngs.params(), (L, F, D), residual_std, ("layers", "mlp", "embed"))
    else:
      self.w_in = _param(rngs.params(), (L, D, F), std, ("layers", "embed", "mlp"))
      self.w_out = _param(rngs.params(), (L, F, D), residual_std, ("layers", "mlp", "embed"))
    if cfg.norm == "layernorm":
      self.attn_norm_bias = _param(None, (L, D), 0, ("layers", "embed"))
      self.mlp_norm_bias = _param(None, (L, D), 0, ("layers", "embed"))
    if cfg.use_bias:
      self.bq = _param(None, (L, N, H), 0, ("layers", "heads", "head_dim"))
      self.bk = _param(None, (L, K, H), 0, ("layers", "kv_heads", "head_dim"))
      self.bv = _param(None, (L, K, H), 0, ("layers", "kv_heads", "head_dim"))
      self.bo = _param(None, (L, D), 0, ("layers", "embed"))
      if cfg.mlp == "gelu":
        self.b_in = _param(None, (L, F), 0, ("layers", "mlp"))
        self.b_out = _param(None, (L, D), 0, ("layers", "embed"))

  def stacked(self) -> dict[str, jax.Array]:
    return {name: value[...] for name, value in vars(self).items() if isinstance(value, nnx.Param)}


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  saveable = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots"
              else jax.checkpoint_policies.nothing_saveable)
  return jax.checkpoint(fn, policy=saveable)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position of each token among the real tokens of its row (padding gets 0)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
  """Token + position embeddings, scanned blocks, final norm: hidden states [B, T, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs.params(), (cfg.vocab_size, cfg.d_model), cfg.init_std,
                        ("vocab", "embed"))
    if cfg.position == "learned":
      self.pos_embed = _param(rngs.params(), (cfg.max_len, cfg.d_model), cfg.init_std / 2,
                              ("position", "embed"))
    self.layers = StackedLayers(cfg, rngs=rngs)
    self.final_norm_scale = _ones((cfg.d_model,), ("embed",))
    if cfg.norm == "layernorm":
      self.final_norm_bias = _param(None, (cfg.d_model,), 0, ("embed",))

  def __call__(self, tokens, mask, *, positions=None, cache: KVCache | None = None,
               cache_index=None, key_valid=None, dropout_rng=None):
    """Runs the backbone.

    Without a cache, attention is over the T given tokens (`mask` [B, T] marks real ones). With a
    cache, the tokens are written at slot `cache_index` and attend over the whole cache, where
    `key_valid` [B, S] marks the slots holding real tokens (this chunk's included). Returns
    (hidden [B, T, D], the updated cache or None).
    """
    cfg = self.cfg
    T = tokens.shape[1]
    if positions is None:
      positions = positions_from_mask(mask)
    if cache is None:
      attn_mask = layers.attention_mask(jnp.arange(T), mask.astype(bool))
    else:
      attn_mask = layers.attention_mask(cache_index + jnp.arange(T), key_valid.astype(bool))

    x = self.embed_tokens(tokens, positions)
    embed_key, layer_keys = None, None
    if dropout_rng is not None and cfg.dropout > 0:
      embed_key, layers_key = jax.random.split(dropout_rng)
      layer_keys = jax.random.split(layers_key, cfg.n_layers)
    x = layers.dropout(x, cfg.dropout, embed_key)
    x = logical_constraint(x, ("batch", "length", "act_embed"))

    def body(x, per_layer):
      p, kv, key = per_layer
      x, kv = layers.block(cfg, x, p, positions, attn_mask, kv, cache_index, key)
      return x, kv

    kv_in = None if cache is None else (cache.k, cache.v)
    x, kv_out = jax.lax.scan(_remat(body, cfg.remat), x,
                             (self.layers.stacked(), kv_in, layer_keys), unroll=cfg.scan_unroll)
    return self.final_norm(x), (None if cache is None else KVCache(*kv_out))

  def embed_tokens(self, tokens, positions):
    """Token (and learned position) embeddings in the compute dtype, [B, T, D]."""
    cfg = self.cfg
    x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype)
    if cfg.position == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(cfg.compute_dtype)
    return x

  def final_norm(self, x):
    final = {"final_norm_scale": self.final_norm_scale[...]}
    if self.cfg.norm == "layernorm":
      final["final_norm_bias"] = self.final_norm_bias[...]
    return layers.normalize(self.cfg, x, final, "final_norm")

  # The decode step. `__call__` with a cache is correct but slow for one token at a time: its
  # `lax.scan` over stacked layers slices every weight and round-trips the whole [layers, ...]
  # cache through fresh buffers each step, and its [B, S, K, H] cache layout makes the attention
  # dots transpose the cache. `decode_step` instead keeps one heads-major [B, K, S, H] cache per
  # layer (`KVCache.heads_major`, updated in place) and unrolls the layers over weights sliced
  # once before the decode loop (`decode_weights`), with the same layer functions; its logits
  # are checked against the full forward in tests/test_sampling.py.

  def decode_weights(self) -> list[dict[str, jax.Array]]:
    """Each layer's weights, sliced once. The barrier stops XLA from sinking the slices back into
    the loop body, where they would copy every weight on every step."""
    stacked = self.layers.stacked()
    per_layer = [{name: w[i] for name, w in stacked.items()} for i in range(self.cfg.n_layers)]
    return jax.lax.optimization_barrier(per_layer)

  def decode_step(self, weights, token, positions, cache: tuple, slot, key_valid):
    """Hidden states [B, 1, D] of one new token per row (token, positions: [B]) written at cache
    `slot`, and the updated heads-major cache."""
    x = self.embed_tokens(token[:, None], positions[:, None])
    new_cache = []
    for p, (k_cache, v_cache) in zip(weights, cache):
      x, k_cache, v_cache = layers.one_token_block(self.cfg, x, p, positions[:, None], k_cache,
                                                   v_cache, slot, key_valid)
      new_cache.append((k_cache, v_cache))
    return self.final_norm(x), tuple(new_cache)


class LanguageModel(nnx.Module):
  """Backbone + unembedding (tied to the token embedding in the GPT-2 flavour)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Decoder(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs.params(), (cfg.d_model, cfg.vocab_size), cfg.init_std,
                            ("embed", "vocab"))

  def unembed(self, hidden):
    """Logits in float32 (losses and sampling need the precision).

    The table is padded past the tokenizer's vocabulary (so it shards and tiles evenly); those ids
    stand for no text, so their logits are masked here, once, for training, sampling and PPO alike.
    """
    cfg = self.cfg
    dtype = cfg.compute_dtype
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", hidden, self.backbone.embed[...].astype(dtype))
    else:
      logits = jnp.einsum("btd,dv->btv", hidden, self.lm_head[...].astype(dtype))
    logits = logits.astype(jnp.float32)
    if cfg.real_vocab_size is not None and cfg.real_vocab_size < cfg.vocab_size:
      real = jnp.arange(cfg.vocab_size) < cfg.real_vocab_size
      logits = jnp.where(real, logits, PADDING_LOGIT)
    return logical_constraint(logits, ("batch", "length", "act_vocab"))

  def __call__(self, tokens, mask, **kwargs):
    """Returns (logits [B, T, V] float32, cache)."""
    hidden, cache = self.backbone(tokens, mask, **kwargs)
    return self.unembed(hidden), cache

  def decode_step(self, weights, token, positions, cache: tuple, slot, key_valid):
    """Logits [B, V] of one new token per row and the updated cache (`Decoder.decode_step`)."""
    hidden, cache = self.backbone.decode_step(weights, token, positions, cache, slot, key_valid)
    return self.unembed(hidden)[:, 0], cache


def in_compute_dtype(params, dtype) -> Any:
  """The parameters the layers cast to the compute dtype at every use (every weight and bias but
  the norms', which enter float32 maths), cast once. Parameters stay float32 and every layer
  casts them per call: inside the decode loop that re-read the float32 weights and wrote a
  bfloat16 copy at every token, three times the bytes of the step's own reads (measured on an
  H200: half of a 1.1B model's decode time in those converts). Same values, so the same logits.
  The barrier keeps XLA from sinking the casts back into the loop."""
  def cast(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    return x.astype(dtype) if floating and "norm" not in name else x
  return jax.lax.optimization_barrier(jax.tree_util.tree_map_with_path(cast, params))


class ScalarModel(nnx.Module):
  """Backbone + a scalar head: a reward read at the last real token, or a value at every token."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, head_std: float | None = None):
    self.cfg = cfg
    self.backbone = Decoder(cfg, rngs=rngs)
    std = (1.0 / (cfg.d_model + 1) ** 0.5) if head_std is None else head_std
    self.head_w = _param(rngs.params(), (cfg.d_model,), std, ("embed",))
    self.head_b = _param(None, (), 0, ())

  def __call__(self, tokens, mask, **kwargs):
    """Returns the scalar at every position, [B, T] float32."""
    hidden, _ = self.backbone(tokens, mask, **kwargs)
    values = jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), self.head_w[...])
    return values + self.head_b[...]


def last_token(values: jax.Array, mask: jax.Array) -> jax.Array:
  """values[b, last real position of row b], whatever the padding side."""
  T = mask.shape[-1]
  last = (T - 1) - jnp.argmax(jnp.flip(mask.astype(jnp.int32), -1), axis=-1)
  return jnp.take_along_axis(values, last[:, None], axis=-1)[:, 0]
