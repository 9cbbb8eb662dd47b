"""Pieces every stage's thin loop shares: mesh and rules from the config, sharded state creation,
the jitted step wrapper, and the tokenizer / model config the stages agree on."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from instructjax import parallel
from instructjax.data.tokenizers import Tokenizer, make_tokenizer
from instructjax.errors import InputError
from instructjax.models.config import ModelConfig, architecture, pad_vocab
from instructjax.sampling import Sampler, SamplingConfig


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where arrays live: the mesh and the logical-axis rules that map names onto it."""
  mesh: Mesh
  rules: tuple

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Layout":
    return cls(parallel.make_mesh(dict(config.mesh)), parallel.rules_from_config(config.sharding_rules))

  def scope(self):
    """Context for tracing and running steps: the mesh and the activation rules."""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(parallel.axis_rules(self.rules))
    return stack


@dataclasses.dataclass(frozen=True)
class ModelHandle:
  """What code outside the step needs to run a model: its graph, config and parameter layout."""
  graphdef: nnx.GraphDef
  cfg: ModelConfig
  param_shardings: Any


def tokenizer_from_config(config: ml_collections.ConfigDict) -> Tokenizer:
  return make_tokenizer(config.tokenizer.kind, config.tokenizer.path or None,
                        config.tokenizer.get("special_tokens_in_text", False))


RESOLVED_MODEL = "resolved_model"  # config.json: the ModelConfig the stage ran with


def model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                 inherit: bool = True, source: ModelConfig | None = None) -> ModelConfig:
  """The model section as a ModelConfig; vocab_size None means the tokenizer's, padded to 128.

  A stage that starts from another stage's checkpoint (`config.init_from`) takes that stage's
  architecture — what its weights are — and keeps only its own runtime fields
  (`models.config.RUNTIME_FIELDS`: dtype, dropout, remat, ...), so no stage repeats the model's
  sizes by hand. A `init_from_hf` checkpoint decides the architecture likewise. `source`: the
  ModelConfig to take the architecture from instead (a pipeline's stage not trained yet)."""
  fields = config.model.to_dict()
  hf_dir = fields.pop("init_from_hf", "")
  if source is None and inherit:
    source = started_from(config, tokenizer)
  if source is not None:
    fields.update(architecture(source))
  elif hf_dir:  # the checkpoint decides the architecture; the vocabulary is padded as usual
    from instructjax.models import hf
    overrides = hf.hf_model_overrides(hf_dir)
    fields.update({k: v for k, v in overrides.items() if k != "vocab_size"})
    fields["vocab_size"] = fields.get("vocab_size") or hf_vocab_size(overrides["vocab_size"],
                                                                     tokenizer)
  if fields.get("vocab_size") is None:
    fields["vocab_size"] = pad_vocab(tokenizer.vocab_size)
  if fields.get("real_vocab_size") is None:
    fields["real_vocab_size"] = tokenizer.vocab_size
  if fields["vocab_size"] < tokenizer.vocab_size:
    raise InputError("config.model.vocab_size", f"{fields['vocab_size']} is smaller than the "
                     f"tokenizer's vocabulary ({tokenizer.vocab_size})")
  return ModelConfig.from_mapping(fields)


def hf_vocab_size(checkpoint_vocab: int, tokenizer: Tokenizer | None) -> int:
  """The one rule for a Hugging Face checkpoint's embedding rows here (`init_from_hf` and
  `experiments.convert --from_hf` alike): the checkpoint's vocabulary, or the tokenizer's if
  larger, padded to a multiple of 128 (the extra rows are zeros no token id reaches)."""
  return pad_vocab(max(checkpoint_vocab, tokenizer.vocab_size if tokenizer else 0))


