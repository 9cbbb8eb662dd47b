"""Hugging Face import/export: config mapping, refusals, exact round trips, shardings, the CLI,
the tokenizer.json loader, and (when torch + transformers are installed) logits parity."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import parity
from experiments import convert
from instructjax import checkpoint, parallel
from instructjax.errors import InputError
from instructjax.models import hf
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel

SIZES = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_len=64)


def tiny(flavour, **kw):
  fields = dict(SIZES, flavour=flavour, d_ff=128)
  if flavour == "llama":
    fields["n_kv_heads"] = 2
  fields.update(kw)
  return ModelConfig(**fields)


def random_params(cfg, seed=0):
  """Random values for every parameter (biases and norm scales too), so that any swapped or
  transposed tensor changes the logits. numpy, not the model's initialiser: it is much faster."""
  rng = np.random.default_rng(seed)
  _, abstract = hf.abstract_params(cfg)
  return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape, np.float32)),
                      nnx.to_pure_dict(abstract))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, mask):
  return nnx.merge(graphdef, params)(tokens, mask)[0]


def logits_of(cfg, params, tokens, mask):
  # Jitted and cached per model: compiling once beats running the model op by op.
  return _forward(hf.abstract_params(cfg)[0], params, tokens, mask)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


BATCH_TOKENS = np.array([[0, 0, 0, 5, 17, 99, 3, 42, 7, 11],
                         [8, 1, 127, 64, 2, 33, 90, 4, 16, 9],
                         [0, 0, 0, 0, 0, 0, 0, 0, 12, 77]], np.int32)
BATCH_MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10, [0] * 8 + [1, 1]], np.int32)


# --- config mapping and refusals (no torch needed) ---------------------------------------------

GPT2_HF = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
               layer_norm_epsilon=1e-5, activation_function="gelu_new", n_inner=None)
LLAMA_HF = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=128, rms_norm_eps=1e-6,
                max_position_embeddings=64, tie_word_embeddings=False, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def test_gpt2_config_maps_every_field():
  fields = hf.model_fields(dict(GPT2_HF, layer_norm_epsilon=1e-6))
  cfg = ModelConfig(**fields)
  assert (cfg.flavour, cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
          cfg.d_ff, cfg.max_len, cfg.norm_eps) == ("gpt2", 128, 64, 2, 4, 4, 256, 64, 1e-6)
  assert (cfg.norm, cfg.mlp, cfg.position, cfg.use_bias, cfg.tie_embeddings) == (
      "layernorm", "gelu", "learned", True, True)
  assert ModelConfig(**hf.model_fields(dict(GPT2_HF, n_inner=100))).d_ff == 100


def test_llama_config_maps_every_field_in_both_rope_layouts():
  cfg = ModelConfig(**hf.model_fields(LLAMA_HF))
  assert (cfg.flavour, cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
          cfg.d_ff, cfg.max_len, cfg.norm_eps, cfg.rope_theta) == (
              "llama", 128, 64, 2, 4, 2, 128, 64, 1e-6, 500000.0)
  assert (cfg.norm, cfg.mlp, cfg.position, cfg.use_bias, cfg.tie_embeddings) == (
      "rmsnorm", "swiglu", "rope", False, False)
  legacy = dict(LLAMA_HF, rope_theta=123.0, rope_scaling=None, tie_word_embeddings=True)
  del legacy["rope_parameters"]
  cfg = ModelConfig(**hf.model_fields(legacy))
  assert (cfg.rope_theta, cfg.tie_embeddings) == (123.0, True)
  no_gqa = dict(LLAMA_HF)
  del no_gqa["num_key_value_heads"]
  assert ModelConfig(**hf.model_fields(no_gqa)).n_kv_heads == 4


