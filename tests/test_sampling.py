"""Sampling: cached decode vs full recompute, padding, filters, temperature, EOS, sharding, jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from instructjax import parallel
from instructjax.errors import InputError
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel
from instructjax.models.decoder import in_compute_dtype
from instructjax.sampling import (Sampler, SamplingConfig, choose, filter_logits, repeat_prompts,
                                  response_mask, row_keys, sample, sample_uncached, top_k_keep,
                                  top_p_keep)

PAD = 0


def tiny(flavour, **kw):
  # A larger init than the default 0.02 so that greedy continuations are not all one token.
  base = dict(flavour=flavour, vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=64,
              init_std=0.3)
  if flavour == "llama":
    base["n_kv_heads"] = 2  # grouped-query attention
  base.update(kw)
  return ModelConfig(**base)


def split(cfg, seed=0):
  graphdef, state = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def left_pad(rows, width=None):
  """Left-pads lists of token ids into (tokens, mask)."""
  width = width or max(map(len, rows))
  tokens = np.full((len(rows), width), PAD, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    tokens[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  return jnp.asarray(tokens), jnp.asarray(mask)


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 3, 40, 5, 1], [7]]
GREEDY = SamplingConfig(10, greedy=True)
SAMPLED = SamplingConfig(10, temperature=0.8, top_k=20, top_p=0.9)
NO_EOS = -1  # never matches: every row runs to max_new_tokens


# Compilation dominates this file's time, so tests share models and jitted samplers.
@functools.lru_cache(maxsize=None)
def model(flavour):
  return split(tiny(flavour))


@functools.lru_cache(maxsize=None)
def sampler(flavour, config, eos_id=NO_EOS, fn=sample):
  return Sampler(model(flavour)[0], config, eos_id=eos_id, pad_id=PAD, fn=fn)


def run(flavour, config, prompts, mask, seed=0, eos_id=NO_EOS, fn=sample):
  return sampler(flavour, config, eos_id, fn)(model(flavour)[1], prompts, mask,
                                              jax.random.PRNGKey(seed))


def full_log_softmax(flavour, prompts, prompt_mask, out, temperature):
  """log_softmax(logits / T) of the response tokens from ONE full forward (the training view)."""
  graphdef, params = model(flavour)

  @jax.jit
  def forward(params, tokens, mask, temperature):
    logits, _ = nnx.merge(graphdef, params)(tokens, mask)
    return jax.nn.log_softmax(logits / temperature, -1)

  log_probs = forward(params, jnp.concatenate([prompts, out.tokens], 1),
                      jnp.concatenate([prompt_mask, out.mask], 1), temperature)
  log_probs = log_probs[:, prompts.shape[1] - 1:-1]  # position t predicts token t + 1
  return jnp.take_along_axis(log_probs, out.tokens[..., None], -1)[..., 0]


# ---------------------------------------------------------------------------------------------
# Cached decode == full recompute
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour,config", [("gpt2", GREEDY), ("llama", SAMPLED)])
def test_cached_decode_equals_full_recompute(flavour, config):
  prompts, mask = left_pad(PROMPTS)
  cached = run(flavour, config, prompts, mask, seed=3)
  full = run(flavour, config, prompts, mask, seed=3, fn=sample_uncached)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_array_equal(cached.mask, full.mask)
  np.testing.assert_allclose(cached.log_probs, full.log_probs, atol=1e-5)
  assert int(cached.num_steps) == int(full.num_steps) == 10
  # Not a degenerate model: the continuations differ between prompts.
  assert len({tuple(row) for row in np.asarray(cached.tokens)}) > 1


def test_decode_weights_are_cast_once_with_the_values_each_layer_would_use():
  """Every weight and bias in the compute dtype, the norms' left in float32 (they enter float32
  maths), and the same values the layers' own per-use casts give."""
  _, params = split(tiny("gpt2", dtype="bfloat16"))
  cast = in_compute_dtype(params, jnp.bfloat16)
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, x in jax.tree_util.tree_flatten_with_path(cast)[0]:
    name = str(path[-1].key)
    expected = flat[path] if "norm" in name else flat[path].astype(jnp.bfloat16)
    assert x.dtype == expected.dtype, name
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(expected, np.float32))
  assert {str(p[-1].key) for p, x in jax.tree_util.tree_flatten_with_path(cast)[0]
          if x.dtype == jnp.float32} == {"attn_norm_scale", "attn_norm_bias", "mlp_norm_scale",
                                         "mlp_norm_bias", "final_norm_scale", "final_norm_bias"}


