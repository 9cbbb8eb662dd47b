"""Hugging Face checkpoints in and out: GPT-2 and Llama-family weights, configs and tokenizers.

Import reads a LOCAL directory (`config.json` + `*.safetensors`, optionally sharded with
`model.safetensors.index.json`; nothing is downloaded) into the pure parameter dict of
`decoder.LanguageModel` and a `ModelConfig`. Export writes `config.json` + safetensors in the
layout `transformers` loads (`GPT2LMHeadModel`, `LlamaForCausalLM`).

Both directions are driven by one table per architecture (`_TensorMap` rows): which HF tensor
holds each of our parameters and how the axes are rearranged:

* GPT-2's Conv1D weights are already [in, out]; `c_attn` is q, k and v fused along its last axis.
* Llama's Linear weights are [out, in] and get transposed; q/k/v become [D, heads, head_dim] and
  o becomes [heads, head_dim, D]. HF's q/k weights use the rotate-half RoPE convention, which is
  the one `layers.rope` implements, so no permutation of the head dimension is needed.

Memory: tensors are read lazily with `safetensors.safe_open`. Import converts one parameter at a
time on the host and places it with `jax.make_array_from_callback`, so each device receives only
its shard. The peak host memory is ONE converted parameter in float32 (for stacked layer
parameters: the whole [layers, ...] stack, e.g. Llama-2-7B's w_gate, 32 x 4096 x 11008 x 4 B =
5.8 GB) plus one layer's source tensor. Export gathers one layer of one parameter at a time and
streams it into the file, so its peak is one HF tensor (GPT-2's fused c_attn: three).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes  # Importing it registers bfloat16 with numpy: safetensors can then read BF16.
import numpy as np
from flax import nnx

from instructjax import parallel
from instructjax.data import tokenizers
from instructjax.errors import InputError
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel

HF_FLAVOURS = ("gpt2", "llama")
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# HF's own default shard size; export splits into several files beyond it.
DEFAULT_SHARD_BYTES = 5 * 2**30

# Buffers that some HF checkpoints store alongside the weights; they hold no learned values
# (GPT-2's causal mask, Llama's RoPE frequencies), so import skips them.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_EXPORT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# The tokenizer files `export_hf` copies next to the weights when given a tokenizer directory.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

PyTree = Any


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------

def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise InputError(str(directory), f"has no {CONFIG_FILE}; expected a Hugging Face checkpoint "
                     "directory (config.json + *.safetensors)")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(str(path), f"is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise InputError(str(path), "must hold a JSON object")
  return config


def is_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` is a Hugging Face checkpoint (its config.json names a `model_type`),
  not one of our stage workdirs (whose config.json names a `stage`)."""
  path = pathlib.Path(directory) / CONFIG_FILE
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and "model_type" in config and "stage" not in config


def _required(hf: Mapping[str, Any], name: str, where: str) -> int:
  value = hf.get(name)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise InputError(f"{where}: {name}", f"must be a positive integer, got {value!r}")
  return value