@pytest.mark.parametrize("base, change, field", [
    (LLAMA_HF, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    (LLAMA_HF, dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_type"),
    (LLAMA_HF, dict(attention_bias=True), "attention_bias"),
    (LLAMA_HF, dict(mlp_bias=True), "mlp_bias"),
    (LLAMA_HF, dict(hidden_act="gelu"), "hidden_act"),
    (LLAMA_HF, dict(head_dim=32), "head_dim"),
    (dict(LLAMA_HF, model_type="mistral"), dict(sliding_window=4096), "sliding_window"),
    (LLAMA_HF, dict(model_type="qwen2"), "model_type"),
    (LLAMA_HF, dict(num_hidden_layers=None), "num_hidden_layers"),
    (GPT2_HF, dict(activation_function="relu"), "activation_function"),
    (GPT2_HF, dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (GPT2_HF, dict(add_cross_attention=True), "add_cross_attention"),
])
def test_unsupported_features_are_refused_by_name(base, change, field):
  with pytest.raises(InputError, match=field):
    hf.model_fields(dict(base, **change))


def test_mistral_without_sliding_window_is_a_llama():
  fields = hf.model_fields(dict(LLAMA_HF, model_type="mistral", sliding_window=None))
  assert fields["flavour"] == "llama"


def test_hf_model_overrides_reads_the_directory(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(LLAMA_HF))
  assert hf.hf_model_overrides(tmp_path) == hf.model_fields(LLAMA_HF)
  with pytest.raises(InputError, match="config.json"):
    hf.hf_model_overrides(tmp_path / "missing")


# --- export -> import round trips (no torch needed) --------------------------------------------

@pytest.mark.parametrize("cfg", [tiny("gpt2"), tiny("gpt2", tie_embeddings=False),
                                 tiny("llama"), tiny("llama", tie_embeddings=True, n_kv_heads=4)],
                         ids=["gpt2", "gpt2-untied", "llama", "llama-tied-mha"])
def test_export_then_import_is_bit_exact(tmp_path, cfg):
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"] == [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[
      cfg.flavour]]
  imported_cfg, imported = hf.import_hf(tmp_path)
  assert imported_cfg == cfg
  assert_trees_equal(imported, params)


def test_exported_tensors_have_the_hf_layout(tmp_path):
  from safetensors import safe_open
  cfg = tiny("gpt2")
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path / "gpt2")
  layers = params["backbone"]["layers"]
  with safe_open(str(tmp_path / "gpt2" / "model.safetensors"), "numpy") as f:
    c_attn = f.get_tensor("transformer.h.1.attn.c_attn.weight")
    assert c_attn.shape == (64, 192)  # Conv1D [in, out] with q | k | v on the output axis
    np.testing.assert_array_equal(c_attn[:, 64:128], np.asarray(layers["wk"][1]).reshape(64, 64))
    assert "lm_head.weight" not in f.keys()  # tied
  cfg = tiny("llama")
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path / "llama")
  with safe_open(str(tmp_path / "llama" / "model.safetensors"), "numpy") as f:
    k_proj = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert k_proj.shape == (32, 64)  # Linear [kv_heads * head_dim, d_model]
    wk = np.asarray(params["backbone"]["layers"]["wk"][0])  # [D, K, H]
    np.testing.assert_array_equal(k_proj[16 + 3], wk[:, 1, 3])  # kv head 1, feature 3
    o_proj = f.get_tensor("model.layers.1.self_attn.o_proj.weight")
    wo = np.asarray(params["backbone"]["layers"]["wo"][1])  # [N, H, D]
    np.testing.assert_array_equal(o_proj[:, 2 * 16 + 5], wo[2, 5])


def test_sharded_export_writes_an_index_and_imports(tmp_path):
  cfg = tiny("llama")
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path, max_shard_bytes=40_000)
  shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
  assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  assert_trees_equal(hf.import_hf(tmp_path)[1], params)


