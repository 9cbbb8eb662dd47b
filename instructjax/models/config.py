"""One decoder configuration for both the GPT-2 and the Llama flavour.

A flavour is only a set of defaults: every switch (norm, MLP, positions, tying, GQA) is its own
field, so a researcher can mix them (e.g. GPT-2 with RoPE) by overriding one field.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from instructjax.errors import InputError

FLAVOURS = {
    "gpt2": dict(norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True,
                 use_bias=True),
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", tie_embeddings=False,
                  use_bias=False),
}
REMAT_POLICIES = ("none", "full", "dots")


ATTENTION_IMPLS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and switches of the decoder; `None` fields take the flavour's default."""
  flavour: str = "gpt2"
  vocab_size: int = 512
  real_vocab_size: int | None = None  # the tokenizer's; logits of the padding ids above it are masked
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int | None = None      # None = n_heads (no grouping)
  d_ff: int | None = None            # None = 4 * d_model
  max_len: int = 1024                # learned-position table size; the RoPE flavour ignores it
  norm: str | None = None            # "layernorm" | "rmsnorm"
  mlp: str | None = None             # "gelu" | "swiglu"
  position: str | None = None        # "learned" | "rope"
  tie_embeddings: bool | None = None
  use_bias: bool | None = None
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  dtype: str = "float32"             # compute dtype; parameters always stay float32
  dropout: float = 0.0
  remat: str = "none"                # "none" | "full" | "dots" (save matmul outputs only)
  scan_unroll: int = 1
  # None: cuDNN's fused flash attention where it applies (see `layers.attention_implementation`),
  # XLA's elsewhere; "xla" or "cudnn" forces one.
  attention_impl: str | None = None
  init_std: float = 0.02

  def __post_init__(self):
    if self.flavour not in FLAVOURS:
      raise InputError("model.flavour", f"unknown flavour {self.flavour!r}; one of {sorted(FLAVOURS)}")
    for name, default in FLAVOURS[self.flavour].items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, default)
    if self.n_kv_heads is None:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.d_ff is None:
      object.__setattr__(self, "d_ff", 4 * self.d_model)
    self._check()

  def _check(self):
    problems = []
    if self.d_model % self.n_heads:
      problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
    if self.position == "rope" and self.head_dim % 2:
      problems.append(f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.remat not in REMAT_POLICIES:
      problems.append(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
    if self.norm not in ("layernorm", "rmsnorm"):
      problems.append(f"norm={self.norm!r} is not 'layernorm' or 'rmsnorm'")
    if self.mlp not in ("gelu", "swiglu"):
      problems.append(f"mlp={self.mlp!r} is not 'gelu' or 'swiglu'")
    if self.position not in ("learned", "rope"):
      problems.append(f"position={self.position!r} is not 'learned' or 'rope'")
    if self.real_vocab_size is not None and not 0 < self.real_vocab_size <= self.vocab_size:
      problems.append(f"real_vocab_size={self.real_vocab_size} must be in "
                      f"(0, vocab_size={self.vocab_size}]")
    if self.attention_impl not in ATTENTION_IMPLS:
      problems.append(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if problems:
      raise InputError("model config", "; ".join(problems))

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_mapping(cls, fields: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a config section (a ConfigDict or dict); unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise InputError("model config", f"unknown fields {unknown}; known: {sorted(known)}")
    return cls(**dict(fields))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def pad_vocab(size: int, multiple: int = 128) -> int:
  """Rounds a tokenizer's vocabulary up so the table shards evenly and matmuls tile well."""
  return -(-size // multiple) * multiple


# How a model runs, not what it is: a stage that starts from another stage's weights sets these
# itself and takes every other field (the architecture) from the stage it starts from.
RUNTIME_FIELDS = ("dtype", "dropout", "remat", "scan_unroll", "attention_impl", "init_std")


def architecture(cfg: ModelConfig) -> dict:
  """The fields of `cfg` that its weights depend on (all but `RUNTIME_FIELDS`)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