def _refuse(where: str, field: str, value: Any, why: str) -> None:
  raise InputError(f"{where}: {field}", f"{value!r} is not supported: {why}")


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
  """RoPE base from either layout: `rope_theta` (transformers 4) or `rope_parameters` (5)."""
  scaling = hf.get("rope_scaling")
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, Mapping) else scaling
    if kind != "default":
      _refuse(where, "rope_scaling", scaling, "only plain RoPE is implemented (no linear, dynamic, "
              "yarn or llama3 frequency scaling)")
  params = hf.get("rope_parameters") or {}
  if not isinstance(params, Mapping):
    _refuse(where, "rope_parameters", params, "expected an object")
  if params.get("rope_type", "default") != "default":
    _refuse(where, "rope_parameters.rope_type", params.get("rope_type"),
            "only plain RoPE is implemented (no frequency scaling)")
  factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if factor != 1.0:
    _refuse(where, "partial_rotary_factor", factor, "RoPE rotates the whole head dimension")
  return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def _gpt2_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
  activation = hf.get("activation_function", "gelu_new")
  if activation not in ("gelu_new", "gelu_pytorch_tanh"):
    _refuse(where, "activation_function", activation, "the MLP uses the tanh-approximated GELU "
            "(gelu_new)")
  if not hf.get("scale_attn_weights", True):
    _refuse(where, "scale_attn_weights", False, "attention is always scaled by 1/sqrt(head_dim)")
  if hf.get("scale_attn_by_inverse_layer_idx", False):
    _refuse(where, "scale_attn_by_inverse_layer_idx", True, "attention scaling is the same in "
            "every layer")
  if hf.get("add_cross_attention", False):
    _refuse(where, "add_cross_attention", True, "the decoder has no cross-attention")
  d_model = _required(hf, "n_embd", where)
  return dict(flavour="gpt2", vocab_size=_required(hf, "vocab_size", where), d_model=d_model,
              n_layers=_required(hf, "n_layer", where), n_heads=_required(hf, "n_head", where),
              n_kv_heads=_required(hf, "n_head", where), d_ff=hf.get("n_inner") or 4 * d_model,
              max_len=_required(hf, "n_positions", where),
              norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
              tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
              norm="layernorm", mlp="gelu", position="learned", use_bias=True)


def _llama_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
  activation = hf.get("hidden_act", "silu")
  if activation != "silu":
    _refuse(where, "hidden_act", activation, "the MLP is SwiGLU (silu gate)")
  for field in ("attention_bias", "mlp_bias"):
    if hf.get(field, False):
      _refuse(where, field, True, "the llama flavour has no biases")
  if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
    _refuse(where, "sliding_window", hf["sliding_window"], "attention is always over the full "
            "causal context")
  d_model, n_heads = _required(hf, "hidden_size", where), _required(hf, "num_attention_heads", where)
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim * n_heads != d_model:
    _refuse(where, "head_dim", head_dim, f"head_dim must be hidden_size / num_attention_heads = "
            f"{d_model // n_heads}")
  return dict(flavour="llama", vocab_size=_required(hf, "vocab_size", where), d_model=d_model,
              n_layers=_required(hf, "num_hidden_layers", where), n_heads=n_heads,
              n_kv_heads=hf.get("num_key_value_heads") or n_heads,
              d_ff=_required(hf, "intermediate_size", where),
              max_len=int(hf.get("max_position_embeddings", 2048)),
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf, where),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False)


# model_type -> (our flavour, field mapper). Mistral is Llama without sliding windows.
_ARCHITECTURES = {"gpt2": _gpt2_fields, "llama": _llama_fields, "mistral": _llama_fields}


def model_fields(hf: Mapping[str, Any], where: str = CONFIG_FILE) -> dict[str, Any]:
  """ModelConfig fields for a HF config dict; unsupported architectures/features raise."""
  model_type = hf.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise InputError(f"{where}: model_type", f"{model_type!r} is not supported; supported: "
                     f"{sorted(_ARCHITECTURES)}")
  return _ARCHITECTURES[model_type](hf, where)


def hf_model_overrides(directory: str | os.PathLike) -> dict[str, Any]:
  """The `config.model` fields that make a model match the checkpoint in `directory`.

  Every architectural field is set (sizes, norm, MLP, positions, biases, tying), so the result
  can be applied over any model section; training-only fields (dtype, dropout, remat) are left
  to the config. `vocab_size` is the checkpoint's; a trainer that pads it must pass the padded
  size to `import_hf(..., vocab_size=)`.
  """
  return model_fields(read_hf_config(directory), str(pathlib.Path(directory) / CONFIG_FILE))


