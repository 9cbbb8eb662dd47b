"""The decoder: padding invariance, KV cache equivalence, flavours, logical axes, remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from instructjax import parallel
from instructjax.errors import InputError
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import KVCache, LanguageModel, ScalarModel, last_token


def tiny(flavour, **kw):
  base = dict(flavour=flavour, vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=64)
  if flavour == "llama":
    base["n_kv_heads"] = 2
  base.update(kw)
  return ModelConfig(**base)


def split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def run(graphdef, params, *args, **kwargs):
  return nnx.merge(graphdef, params)(*args, **kwargs)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_left_padding_does_not_change_real_logits(flavour):
  graphdef, params = split(LanguageModel(tiny(flavour), rngs=nnx.Rngs(0)))
  tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
  logits, _ = run(graphdef, params, tokens, jnp.ones_like(tokens))
  for pad in (1, 3, 7):
    padded = jnp.concatenate([jnp.full((1, pad), 3), tokens], 1)  # pad token id is arbitrary
    mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones_like(tokens)], 1)
    padded_logits, _ = run(graphdef, params, padded, mask)
    np.testing.assert_allclose(padded_logits[:, pad:], logits, atol=1e-5)
    assert np.isfinite(np.asarray(padded_logits)).all()


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_kv_cache_decode_equals_full_forward(flavour):
  cfg = tiny(flavour)
  graphdef, params = split(LanguageModel(cfg, rngs=nnx.Rngs(1)))
  tokens = jnp.array([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
  mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
  full, _ = run(graphdef, params, tokens, mask)

  prompt_len, cache_len = 4, 12
  key_valid = jnp.zeros((2, cache_len), bool).at[:, :prompt_len].set(mask[:, :prompt_len] > 0)
  cache = KVCache.zeros(cfg, 2, cache_len)
  pieces, cache = run(graphdef, params, tokens[:, :prompt_len], mask[:, :prompt_len], cache=cache,
                      cache_index=0, key_valid=key_valid)
  pieces = [pieces]
  positions = mask[:, :prompt_len].sum(1, keepdims=True)
  for t in range(prompt_len, tokens.shape[1]):
    key_valid = key_valid.at[:, t].set(True)
    step_logits, cache = run(graphdef, params, tokens[:, t:t + 1], mask[:, t:t + 1],
                             positions=positions, cache=cache, cache_index=t, key_valid=key_valid)
    pieces.append(step_logits)
    positions = positions + 1
  cached = jnp.concatenate(pieces, 1)
  np.testing.assert_allclose(cached[0, 2:], full[0, 2:], atol=1e-5)
  np.testing.assert_allclose(cached[1], full[1], atol=1e-5)


def test_flavour_defaults_and_overrides():
  gpt2, llama = tiny("gpt2"), tiny("llama")
  assert (gpt2.norm, gpt2.mlp, gpt2.position, gpt2.tie_embeddings) == ("layernorm", "gelu", "learned", True)
  assert (llama.norm, llama.mlp, llama.position, llama.tie_embeddings) == ("rmsnorm", "swiglu", "rope", False)
  assert tiny("gpt2", position="rope").position == "rope"
  with pytest.raises(InputError, match="n_kv_heads"):
    tiny("llama", n_kv_heads=3)
  with pytest.raises(InputError, match="unknown fields"):
    ModelConfig.from_mapping(dict(flavour="gpt2", d_modle=8))


def test_gqa_and_untied_shapes():
  _, params = split(LanguageModel(tiny("llama"), rngs=nnx.Rngs(0)))
  assert params["backbone"]["layers"]["wk"].shape == (2, 32, 2, 8)
  assert params["backbone"]["layers"]["wq"].shape == (2, 32, 4, 8)
  assert params["lm_head"].shape == (32, 64)
  _, gpt2_params = split(LanguageModel(tiny("gpt2"), rngs=nnx.Rngs(0)))
  assert "lm_head" not in gpt2_params  # tied to the token embedding


def test_every_parameter_is_named_and_unknown_names_are_errors():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  for flavour in ("gpt2", "llama"):
    _, state = nnx.split(nnx.eval_shape(lambda: LanguageModel(tiny(flavour), rngs=nnx.Rngs(0))))
    specs = parallel.param_specs(state, parallel.DEFAULT_RULES, mesh)
    assert specs["backbone"]["embed"] == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert specs["backbone"]["layers"]["wq"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  rules_without_mlp = tuple(r for r in parallel.DEFAULT_RULES if r[0] != "mlp")
  with pytest.raises(InputError, match="'mlp' has no rule"):
    parallel.param_specs(state, rules_without_mlp, mesh)


def test_unnamed_parameter_is_an_error():
  class Bare(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((4, 4)))

  mesh = parallel.make_mesh({"data": -1})
  with pytest.raises(InputError, match="parameter w.*no logical_axes"):
    parallel.param_specs(nnx.split(Bare())[1], parallel.DEFAULT_RULES, mesh)


def test_indivisible_shape_is_an_error():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, state = nnx.split(nnx.eval_shape(lambda: LanguageModel(tiny("gpt2", vocab_size=63),
                                                            rngs=nnx.Rngs(0))))
  with pytest.raises(InputError, match="embed.*cannot be split"):
    parallel.param_specs(state, parallel.DEFAULT_RULES, mesh)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(remat):
  tokens = jnp.array([[1, 2, 3, 4, 5, 6]])

  def loss(params, graphdef):
    logits, _ = run(graphdef, params, tokens, jnp.ones_like(tokens))
    return jnp.mean(logits ** 2)

  g_plain, params = split(LanguageModel(tiny("gpt2"), rngs=nnx.Rngs(0)))
  g_remat, _ = split(LanguageModel(tiny("gpt2", remat=remat), rngs=nnx.Rngs(0)))
  v1, grads1 = jax.value_and_grad(loss)(params, g_plain)
  v2, grads2 = jax.value_and_grad(loss)(params, g_remat)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads1, grads2)


def test_bf16_compute_keeps_fp32_params_and_logits():
  model = LanguageModel(tiny("llama", dtype="bfloat16"), rngs=nnx.Rngs(0))
  graphdef, params = split(model)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits, _ = run(graphdef, params, jnp.array([[1, 2, 3]]), jnp.ones((1, 3)))
  assert logits.dtype == jnp.float32


def test_dropout_is_off_by_default_and_active_when_set():
  tokens = jnp.array([[1, 2, 3, 4]])
  graphdef, params = split(LanguageModel(tiny("gpt2", dropout=0.5), rngs=nnx.Rngs(0)))
  a, _ = run(graphdef, params, tokens, jnp.ones_like(tokens))
  b, _ = run(graphdef, params, tokens, jnp.ones_like(tokens), dropout_rng=jax.random.PRNGKey(1))
  assert not np.allclose(a, b)
  graphdef0, params0 = split(LanguageModel(tiny("gpt2"), rngs=nnx.Rngs(0)))
  c, _ = run(graphdef0, params0, tokens, jnp.ones_like(tokens), dropout_rng=jax.random.PRNGKey(1))
  d, _ = run(graphdef0, params0, tokens, jnp.ones_like(tokens))
  np.testing.assert_array_equal(c, d)


def test_last_token_picks_each_rows_last_real_position():
  """Against plain indexing, on values that name their own position: any other position (the
  first real one, the last slot, a neighbour) gives a different number."""
  values = jnp.arange(3 * 6, dtype=jnp.float32).reshape(3, 6)
  mask = jnp.array([[0, 0, 1, 1, 1, 0],   # left and right padding
                    [1, 1, 1, 1, 1, 1],   # none
                    [0, 0, 0, 0, 1, 0]])  # one real token
  expected = [float(values[b, max(t for t in range(6) if mask[b, t])]) for b in range(3)]
  assert expected == [4.0, 11.0, 16.0]
  np.testing.assert_array_equal(last_token(values, mask), expected)


def test_scalar_head_reads_last_real_token_whatever_the_padding():
  graphdef, params = split(ScalarModel(tiny("gpt2"), rngs=nnx.Rngs(0)))
  tokens = jnp.array([[4, 5, 6]])
  per_position = run(graphdef, params, tokens, jnp.ones_like(tokens))
  # The expectation is the head's value at the unpadded sequence's last token, by plain
  # indexing, not by last_token itself; it must differ from the other positions' values.
  value = per_position[:, -1]
  assert np.all(np.abs(np.asarray(per_position[0, :-1]) - float(value[0])) > 1e-4)
  left = jnp.array([[0, 0, 4, 5, 6]]), jnp.array([[0, 0, 1, 1, 1]])
  right = jnp.array([[4, 5, 6, 0, 0]]), jnp.array([[1, 1, 1, 0, 0]])
  for toks, mask in (left, right):
    np.testing.assert_allclose(last_token(run(graphdef, params, toks, mask), mask), value, atol=1e-5)


def test_mesh_fills_the_one_unknown_axis():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(InputError, match="at most one"):
    parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(InputError, match="needs 16"):
    parallel.mesh_shape({"data": 4, "fsdp": 4}, 8)


def test_the_batch_rule_alone_decides_how_batches_are_split():
  """Jit shardings, batch checks and the objective's shard count all read the "batch" rule: a
  config that splits batches over data only changes all of them together."""
  from instructjax.objectives import ppo
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  data_only = tuple(("batch", "data") if name == "batch" else (name, axes)
                    for name, axes in parallel.DEFAULT_RULES)
  assert parallel.batch_divisor(mesh) == 4 and parallel.batch_divisor(mesh, data_only) == 2
  P = jax.sharding.PartitionSpec
  assert parallel.batch_sharding(mesh, 3, leading=1).spec == P(None, ("data", "fsdp"), None)
  assert parallel.batch_sharding(mesh, 2, rules=data_only).spec == P("data", None)
  assert parallel.check_global_batch(6, mesh, rules=data_only) == 6
  with pytest.raises(InputError, match=r"4 batch shards \(data x fsdp\)"):
    parallel.check_global_batch(6, mesh)
  with jax.set_mesh(mesh), parallel.axis_rules(data_only):
    assert ppo.batch_shards() == 2 and parallel.batch_sharding(mesh).spec == P("data", None)
  assert ppo.batch_shards() == 1  # outside a mesh


def test_padding_vocabulary_ids_are_never_predicted():
  graphdef, params = split(LanguageModel(tiny("gpt2", real_vocab_size=50), rngs=nnx.Rngs(0)))
  logits, _ = run(graphdef, params, jnp.array([[1, 2, 3]]), jnp.ones((1, 3)))
  probs = jax.nn.softmax(logits, -1)
  assert float(probs[..., 50:].sum()) == 0.0
  assert np.isfinite(np.asarray(jax.nn.log_softmax(logits))).all()


def test_attention_is_cudnn_flash_only_where_it_applies():
  """None picks cuDNN's flash attention on a GPU in bf16/fp16 without a KV cache, XLA's
  elsewhere; an explicit choice always wins; an unknown one is refused."""
  from instructjax.models.layers import attention_implementation
  bf16 = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, dtype="bfloat16")
  fp32 = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2)
  wide_heads = ModelConfig(vocab_size=64, d_model=320, n_layers=1, n_heads=2, dtype="bfloat16")
  assert attention_implementation(bf16, cached=False, backend="gpu") == "cudnn"
  assert attention_implementation(bf16, cached=True, backend="gpu") == "xla"
  assert attention_implementation(bf16, cached=False, backend="cpu") == "xla"
  assert attention_implementation(bf16, cached=False, backend="tpu") == "xla"
  assert attention_implementation(fp32, cached=False, backend="gpu") == "xla"
  assert attention_implementation(wide_heads, cached=False, backend="gpu") == "xla"  # head 160
  forced = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, attention_impl="xla",
                       dtype="bfloat16")
  assert attention_implementation(forced, cached=False, backend="gpu") == "xla"
  with pytest.raises(InputError, match="attention_impl"):
    ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, attention_impl="flash")