def test_bfloat16_export_imports_the_rounded_values(tmp_path):
  cfg = tiny("llama")
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  _, imported = hf.import_hf(tmp_path)
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  assert_trees_equal(imported, rounded)
  assert imported["backbone"]["embed"].dtype == jnp.float32


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_vocab_padding_on_import_and_trimming_on_export(tmp_path, flavour):
  cfg = tiny(flavour, vocab_size=100)
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path / "a")
  padded_cfg, padded = hf.import_hf(tmp_path / "a", vocab_size=128)
  assert padded_cfg.vocab_size == 128
  embed = np.asarray(padded["backbone"]["embed"])
  np.testing.assert_array_equal(embed[:100], np.asarray(params["backbone"]["embed"]))
  assert not embed[100:].any()
  tokens, mask = jnp.asarray(BATCH_TOKENS % 100), jnp.asarray(BATCH_MASK)
  np.testing.assert_allclose(logits_of(padded_cfg, padded, tokens, mask)[..., :100],
                             logits_of(cfg, params, tokens, mask), atol=1e-5)
  hf.export_hf(padded, padded_cfg, tmp_path / "b", vocab_size=100)
  assert json.loads((tmp_path / "b" / "config.json").read_text())["vocab_size"] == 100
  assert_trees_equal(hf.import_hf(tmp_path / "b")[1], params)
  with pytest.raises(InputError, match="smaller"):
    hf.import_hf(tmp_path / "a", vocab_size=50)


def test_export_refuses_what_hf_cannot_express(tmp_path):
  cfg = tiny("gpt2", position="rope")
  with pytest.raises(InputError, match="position"):
    hf.export_hf(random_params(cfg), cfg, tmp_path)
  cfg = tiny("gpt2")
  params = random_params(cfg)
  with pytest.raises(InputError, match="flavour"):
    hf.export_hf(params, cfg, tmp_path, "bert")
  with pytest.raises(InputError, match=r"backbone/layers/b_in: has shape \(2, 128\)"):
    hf.export_hf(params, tiny("gpt2", d_ff=64), tmp_path)
  assert not (tmp_path / "model.safetensors").exists()


def _rewrite(directory, change):
  """Rewrites model.safetensors after `change(dict of numpy tensors)`."""
  from safetensors.numpy import load_file, save_file
  path = directory / "model.safetensors"
  tensors = load_file(str(path))
  change(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


def test_bad_checkpoints_are_reported_by_tensor(tmp_path):
  cfg = tiny("llama")
  hf.export_hf(random_params(cfg), cfg, tmp_path)
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite(tmp_path, lambda t: t.pop(name))
  with pytest.raises(InputError, match=name.replace(".", r"\.")):
    hf.import_hf(tmp_path)
  _rewrite(tmp_path, lambda t: t.update({name: np.zeros((64, 128), np.float32)}))  # transposed
  with pytest.raises(InputError, match=r"shape \(64, 128\)"):
    hf.import_hf(tmp_path)
  _rewrite(tmp_path, lambda t: t.update({name: np.zeros((128, 64), np.float32),
                                         "model.layers.0.self_attn.q_norm.weight": np.ones(16)}))
  with pytest.raises(InputError, match="q_norm"):
    hf.import_hf(tmp_path)
  _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(1),
                                         "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8)}))
  _rewrite(tmp_path, lambda t: t.pop("model.layers.0.self_attn.q_norm.weight"))
  hf.import_hf(tmp_path)  # RoPE frequency buffers of old checkpoints are skipped
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(InputError, match="no \\*.safetensors"):
    hf.import_hf(tmp_path)


def test_gpt2_without_transformer_prefix_imports(tmp_path):
  """The original OpenAI upload names tensors `h.0.attn...` and stores the causal mask buffer."""
  cfg = tiny("gpt2")
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path)

  def strip(tensors):
    for name in list(tensors):
      tensors[name.removeprefix("transformer.")] = tensors.pop(name)
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  _rewrite(tmp_path, strip)
  assert_trees_equal(hf.import_hf(tmp_path)[1], params)