def hf_config(cfg: ModelConfig, flavour: str, vocab_size: int) -> dict[str, Any]:
  """config.json for `cfg` as a HF `flavour` model; raises if HF cannot express `cfg`."""
  needs = {"gpt2": dict(norm="layernorm", mlp="gelu", position="learned", use_bias=True),
           "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False)}
  if flavour not in needs:
    raise InputError("export_hf", f"flavour {flavour!r} is not one of {HF_FLAVOURS}")
  for field, value in needs[flavour].items():
    if getattr(cfg, field) != value:
      raise InputError(f"model config: {field}", f"is {getattr(cfg, field)!r} but a HF "
                       f"{flavour} model needs {value!r}")
  if flavour == "gpt2":
    if cfg.n_kv_heads != cfg.n_heads:
      raise InputError("model config: n_kv_heads", f"is {cfg.n_kv_heads} but GPT-2 has no "
                       f"grouped-query attention (needs n_heads = {cfg.n_heads})")
    dropout = float(cfg.dropout)
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=vocab_size,
                n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                n_positions=cfg.max_len, n_ctx=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                activation_function="gelu_new", tie_word_embeddings=cfg.tie_embeddings,
                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, torch_dtype="float32")
  return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size,
              hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, rope_scaling=None, hidden_act="silu",
              attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
              attention_dropout=float(cfg.dropout), torch_dtype="float32")


# ---------------------------------------------------------------------------------------------
# Which HF tensor holds each parameter, and how its axes map
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TensorMap:
  """One of our parameters and the HF tensor it lives in.

  `to_ours` / `to_hf` convert ONE layer (stacked parameters are converted layer by layer) and
  must be exact inverses. A parameter that is part `part` of `parts` equal slices along the HF
  tensor's last axis (GPT-2's fused c_attn) is read from, and written into, that slice.
  """
  path: tuple[str, ...]
  source: str                                  # "{i}" stands for the layer index
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  part: int = 0
  parts: int = 1
  vocab_axis: int | None = None                # of ours; padded or trimmed to the vocab size

  @property
  def stacked(self) -> bool:
    return "{i}" in self.source


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _gpt2_table(cfg: ModelConfig, prefix: str = "transformer.") -> list[_TensorMap]:
  D, N, H = cfg.d_model, cfg.n_heads, cfg.head_dim
  layer = prefix + "h.{i}."
  heads = (lambda w: w.reshape(*w.shape[:-1], N, H)), (lambda w: w.reshape(*w.shape[:-2], N * H))
  rows = [
      _TensorMap(("backbone", "embed"), prefix + "wte.weight", _same, _same, vocab_axis=0),
      _TensorMap(("backbone", "pos_embed"), prefix + "wpe.weight", _same, _same),
      _TensorMap(("backbone", "final_norm_scale"), prefix + "ln_f.weight", _same, _same),
      _TensorMap(("backbone", "final_norm_bias"), prefix + "ln_f.bias", _same, _same),
  ]
  simple = dict(attn_norm_scale="ln_1.weight", attn_norm_bias="ln_1.bias",
                mlp_norm_scale="ln_2.weight", mlp_norm_bias="ln_2.bias", bo="attn.c_proj.bias",
                w_in="mlp.c_fc.weight", b_in="mlp.c_fc.bias", w_out="mlp.c_proj.weight",
                b_out="mlp.c_proj.bias")
  rows += [_TensorMap(("backbone", "layers", ours), layer + hf, _same, _same)
           for ours, hf in simple.items()]
  for part, name in enumerate("qkv"):
    rows.append(_TensorMap(("backbone", "layers", f"w{name}"), layer + "attn.c_attn.weight",
                           *heads, part=part, parts=3))
    rows.append(_TensorMap(("backbone", "layers", f"b{name}"), layer + "attn.c_attn.bias",
                           *heads, part=part, parts=3))
  rows.append(_TensorMap(("backbone", "layers", "wo"), layer + "attn.c_proj.weight",
                         lambda w: w.reshape(N, H, D), lambda w: w.reshape(N * H, D)))
  if not cfg.tie_embeddings:
    rows.append(_TensorMap(("lm_head",), "lm_head.weight", np.transpose, np.transpose,
                           vocab_axis=1))
  return rows