def test_bfloat16_cached_decode_follows_the_bfloat16_recompute():
  cfg = tiny("llama", dtype="bfloat16")
  graphdef, params = split(cfg)
  prompts, mask = left_pad(PROMPTS)
  outs = [jax.jit(functools.partial(fn, graphdef, config=GREEDY, eos_id=NO_EOS, pad_id=PAD))(
      params, prompts, mask, jax.random.PRNGKey(0)) for fn in (sample, sample_uncached)]
  # bfloat16 rounding differs between the two paths, so a near tie may flip one argmax; the
  # first tokens and the log-probs must agree.
  np.testing.assert_array_equal(outs[0].tokens[:, :3], outs[1].tokens[:, :3])
  np.testing.assert_allclose(outs[0].log_probs[:, :3], outs[1].log_probs[:, :3], atol=0.05)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_left_padding_does_not_change_the_continuation(flavour):
  narrow = run(flavour, GREEDY, *left_pad(PROMPTS))        # PROMPTS[0] fills all 6 columns
  wide = run(flavour, GREEDY, *left_pad(PROMPTS, 11))      # ... and here has 5 pads
  np.testing.assert_array_equal(wide.tokens, narrow.tokens)
  np.testing.assert_allclose(wide.log_probs, narrow.log_probs, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Filters and temperature
# ---------------------------------------------------------------------------------------------

def reference_top_p(probs, p):
  """Walks the tokens by descending probability until the kept mass reaches p."""
  keep, mass = set(), 0.0
  for index in sorted(range(len(probs)), key=lambda i: -probs[i]):
    keep.add(index)
    mass += probs[index]
    if mass >= p:
      break
  return keep


def kept(mask_row):
  return set(np.flatnonzero(np.asarray(mask_row)).tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  assert kept(top_p_keep(logits, 0.1)[0]) == {1}           # the top token alone reaches 0.1
  assert kept(top_p_keep(logits, 0.6)[0]) == {1, 3}        # 0.5 < 0.6 <= 0.8: the crosser kept
  assert kept(top_p_keep(logits, 0.79)[0]) == {1, 3}
  assert kept(top_p_keep(logits, 0.81)[0]) == {1, 3, 2}
  assert kept(top_p_keep(logits, 0.99)[0]) == {0, 1, 2, 3}
  # Random distributions (several rows at once) against the slow walk.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 16)) * 2
  for p in (0.2, 0.5, 0.9):
    keep = np.asarray(top_p_keep(jnp.asarray(logits, jnp.float32), p))
    for row, keep_row in zip(logits, keep):
      probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
      assert kept(keep_row) == reference_top_p(probs, p)


def test_top_k_keeps_the_k_largest():
  logits = jnp.array([[0.1, 3.0, -1.0, 2.0, 0.5]])
  assert kept(top_k_keep(logits, 1)[0]) == {1}
  assert kept(top_k_keep(logits, 3)[0]) == {1, 3, 4}
  assert kept(top_k_keep(logits, 99)[0]) == {0, 1, 2, 3, 4}


def test_top_p_applies_to_the_renormalised_top_k_survivors():
  logits = jnp.log(jnp.array([[0.4, 0.35, 0.25]]))
  # Over the full distribution 0.4 < 0.5 would keep two tokens; after top-2 the first has 0.53.
  filtered = filter_logits(logits, SamplingConfig(1, top_k=2, top_p=0.5))
  assert kept(jnp.isfinite(filtered)[0]) == {0}


def test_draws_follow_the_filtered_distribution():
  probs = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (20000, 5))
  config = SamplingConfig(1, top_k=3)
  keys = row_keys(jax.random.PRNGKey(0), logits.shape[0])
  tokens, log_probs = jax.jit(lambda l, k: choose(l, k, 0, config))(logits, keys)
  frequencies = np.bincount(np.asarray(tokens), minlength=5) / len(tokens)
  expected = np.where(np.isin(np.arange(5), [1, 3, 4]), probs, 0) / 0.85
  np.testing.assert_allclose(frequencies, expected, atol=0.015)
  np.testing.assert_allclose(log_probs, np.log(probs)[np.asarray(tokens)], rtol=1e-5)


def test_top_k_one_is_greedy():
  prompts, mask = left_pad(PROMPTS)
  greedy = run("llama", GREEDY, prompts, mask)
  top1 = run("llama", SamplingConfig(10, top_k=1), prompts, mask, seed=5)
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  np.testing.assert_allclose(top1.log_probs, greedy.log_probs, atol=1e-6)


def test_log_probs_are_temperature_scaled_and_not_renormalised():
  prompts, mask = left_pad(PROMPTS)
  out = run("llama", SAMPLED, prompts, mask, seed=1)  # temperature 0.8, top-k and top-p on
  expected = full_log_softmax("llama", prompts, mask, out, SAMPLED.temperature)
  np.testing.assert_allclose(out.log_probs, expected * out.mask, atol=1e-5)
  unscaled = full_log_softmax("llama", prompts, mask, out, 1.0)
  assert np.abs(np.asarray(out.log_probs - unscaled)).max() > 1e-2  # the check can fail


# ---------------------------------------------------------------------------------------------
# EOS
# ---------------------------------------------------------------------------------------------

def test_rows_stop_independently_at_eos():
  prompts, mask = left_pad(PROMPTS)
  free = run("llama", SAMPLED, prompts, mask, seed=3)
  free_tokens = np.asarray(free.tokens)
  # EOS := the first token row 0 emits that it had not emitted before (at step `first`). The
  # same rng draws the same tokens up to each row's EOS.
  first = next(s for s in range(1, 10) if free_tokens[0, s] not in free_tokens[0, :s])
  eos = int(free_tokens[0, first])
  out = run("llama", SAMPLED, prompts, mask, seed=3, eos_id=eos)
  tokens, out_mask, log_probs = map(np.asarray, (out.tokens, out.mask, out.log_probs))
  ends = []
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(free_tokens[b] == eos)
    end = hits[0] + 1 if hits.size else 10            # response length including the EOS
    ends.append(end)
    np.testing.assert_array_equal(tokens[b, :end], free_tokens[b, :end])
    assert (tokens[b, end:] == PAD).all()
    np.testing.assert_array_equal(out_mask[b], np.arange(10) < end)
    np.testing.assert_allclose(log_probs[b, :end], np.asarray(free.log_probs)[b, :end], atol=1e-6)
    assert (log_probs[b, end:] == 0).all()
  assert ends[0] == first + 1 and len(set(ends)) > 1     # rows really stop at different steps
  assert int(out.num_steps) == max(ends)


def test_loop_exits_early_when_every_row_has_finished():
  prompts, mask = repeat_prompts(*left_pad(PROMPTS[:1]), 4)  # identical greedy rows, [4, 6]
  free = run("llama", GREEDY, prompts, mask)
  assert int(free.num_steps) == 10
  row = np.asarray(free.tokens[0])
  first = next(s for s in range(1, 10) if row[s] not in row[:s])
  out = run("llama", GREEDY, prompts, mask, eos_id=int(row[first]))
  assert int(out.num_steps) == first + 1 < 10
  np.testing.assert_array_equal(out.mask.sum(1), [first + 1] * 4)


def test_response_mask_with_pad_equal_to_eos():
  tokens = jnp.array([[3, 9, 9, 9], [3, 4, 5, 6], [9, 9, 9, 9]])
  np.testing.assert_array_equal(response_mask(tokens, eos_id=9),
                                [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


# ---------------------------------------------------------------------------------------------
# Randomness, sharding, compilation
# ---------------------------------------------------------------------------------------------

REPEATED = SamplingConfig(8, temperature=0.9, top_p=0.95)


def test_repeated_prompts_differ_and_rng_is_deterministic():
  prompts, mask = repeat_prompts(*left_pad(PROMPTS), 2)
  np.testing.assert_array_equal(prompts[2:4], np.asarray(left_pad(PROMPTS)[0])[[1, 1]])  # b * k + j
  a = run("llama", REPEATED, prompts, mask, seed=0)
  b = run("llama", REPEATED, prompts, mask, seed=0)
  c = run("llama", REPEATED, prompts, mask, seed=1)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  assert len({tuple(row) for row in np.asarray(a.tokens)}) == 8  # every sample differs


def test_sharded_sampling_equals_single_device():
  flavour = "llama"  # RoPE and grouped kv heads split over the tensor axis: the harder case
  cfg = tiny(flavour)
  graphdef, params = model(flavour)
  prompts, mask = repeat_prompts(*left_pad(PROMPTS), 2)
  single = run(flavour, REPEATED, prompts, mask, seed=2)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))[1]
  shardings = parallel.named(mesh, parallel.param_specs(abstract, parallel.DEFAULT_RULES, mesh))
  sharded = Sampler(graphdef, REPEATED, eos_id=NO_EOS, pad_id=PAD, mesh=mesh,
                    param_shardings=shardings)
  out = sharded(jax.device_put(params, shardings), prompts, mask, jax.random.PRNGKey(2))
  assert out.tokens.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  assert len(out.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_allclose(out.log_probs, single.log_probs, atol=1e-5)


def test_same_shapes_never_recompile():
  # The shared gpt2 greedy sampler only ever sees the two prompt shapes used here (the left-padding
  # test uses the same two), so it must have traced exactly twice whatever the test order.
  shared = sampler("gpt2", GREEDY, NO_EOS, sample)  # the key run() uses
  for prompts in (PROMPTS, PROMPTS[::-1], PROMPTS):
    run("gpt2", GREEDY, *left_pad(prompts, 6))      # new values, same shapes
  run("gpt2", GREEDY, *left_pad(PROMPTS, 11))        # a new shape traces once more
  run("gpt2", GREEDY, *left_pad(PROMPTS[::-1], 11))
  assert shared.trace_count == 2


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_are_input_errors():
  with pytest.raises(InputError, match="temperature"):
    SamplingConfig(4, temperature=0.0)
  with pytest.raises(InputError, match="top_p"):
    SamplingConfig(4, top_p=0.0)
  with pytest.raises(InputError, match="max_new_tokens"):
    SamplingConfig(0)
  graphdef, params = model("gpt2")
  checked = Sampler(graphdef, SamplingConfig(4), eos_id=63, pad_id=PAD)
  tokens = jnp.ones((2, 4), jnp.int32)
  with pytest.raises(InputError, match="prompt row 1.*not left-padded"):
    checked(params, tokens, jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]]), jax.random.PRNGKey(0))
  with pytest.raises(InputError, match="prompt row 0.*no real token"):
    checked(params, tokens, jnp.array([[0, 0, 0, 0], [1, 1, 1, 1]]), jax.random.PRNGKey(0))
  with pytest.raises(InputError, match="exceeds the model's max_len"):
    Sampler(graphdef, SamplingConfig(62), eos_id=63, pad_id=PAD)(
        params, tokens, jnp.ones_like(tokens), jax.random.PRNGKey(0))
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  with pytest.raises(InputError, match="not divisible by the 8 batch shards"):
    Sampler(graphdef, SamplingConfig(4), eos_id=63, pad_id=PAD, mesh=mesh)(
        params, tokens, jnp.ones_like(tokens), jax.random.PRNGKey(0))