# --- sharded import ----------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_import_onto_a_mesh_places_each_shard_and_keeps_the_logits(tmp_path, flavour):
  cfg = tiny(flavour)
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, sharded = hf.import_hf(tmp_path, mesh=mesh)
  _, abstract = hf.abstract_params(cfg)
  specs = parallel.param_specs(abstract, parallel.DEFAULT_RULES, mesh)
  expected = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert [x.sharding.spec for x in jax.tree.leaves(sharded)] == expected
  wq = sharded["backbone"]["layers"]["wq"]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert wq.addressable_shards[0].data.shape == (2, 32, 2, 16)
  assert_trees_equal(sharded, params)
  tokens, mask = jnp.asarray(BATCH_TOKENS), jnp.asarray(BATCH_MASK)
  with jax.set_mesh(mesh), parallel.axis_rules(parallel.DEFAULT_RULES):
    on_mesh = logits_of(cfg, sharded, tokens, mask)
  np.testing.assert_allclose(on_mesh, logits_of(cfg, params, tokens, mask), atol=1e-5)


# --- CLI -------------------------------------------------------------------------------------

def test_cli_from_hf_then_to_hf_round_trips(tmp_path, capsys):
  cfg = tiny("llama", vocab_size=300)  # >= the byte tokenizer's 259
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path / "hf")
  assert convert.main(["--from_hf", str(tmp_path / "hf"), "--to", str(tmp_path / "work"),
                       "--vocab_size", "384"]) == 0
  assert convert.main(["--from_hf", str(tmp_path / "hf"), "--to", str(tmp_path / "work")]) == 2
  assert "already holds a checkpoint" in capsys.readouterr().err
  written = json.loads((tmp_path / "work" / "config.json").read_text())
  assert written["model"]["vocab_size"] == 384 and written["tokenizer"] is None
  padded_cfg = ModelConfig.from_mapping(written["model"])
  _, abstract = hf.abstract_params(padded_cfg)
  mesh = parallel.make_mesh({"data": -1})
  target = checkpoint.abstract_like(nnx.to_pure_dict(abstract), parallel.named(
      mesh, parallel.param_specs(abstract, parallel.DEFAULT_RULES, mesh)))
  # What a trainer's init_from does with the workdir.
  restored = checkpoint.restore_subtree(f"{tmp_path}/work/checkpoints", target)
  np.testing.assert_array_equal(restored["backbone"]["embed"][:300], params["backbone"]["embed"])

  assert convert.main(["--to_hf", str(tmp_path / "back"), "--from_checkpoint",
                       str(tmp_path / "work")]) == 0
  back_cfg, back = hf.import_hf(tmp_path / "back")
  assert back_cfg.vocab_size == 384
  np.testing.assert_array_equal(back["lm_head"][:, :300], params["lm_head"])
  assert_trees_equal(back["backbone"]["layers"], params["backbone"]["layers"])
  assert convert.main(["--to_hf", str(tmp_path / "x"), "--from_checkpoint",
                       str(tmp_path / "nowhere")]) == 2
  assert "config.json" in capsys.readouterr().err


def test_cli_from_hf_pads_the_vocabulary_as_init_from_hf_does(tmp_path):
  from experiments.configs import sft as sft_configs
  from instructjax.trainers import common
  hf.export_hf(random_params(tiny("gpt2", vocab_size=300)), tiny("gpt2", vocab_size=300),
               tmp_path / "hf")
  assert convert.main(["--from_hf", str(tmp_path / "hf"), "--to", str(tmp_path / "work")]) == 0
  converted = json.loads((tmp_path / "work" / "config.json").read_text())["model"]["vocab_size"]
  config = sft_configs.get_config("tiny")
  with config.unlocked():
    config.model.init_from_hf = str(tmp_path / "hf")
  direct = common.model_config(config, common.tokenizer_from_config(config))
  assert converted == direct.vocab_size == 384  # 300 padded to a multiple of 128, both ways


def test_cli_to_hf_reads_a_trainer_config_with_its_tokenizer(tmp_path):
  cfg = tiny("gpt2", vocab_size=384)
  params = random_params(cfg)
  with checkpoint.Checkpointer(tmp_path / "sft" / "checkpoints", save_every=1, keep=1) as ckpt:
    ckpt.save(7, {"params": params, "step": jnp.int32(7)}, force=True)
  model = {k: v for k, v in cfg.to_dict().items()}
  model.update(vocab_size=None, init_from_hf="")  # the trainer pads the tokenizer's vocab
  trainer_config = {"model": model, "tokenizer": {"kind": "byte", "path": ""}, "stage": "sft",
                    "sharding_rules": [list(r) for r in parallel.DEFAULT_RULES]}
  (tmp_path / "sft" / "config.json").write_text(json.dumps(trainer_config))
  assert convert.main(["--to_hf", str(tmp_path / "hf"), "--from_checkpoint",
                       str(tmp_path / "sft" / "checkpoints"), "--trim_vocab"]) == 0
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (config["vocab_size"], config["eos_token_id"], config["bos_token_id"]) == (259, 257, 258)
  _, back = hf.import_hf(tmp_path / "hf")
  np.testing.assert_array_equal(back["backbone"]["embed"], params["backbone"]["embed"][:259])