def _llama_table(cfg: ModelConfig, prefix: str = "model.") -> list[_TensorMap]:
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  layer = prefix + "layers.{i}."

  def projection(heads):  # Linear [heads * H, D] <-> [D, heads, H]
    return (lambda w: w.T.reshape(D, heads, H)), (lambda w: w.reshape(D, heads * H).T)

  rows = [
      _TensorMap(("backbone", "embed"), prefix + "embed_tokens.weight", _same, _same,
                 vocab_axis=0),
      _TensorMap(("backbone", "final_norm_scale"), prefix + "norm.weight", _same, _same),
      _TensorMap(("backbone", "layers", "attn_norm_scale"), layer + "input_layernorm.weight",
                 _same, _same),
      _TensorMap(("backbone", "layers", "mlp_norm_scale"),
                 layer + "post_attention_layernorm.weight", _same, _same),
      _TensorMap(("backbone", "layers", "wq"), layer + "self_attn.q_proj.weight", *projection(N)),
      _TensorMap(("backbone", "layers", "wk"), layer + "self_attn.k_proj.weight", *projection(K)),
      _TensorMap(("backbone", "layers", "wv"), layer + "self_attn.v_proj.weight", *projection(K)),
      _TensorMap(("backbone", "layers", "wo"), layer + "self_attn.o_proj.weight",
                 lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T),
  ]
  rows += [_TensorMap(("backbone", "layers", ours), layer + f"mlp.{hf}.weight", np.transpose,
                      np.transpose)
           for ours, hf in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))]
  if not cfg.tie_embeddings:
    rows.append(_TensorMap(("lm_head",), "lm_head.weight", np.transpose, np.transpose,
                           vocab_axis=1))
  return rows


def _table(cfg: ModelConfig, flavour: str, prefix: str | None = None) -> list[_TensorMap]:
  if flavour == "gpt2":
    return _gpt2_table(cfg, "transformer." if prefix is None else prefix)
  return _llama_table(cfg, "model." if prefix is None else prefix)


# ---------------------------------------------------------------------------------------------
# Reading safetensors lazily
# ---------------------------------------------------------------------------------------------

class _SafetensorsReader:
  """Tensor name -> lazily read numpy array, over one file or an index of shards."""

  def __init__(self, directory: str | os.PathLike):
    from safetensors import safe_open  # Only import/export need the package.

    self.directory = pathlib.Path(directory)
    index_path = self.directory / INDEX_FILE
    if index_path.is_file():
      try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
      except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise InputError(str(index_path), f"is not a safetensors index with a weight_map: {e}") from e
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in self.directory.glob("*.safetensors"))
      if not files:
        raise InputError(str(self.directory), "has no *.safetensors file (PyTorch .bin "
                         "checkpoints are not read: convert them with transformers' "
                         "save_pretrained(safe_serialization=True))")
      weight_map = None
    self._handles = {}
    self._where = {}
    for name in files:
      path = self.directory / name
      if not path.is_file():
        raise InputError(str(index_path), f"names shard {name}, which does not exist")
      try:
        handle = safe_open(str(path), framework="numpy")
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise InputError(str(path), f"is not a readable safetensors file: {e}") from e
      self._handles[name] = handle
      for key in handle.keys():
        if key in self._where:
          raise InputError(str(path), f"tensor {key} is also in {self._where[key]}")
        if weight_map is None or weight_map.get(key) == name:
          self._where[key] = name

  def names(self) -> list[str]:
    return sorted(self._where)

  def close(self) -> None:
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles = {}

  def _slice(self, name: str):
    if name not in self._where:
      raise InputError(str(self.directory), f"has no tensor {name!r} (found e.g. "
                       f"{', '.join(self.names()[:5])})")
    return self._handles[self._where[name]].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, last_axis: slice | None = None) -> np.ndarray:
    """The tensor (or a slice of its last axis, read without the rest) as float32."""
    piece = self._slice(name)
    try:
      if last_axis is None:
        value = piece[:]
      else:
        value = piece[(slice(None),) * (len(piece.get_shape()) - 1) + (last_axis,)]
    except TypeError as e:  # a dtype numpy cannot hold, e.g. F8
      raise InputError(f"{self.directory}: {name}", f"cannot be read as numpy: {e}") from e
    if not np.issubdtype(value.dtype, np.floating) and value.dtype != ml_dtypes.bfloat16:
      raise InputError(f"{self.directory}: {name}", f"has dtype {value.dtype}; expected floats")
    return np.asarray(value, np.float32)