def started_from(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ModelConfig | None:
  """The ModelConfig of the stage `config.init_from` names (as it ran: its config.json's
  resolved model, or its model section for a workdir written before that was recorded), or None
  without one."""
  from instructjax.trainers import workdirs
  if not config.get("init_from"):
    return None
  trained = workdirs.read_config(config.init_from)
  if trained is None:
    return None  # the stage's own checks name the missing workdir
  check_same_tokenizer(config, tokenizer, trained, config.init_from, "config.init_from")
  return ran_with(trained, tokenizer)


def check_same_tokenizer(config, tokenizer: Tokenizer, trained: ml_collections.ConfigDict,
                         workdir: str, field: str) -> None:
  """A stage reads the model of `workdir` (named by config `field`) only with the tokenizer it
  was trained with, compared by content (`tokenizers.difference`: the same files in another
  directory are the same tokenizer): other ids would mean other tokens to the same weights."""
  from instructjax.data.tokenizers import difference
  if trained.get("tokenizer") is None:
    return  # a workdir that does not say: its model's vocabulary is checked when it loads
  mine, theirs = config.tokenizer.to_dict(), trained.tokenizer.to_dict()
  why = difference(tokenizer, mine, theirs)
  if why:
    raise InputError(field, f"{workdir} was trained with tokenizer {theirs}, this stage uses "
                     f"{mine}: {why}; set --config.tokenizer to match")


def ran_with(trained: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ModelConfig:
  """The ModelConfig a finished stage ran with, from its config.json (`trained`): the resolved
  model it recorded, or for a workdir written before that, its model section."""
  if trained.get(RESOLVED_MODEL):
    return ModelConfig.from_mapping(trained[RESOLVED_MODEL].to_dict())
  return model_config(trained, tokenizer, inherit=False)


def save_config(workdir: str, config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
  """`<workdir>/config.json`: the config the stage ran with and the ModelConfig it resolved to,
  which the stages started from this one take their architecture from."""
  save_json(os.path.join(workdir, "config.json"),
            {**config.to_dict(), RESOLVED_MODEL: dataclasses.asdict(model_cfg)})


def hf_params(config, layout: "Layout", model_cfg: ModelConfig):
  """The weights of `config.model.init_from_hf`, each placed straight onto its shard."""
  from instructjax.models import hf
  _, params = hf.import_hf(config.model.init_from_hf, mesh=layout.mesh, rules=layout.rules,
                           vocab_size=model_cfg.vocab_size)
  return params


def check_seq_len(cfg: ModelConfig, seq_len: int, where: str = "config.data.seq_len") -> None:
  if cfg.position == "learned" and seq_len > cfg.max_len:
    raise InputError(where, f"{seq_len} exceeds the model's learned positions (max_len={cfg.max_len})")


def split_model(model_fn: Callable[[nnx.Rngs], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and abstract state of a model, without allocating its parameters."""
  abstract = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
  return nnx.split(abstract)


def opt_state_specs(optimizer: optax.GradientTransformation, params_abstract, param_specs):
  """Optimizer states mirror the parameters' layout; counters and scalars are replicated."""
  opt_abstract = jax.eval_shape(optimizer.init, params_abstract)
  return optax.tree_map_params(optimizer, lambda _, spec: spec, opt_abstract, param_specs,
                               transform_non_params=lambda _: PartitionSpec(),
                               is_leaf=lambda x: isinstance(x, PartitionSpec))


def create_sharded(init_fn: Callable[[], Any], shardings: Any) -> Any:
  """Runs `init_fn` under jit with `out_shardings`, so no host holds a full copy of the state."""
  return jax.jit(init_fn, out_shardings=shardings)()


def abstract_with_shardings(state_shape: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state_shape, shardings)


def sampling_config(s: ml_collections.ConfigDict, greedy: bool = False) -> SamplingConfig:
  """The SamplingConfig of a `sampling` config section (prompt_len and batch_size are the
  caller's: how prompts are cut and batched)."""
  return SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, greedy=greedy)


def sampler(model: "ModelHandle", sampling: SamplingConfig, tokenizer: Tokenizer,
            layout: Layout) -> Sampler:
  """A jitted sampler of `model` on `layout`, stopping at the tokenizer's EOS."""
  return Sampler(model.graphdef, sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                 mesh=layout.mesh, param_shardings=model.param_shardings, rules=layout.rules)


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int, lr: float | None = None):
  """(schedule, AdamW) of an `optimizer` config section over `total_steps` (`lr` overrides its
  rate: PPO's value model). Every stage (pretraining, SFT, reward model, PPO's policy and value)
  builds its optimizer here, so `adam_style` applies to all of them."""
  from instructjax.objectives import sft
  if o.adam_style not in sft.ADAM_STYLES:
    raise InputError("config.optimizer.adam_style",
                     f"{o.adam_style!r} is not one of {', '.join(sft.ADAM_STYLES)}")
  schedule = sft.learning_rate_schedule(o.lr if lr is None else lr, o.warmup_steps, total_steps,
                                        o.decay, o.end_fraction)
  optimizer = sft.make_optimizer(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                                 eps=o.eps, clip_norm=o.clip_norm, adam_style=o.adam_style)
  return schedule, optimizer


def save_json(path: str, obj: Any) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)


def checkpoint_dir(path: str) -> str:
  """Accepts a stage's workdir or its `checkpoints/` directory (what `init_from` points at)."""
  path = path.rstrip("/")
  return path if os.path.basename(path) == "checkpoints" or not os.path.isdir(
      os.path.join(path, "checkpoints")) else os.path.join(path, "checkpoints")


def supervised_state(seed: int, layout: Layout, model_fn: Callable[[nnx.Rngs], nnx.Module],
                     optimizer: optax.GradientTransformation):
  """Graph, abstract sharded state, shardings and an initialiser for a one-model train state
  (the dict of `objectives.sft`: params, opt_state, step, rng, bad_steps)."""
  from instructjax.objectives import sft
  graphdef, abstract_nnx = split_model(model_fn)
  p_specs = parallel.param_specs(abstract_nnx, layout.rules, layout.mesh)
  scalar = PartitionSpec()
  specs = dict(params=p_specs,
               opt_state=opt_state_specs(optimizer, nnx.to_pure_dict(abstract_nnx), p_specs),
               step=scalar, rng=scalar, bad_steps=scalar)
  shardings = parallel.named(layout.mesh, specs)

  def init():
    params = nnx.to_pure_dict(nnx.split(model_fn(nnx.Rngs(seed)))[1])
    return sft.init_state(params, optimizer, seed)

  abstract = abstract_with_shardings(jax.eval_shape(init), shardings)
  return graphdef, abstract, shardings, init


def jit_supervised(train_step: Callable, eval_step: Callable, shardings, layout: Layout):
  """The train step (state donated) and the eval step, jitted once with explicit shardings."""
  batch = parallel.batch_sharding(layout.mesh)
  whole = parallel.replicated(layout.mesh)
  train = jax.jit(train_step, in_shardings=(shardings, batch), out_shardings=(shardings, whole),
                  donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(shardings["params"], batch), out_shardings=whole)
  return train, evaluate