# --- tokenizers ----------------------------------------------------------------------------

def _gpt2_vocab_files(directory: pathlib.Path):
  from instructjax.data.tokenizers import bytes_to_unicode
  vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
  vocab.update({"Ġt": 256, "he": 257, "Ġthe": 258, "<|endoftext|>": 259})
  (directory / "vocab.json").write_text(json.dumps(vocab))
  (directory / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\nĠt he\n")


def test_tokenizer_files_of_a_checkpoint_directory(tmp_path):
  assert hf.tokenizer_section(tmp_path) is None
  with pytest.raises(InputError, match="no tokenizer files"):
    hf.hf_tokenizer(tmp_path)
  _gpt2_vocab_files(tmp_path)
  assert hf.tokenizer_section(tmp_path) == {"kind": "gpt2", "path": str(tmp_path)}
  tok = hf.hf_tokenizer(tmp_path)
  assert tok.encode(" the") == [258] and tok.eos_id == 259


def _bpe_tokenizer_json(directory: pathlib.Path, pre_tokenizer, merges_as_pairs=False):
  from instructjax.data.tokenizers import bytes_to_unicode
  vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
  merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2"), ("12", "3")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  spec = {"version": "1.0", "normalizer": None, "pre_tokenizer": pre_tokenizer,
          "added_tokens": [dict(id=len(vocab) + k, content=content, special=True,
                                single_word=False, lstrip=False, rstrip=False, normalized=False)
                           for k, content in enumerate(["<|end_of_text|>", "<|begin_of_text|>"])],
          "model": {"type": "BPE", "vocab": vocab, "ignore_merges": True,
                    "merges": [list(m) if merges_as_pairs else " ".join(m) for m in merges]}}
  (directory / "tokenizer.json").write_text(json.dumps(spec))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|end_of_text|>", "bos_token": {"content": "<|begin_of_text|>"}}))
  return len(vocab)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
TEXTS = ["the theme 12345 of THE\n\n  text", "héllo wörld's 1234567!", "", "  x\r\n y  "]


@pytest.mark.parametrize("pre", [LLAMA3_PRE, GPT2_PRE], ids=["llama3", "gpt2"])
def test_tokenizer_json_loader(tmp_path, pre):
  n = _bpe_tokenizer_json(tmp_path, pre, merges_as_pairs=pre is GPT2_PRE)
  assert hf.tokenizer_section(tmp_path)["kind"] == "hf_json"
  tok = hf.hf_tokenizer(tmp_path)
  assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size) == (n, n + 1, n, n + 2)
  ids = tok.encode(" the 123")
  assert ids[:1] == [258] and tok.decode(ids + [n]) == " the 123"
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text
  # The split decides the pieces: Llama-3 cuts digit runs into threes ("412" + "3"), GPT-2
  # keeps the run whole, so only GPT-2 can merge "123".
  pieces = [tok.decode([i]) for i in tok.encode("4123")]
  assert pieces == (["4", "12", "3"] if pre is LLAMA3_PRE else ["4", "123"])


def test_tokenizer_json_matches_the_tokenizers_library(tmp_path):
  tokenizers_lib = pytest.importorskip("tokenizers")
  for pre in (LLAMA3_PRE, GPT2_PRE):
    _bpe_tokenizer_json(tmp_path, pre)
    reference = tokenizers_lib.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = hf.hf_tokenizer(tmp_path)
    for text in TEXTS + ["they'RE 2024-01-01: the\tthe", "日本語 テキスト 🙂"]:
      assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text