def _hf_shape(tmap: _TensorMap, ours_layer_shape: Sequence[int]) -> tuple[int, ...]:
  """The HF tensor's shape, derived by running `to_hf` on a never-touched buffer."""
  shape = list(tmap.to_hf(np.empty(ours_layer_shape, np.float32)).shape)
  shape[-1] *= tmap.parts
  return tuple(shape)


def _resize_vocab(w: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Zero-pads (or trims) the vocabulary axis; padded rows are ids no tokenizer produces."""
  have = w.shape[axis]
  if have >= size:
    return np.take(w, np.arange(size), axis=axis) if have > size else w
  pad = [(0, 0)] * w.ndim
  pad[axis] = (0, size - have)
  return np.pad(w, pad)


def _read_layer(reader: _SafetensorsReader, tmap: _TensorMap, layer: int | None,
                ours_shape: Sequence[int], hf_vocab: int) -> np.ndarray:
  """One layer of one parameter (or the whole of an unstacked one), in our layout."""
  name = tmap.source.format(i=layer) if tmap.stacked else tmap.source
  hf_layer_shape = list(ours_shape)
  if tmap.vocab_axis is not None:
    hf_layer_shape[tmap.vocab_axis] = hf_vocab
  expected = _hf_shape(tmap, hf_layer_shape)
  stored = reader.shape(name)
  if stored != expected:
    raise InputError(f"{reader.directory}: {name}", f"has shape {stored}, but config.json "
                     f"implies {expected}")
  width = expected[-1] // tmap.parts
  last_axis = slice(tmap.part * width, (tmap.part + 1) * width) if tmap.parts > 1 else None
  value = tmap.to_ours(reader.read(name, last_axis))
  if tmap.vocab_axis is not None:
    value = _resize_vocab(value, tmap.vocab_axis, ours_shape[tmap.vocab_axis])
  return value


def _host_param(reader: _SafetensorsReader, tmap: _TensorMap, shape: Sequence[int],
                hf_vocab: int) -> np.ndarray:
  """The whole converted parameter on the host; a stack is filled one layer at a time."""
  if not tmap.stacked:
    return _read_layer(reader, tmap, None, shape, hf_vocab)
  host = np.empty(shape, np.float32)
  for i in range(shape[0]):
    host[i] = _read_layer(reader, tmap, i, shape[1:], hf_vocab)
  return host


def _source_names(tmap: _TensorMap, n_layers: int) -> list[str]:
  return [tmap.source.format(i=i) for i in range(n_layers)] if tmap.stacked else [tmap.source]


def _detect_prefix(names: Sequence[str], flavour: str) -> str:
  """GPT-2 files from the original OpenAI upload lack the `transformer.` prefix."""
  if flavour == "gpt2":
    return "transformer." if "transformer.wte.weight" in names else ""
  return "model." if "model.embed_tokens.weight" in names else ""


def _path_name(path: Sequence[str]) -> str:
  return "/".join(path)


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and abstract (shape-only) state of `LanguageModel(cfg)`."""
  return nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))


def _flat_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flat_paths(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _set_path(tree: dict, path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: Mapping, path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _check_table_covers(table: Sequence[_TensorMap], paths: Sequence[tuple], where: str) -> None:
  mapped = {t.path for t in table}
  missing, extra = sorted(set(paths) - mapped), sorted(mapped - set(paths))
  if missing or extra:
    raise InputError(where, f"the model's parameters and the HF mapping differ: unmapped "
                     f"{[_path_name(p) for p in missing]}, not in the model "
                     f"{[_path_name(p) for p in extra]}")


def import_hf(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
              rules: parallel.Rules = parallel.DEFAULT_RULES, dtype: str | None = None,
              vocab_size: int | None = None) -> tuple[ModelConfig, dict]:
  """Reads a local HF GPT-2 / Llama checkpoint into `LanguageModel` parameters.

  Args:
    directory: holds config.json and model.safetensors (or shards + model.safetensors.index.json).
    mesh: where the parameters go, each sharded by `parallel.param_specs` under `rules`; None
      puts them on the first device.
    rules: logical-axis rules (the config's `sharding_rules`).
    dtype: the returned config's compute dtype ("float32" when None). Parameters are float32
      whatever the checkpoint's dtype (bf16/fp16 weights convert exactly).
    vocab_size: pad the embedding (and lm_head) with zero rows up to this size, e.g. to the
      multiple of 128 the trainers use; the extra ids are never produced by the tokenizer.

  Returns:
    (ModelConfig, params): params is the pure dict `nnx.to_pure_dict` gives for the model.
  """
  directory = pathlib.Path(directory)
  fields = hf_model_overrides(directory)
  hf_vocab = fields["vocab_size"]
  if vocab_size is not None:
    if vocab_size < hf_vocab:
      raise InputError("import_hf vocab_size", f"{vocab_size} is smaller than the checkpoint's "
                       f"vocabulary ({hf_vocab})")
    fields["vocab_size"] = vocab_size
  fields["dtype"] = dtype or "float32"
  cfg = ModelConfig(**fields)
  _, abstract = abstract_params(cfg)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(abstract))
  else:
    shardings = parallel.named(mesh, parallel.param_specs(abstract, rules, mesh))
  shapes = dict(_flat_paths(nnx.to_pure_dict(abstract)))

  reader = _SafetensorsReader(directory)
  try:
    names = reader.names()
    table = _table(cfg, cfg.flavour, _detect_prefix(names, cfg.flavour))
    _check_table_covers(table, list(shapes), str(directory))
    # Before any tensor is read: an unknown tensor means another architecture.
    _check_all_used(reader, names, {n for t in table for n in _source_names(t, cfg.n_layers)}, cfg)
    params: dict = {}
    for tmap in table:
      shape = tuple(shapes[tmap.path].shape)
      host = _host_param(reader, tmap, shape, hf_vocab)
      # Each device copies only its own slice of the host array.
      array = jax.make_array_from_callback(shape, _get_path(shardings, tmap.path),
                                           lambda index, host=host: host[index])
      _set_path(params, tmap.path, array)
      del host  # the peak stays at one converted parameter
  finally:
    reader.close()
  return cfg, params


def _check_all_used(reader: _SafetensorsReader, names: Sequence[str], used: set[str],
                    cfg: ModelConfig) -> None:
  """A tensor the mapping does not know means the architecture differs: never drop it silently."""
  unknown = [n for n in names if n not in used and not n.endswith(_IGNORED_SUFFIXES)
             # A tied checkpoint may still store the (identical) output matrix.
             and not (cfg.tie_embeddings and n == "lm_head.weight")]
  if unknown:
    raise InputError(str(reader.directory), f"has tensors this {cfg.flavour} mapping does not "
                     f"use: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}; the checkpoint's "
                     "architecture has features the model lacks")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Planned:
  """One HF tensor to write: its name, shape and the parameter slices it is made of."""
  name: str
  shape: tuple[int, ...]
  maps: tuple[_TensorMap, ...]   # one per part, in part order
  layer: int | None


def _export_plan(table: Sequence[_TensorMap], shapes: Mapping[tuple, Any], n_layers: int,
                 vocab_size: int) -> list[_Planned]:
  by_source: dict[str, list[_TensorMap]] = {}
  for tmap in table:
    by_source.setdefault(tmap.source, []).append(tmap)
  plan = []
  for layer in [None] + list(range(n_layers)):
    for source, maps in by_source.items():
      maps = tuple(sorted(maps, key=lambda t: t.part))
      if maps[0].stacked != (layer is not None):
        continue
      shape = list(shapes[maps[0].path].shape)[0 if layer is None else 1:]
      if maps[0].vocab_axis is not None:
        shape[maps[0].vocab_axis] = vocab_size
      name = source.format(i=layer) if layer is not None else source
      plan.append(_Planned(name, _hf_shape(maps[0], shape), maps, layer))
  return plan


def _to_host(x: Any) -> np.ndarray:
  """A (possibly sharded, possibly multi-process) array as one numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _planned_value(params: Mapping, planned: _Planned, vocab_size: int) -> np.ndarray:
  """Gathers just the slices `planned` needs (one layer of one to three parameters)."""
  pieces = []
  for tmap in planned.maps:
    param = _get_path(params, tmap.path)
    ours = _to_host(param if planned.layer is None else param[planned.layer])
    if tmap.vocab_axis is not None:
      ours = _resize_vocab(ours, tmap.vocab_axis, vocab_size)
    pieces.append(tmap.to_hf(ours))
  value = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-1)
  if value.shape != planned.shape:  # a mapping bug, not bad input
    raise AssertionError(f"{planned.name}: built {value.shape}, planned {planned.shape}")
  return value


def _shards(plan: Sequence[_Planned], itemsize: int, max_bytes: int) -> list[list[_Planned]]:
  """Consecutive groups of at most `max_bytes` (a bigger tensor gets a file of its own)."""
  groups: list[list[_Planned]] = [[]]
  size = 0
  for planned in plan:
    nbytes = math.prod(planned.shape) * itemsize
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(planned)
    size += nbytes
  return groups


def _safetensors_header(group: Sequence[_Planned], code: str, itemsize: int) -> bytes:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for planned in group:
    end = offset + math.prod(planned.shape) * itemsize
    header[planned.name] = {"dtype": code, "shape": list(planned.shape),
                            "data_offsets": [offset, end]}
    offset = end
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)  # the data must start 8-byte aligned, as safetensors writes it
  return len(text).to_bytes(8, "little") + text


def _write_shard(path: pathlib.Path | None, group: Sequence[_Planned], params: Mapping,
                 vocab_size: int, dtype: np.dtype, code: str) -> None:
  """Streams one safetensors file, one tensor at a time. `path` None: gather only (other hosts)."""
  out = None if path is None else open(path, "wb")
  try:
    if out is not None:
      out.write(_safetensors_header(group, code, dtype.itemsize))
    for planned in group:
      value = _planned_value(params, planned, vocab_size).astype(dtype)
      if out is not None:
        out.write(np.ascontiguousarray(value).tobytes())
  finally:
    if out is not None:
      out.close()


def export_hf(params: Mapping, model_cfg: ModelConfig, directory: str | os.PathLike,
              flavour: str | None = None, *, dtype: str = "float32",
              vocab_size: int | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              tokenizer_dir: str | os.PathLike | None = None,
              extra_config: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes `params` of `LanguageModel(model_cfg)` as a HF checkpoint `transformers` loads.

  Args:
    params: the model's pure parameter dict (jax arrays on any mesh, or numpy).
    model_cfg: its config; must be expressible as HF `flavour` (e.g. a GPT-2 with RoPE is not).
    directory: created if needed; receives config.json and model.safetensors (or, above
      `max_shard_bytes`, model-0000k-of-0000n.safetensors + model.safetensors.index.json).
    flavour: "gpt2" (GPT2LMHeadModel) or "llama" (LlamaForCausalLM); None: model_cfg.flavour.
    dtype: "float32", "bfloat16" or "float16" for the stored tensors.
    vocab_size: trim the embedding to this many rows (e.g. the tokenizer's real vocabulary when
      the model's was padded); None keeps the model's.
    tokenizer_dir: copy the HF tokenizer files found there (vocab.json, merges.txt,
      tokenizer.model, tokenizer.json, ...) next to the weights.
    extra_config: merged into config.json last (e.g. {"eos_token_id": 50256}).

  Every process must call this (the gathers are collective); process 0 writes the files.
  """
  flavour = flavour or model_cfg.flavour
  if dtype not in _EXPORT_DTYPES:
    raise InputError("export_hf dtype", f"{dtype!r} is not one of {sorted(_EXPORT_DTYPES)}")
  vocab_size = vocab_size or model_cfg.vocab_size
  if vocab_size > model_cfg.vocab_size:
    raise InputError("export_hf vocab_size", f"{vocab_size} exceeds the model's vocabulary "
                     f"({model_cfg.vocab_size}); export only trims")
  config = hf_config(model_cfg, flavour, vocab_size)
  config.update(torch_dtype=dtype, dtype=dtype, **dict(extra_config or {}))
  _, abstract = abstract_params(model_cfg)
  shapes = dict(_flat_paths(nnx.to_pure_dict(abstract)))
  table = _table(model_cfg, flavour)
  _check_table_covers(table, list(shapes), "export_hf")
  for path, shape in shapes.items():
    try:
      got = tuple(np.shape(_get_path(params, path)))
    except (KeyError, TypeError):
      raise InputError("export_hf params", f"has no parameter {_path_name(path)}") from None
    if got != tuple(shape.shape):
      raise InputError(f"export_hf params: {_path_name(path)}", f"has shape {got} but the "
                       f"model config implies {tuple(shape.shape)}")

  code, np_dtype = _EXPORT_DTYPES[dtype], np.dtype(_SAFETENSORS_DTYPES[_EXPORT_DTYPES[dtype]])
  plan = _export_plan(table, shapes, model_cfg.n_layers, vocab_size)
  groups = _shards(plan, np_dtype.itemsize, max_shard_bytes)
  directory = pathlib.Path(directory)
  writer = jax.process_index() == 0
  if writer:
    directory.mkdir(parents=True, exist_ok=True)
  names = ([SINGLE_FILE] if len(groups) == 1 else
           [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
  for name, group in zip(names, groups):
    _write_shard(directory / name if writer else None, group, params, vocab_size, np_dtype, code)
  if writer:
    if len(groups) > 1:
      index = {"metadata": {"total_size": sum(math.prod(p.shape) for p in plan) * np_dtype.itemsize},
               "weight_map": {p.name: name for name, group in zip(names, groups) for p in group}}
      (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer_dir is not None:
      copy_tokenizer_files(tokenizer_dir, directory)
  return directory


def copy_tokenizer_files(source: str | os.PathLike, destination: str | os.PathLike) -> list[str]:
  """Copies the HF tokenizer files of `source` (a directory, or a SentencePiece .model file)."""
  source = pathlib.Path(source)
  if source.is_file():  # a bare SentencePiece model: HF expects it as tokenizer.model
    shutil.copyfile(source, pathlib.Path(destination) / "tokenizer.model")
    return ["tokenizer.model"]
  copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
  if not copied:
    raise InputError(str(source), f"has none of the tokenizer files {TOKENIZER_FILES}")
  for name in copied:
    shutil.copyfile(source / name, pathlib.Path(destination) / name)
  return copied


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

# tokenizer.json is read by `tokenizers.HFJsonTokenizer` (kind "hf_json"): the one byte-level BPE
# implementation, shared with the "gpt2" kind.
HFJsonTokenizer = tokenizers.HFJsonTokenizer


def tokenizer_section(directory: str | os.PathLike) -> dict[str, str] | None:
  """The config `tokenizer` section {kind, path} for the files in a HF directory, or None.

  Preference follows what is exact here: vocab.json + merges.txt (GPT-2 BPE), then
  tokenizer.model (SentencePiece), then tokenizer.json (kind "hf_json", see `HFJsonTokenizer`).
  """
  directory = pathlib.Path(directory)
  if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
    return {"kind": "gpt2", "path": str(directory)}
  if (directory / "tokenizer.model").is_file():
    return {"kind": "sentencepiece", "path": str(directory / "tokenizer.model")}
  if (directory / "tokenizer.json").is_file():
    return {"kind": "hf_json", "path": str(directory)}
  return None


# Kept for callers of the old name (experiments/convert.py); every kind lives in `tokenizers`.
make_tokenizer = tokenizers.make_tokenizer


def hf_tokenizer(directory: str | os.PathLike) -> tokenizers.Tokenizer:
  """The tokenizer stored in a HF checkpoint directory."""
  section = tokenizer_section(directory)
  if section is None:
    raise InputError(str(directory), "has no tokenizer files (vocab.json + merges.txt, "
                     "tokenizer.model or tokenizer.json)")
  return make_tokenizer(section["kind"], section["path"])