def test_tokenizer_json_refusals_name_the_component(tmp_path):
  _bpe_tokenizer_json(tmp_path, {"type": "Metaspace"})
  with pytest.raises(InputError, match="pre_tokenizer"):
    hf.hf_tokenizer(tmp_path)
  _bpe_tokenizer_json(tmp_path, GPT2_PRE)
  spec = json.loads((tmp_path / "tokenizer.json").read_text())
  spec["model"]["type"] = "Unigram"
  (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
  with pytest.raises(InputError, match="model.type"):
    hf.hf_tokenizer(tmp_path)


# --- parity with transformers (test-only dependency) -------------------------------------------
# Skipped without torch + transformers, except in CI (INSTRUCTJAX_REQUIRE_PARITY=1), where a
# missing install fails them: see parity.py. golden/hf_logits.npz checks the forward without torch.

_hf_logits = parity.transformers_logits


def _transformers_model(flavour):
  torch = parity.require("torch")
  transformers = parity.require("transformers")
  torch.manual_seed(0)
  if flavour == "gpt2":
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                                     n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
  else:
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128,
                                      vocab_size=128, tie_word_embeddings=False,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # random norms and biases too, so that none can hide a mapping bug
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_" in name:
        p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def _assert_real_positions_close(ours, reference):
  real = BATCH_MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], reference[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_import_matches_transformers_logits(tmp_path, flavour):
  model = _transformers_model(flavour)
  model.save_pretrained(tmp_path)
  reference = _hf_logits(model, BATCH_TOKENS, BATCH_MASK)
  cfg, params = hf.import_hf(tmp_path)
  tokens, mask = jnp.asarray(BATCH_TOKENS), jnp.asarray(BATCH_MASK)
  _assert_real_positions_close(logits_of(cfg, params, tokens, mask), reference)

  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, sharded = hf.import_hf(tmp_path, mesh=mesh)
  with jax.set_mesh(mesh), parallel.axis_rules(parallel.DEFAULT_RULES):
    on_mesh = logits_of(cfg, sharded, tokens, mask)
  _assert_real_positions_close(on_mesh, reference)

  hf.export_hf(params, cfg, tmp_path / "exported")
  assert_trees_equal(hf.import_hf(tmp_path / "exported")[1], params)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, flavour):
  transformers = parity.require("transformers")
  parity.require("torch")
  cfg = tiny(flavour)
  params = random_params(cfg)
  hf.export_hf(params, cfg, tmp_path, dtype="float32")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  reference = _hf_logits(model, BATCH_TOKENS, BATCH_MASK)
  ours = logits_of(cfg, params, jnp.asarray(BATCH_TOKENS), jnp.asarray(BATCH_MASK))
  _assert_real_positions_close(ours, reference)


def test_trainer_starts_from_a_hugging_face_checkpoint(tmp_path):
  """`--config.model.init_from_hf=DIR`: the architecture and the weights come from the directory."""
  import tiny
  from instructjax.trainers import lm
  source = ModelConfig(flavour="gpt2", vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                       max_len=64)
  _, state = nnx.split(LanguageModel(source, rngs=nnx.Rngs(3)))
  hf.export_hf(nnx.to_pure_dict(state), source, tmp_path / "hf", "gpt2")
  config = tiny.lm_config("pretrain", steps=1, **{"model.init_from_hf": str(tmp_path / "hf"),
                                                   "model.d_model": 8, "optimizer.lr": 0.0})
  lm.train(config, str(tmp_path / "run"))
  restored = checkpoint.restore_subtree(
      str(tmp_path / "run" / "checkpoints"),
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                  sharding=jax.sharding.SingleDeviceSharding(
                                                      jax.devices()[0])),
                   hf.import_hf(tmp_path / "hf", vocab_size=384)[1]))
  expected = hf.import_hf(tmp_path / "hf", vocab_size=384)[1]
  assert restored["backbone"]["layers"]["wq"].shape[1] == 32  # d_model came from the checkpoint
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(expected))
