"""The stand-alone evaluation stage: InstructGPT's comparison of GPT, GPT-prompted, SFT, PPO and
PPO-ptx, in miniature, on held-out prompts: the synthetic task's, or the user's own file.

For every model whose workdir the config names (`config.models.{gpt,sft,ppo,ppo_ptx}`; any
subset; `models.gpt` may also be a Hugging Face checkpoint directory, the pretrained model a
real run starts from) it samples one response per prompt and measures

  scores            per judge the run has (`evaluation.JUDGES`): the synthetic task's gold scorer
                    (its own prompts only), the held-out judge RM of `config.judge_from` (trained
                    on comparisons the proxy RM never saw), the proxy RM of `config.reward_from`
                    (what PPO optimised), each RM normalised as it was fitted (mean, 95 % CI);
  win rate vs SFT   per judge, prompt by prompt, a higher score than SFT's wins, a tie counts half
                    (Wilson interval; see `instructjax.evaluation`); the first judge present is
                    the report's headline;
  KL from SFT       mean over prompts of sum over response tokens of log pi - log pi_SFT, on one
                    temperature-1 sample per prompt from the model itself (a KL needs samples of
                    pi, whatever the decoding of the other metrics);
  length, EOS rate  of the responses;
  pretraining loss  next-token loss on held-out text (the alignment tax): the synthetic corpus,
                    files, or the held-out part of a corpus (`ptx_eval.source`).

and for each reward model its held-out pair accuracy by K on `config.rankings_file` (or the
comparisons it collected). Prompts: `config.prompts_file` (e.g. prepare_data's
eval/prompts.jsonl), else the synthetic task's held-out split; with a prompts file nothing in the
report comes from the synthetic task (no gold scores, labeler ceiling or GPT-prompted).

"GPT-prompted" (synthetic prompts only) is the GPT checkpoint again, its prompts given
`few_shot.n_shots` solved examples first (`SyntheticTask.few_shot_prompt`), with its own, longer
`few_shot.prompt_len`; its scores are of the response to the original prompt, and its KL compares
pi_GPT(y | few-shot prompt) with pi_SFT(y | prompt). Responses are greedy by default
(`config.greedy`): with a few hundred prompts, sampling noise would otherwise dominate the
differences between models.

This module is the thin model layer (load, sample, score); the statistics are in
`instructjax/evaluation.py` and the report in `instructjax/report.py`. Model shapes come from
each workdir's `config.json` (the config's `model` section only for a workdir without one);
SFT and GPT checkpoints hold the policy at params/, PPO checkpoints at params/policy/.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from instructjax import evaluation, parallel, report
from instructjax.data import formatting, pipeline, records
from instructjax.data.rankings import read_rankings
from instructjax.data.synthetic import what_differs
from instructjax.data.tokenizers import Tokenizer
from instructjax.errors import InputError
from instructjax.metrics import read_metrics
from instructjax.models import hf
from instructjax.models.decoder import LanguageModel
from instructjax.objectives import ppo, sft
from instructjax.sampling import Sampler, SamplingConfig
from instructjax.trainers import (common, comparisons, data_sources, generate, loop, reward,
                                  workdirs)
from instructjax.trainers.data_sources import synthetic_task

# Where each model's LanguageModel parameters sit in its stage's checkpoint.
CHECKPOINT_PATHS = {"gpt": ("params",), "sft": ("params",), "ppo": ("params", "policy"),
                    "ppo_ptx": ("params", "policy")}
METRICS_FILE = "metrics.jsonl"
# synthetic: the synthetic pretraining corpus; files: the texts of ptx_eval.files; heldout: the
# part of ptx_eval.files a stage training on them holds out (PPO-ptx's ptx.files without
# ptx.eval_files: every 20th record, or the tail of a single document; `builders.base`), the
# text it never trained on; none: off.
PTX_EVAL_SOURCES = ("synthetic", "files", "heldout", "none")


@dataclasses.dataclass(frozen=True)
class Policy:
  """A language model restored onto the evaluation's layout."""
  name: str
  workdir: str
  handle: common.ModelHandle
  params: Any
  step: int | None


# ------------------------------------------------------------------------------------------------
# Config and loading.


def _given(config) -> list[str]:
  given = [name for name in CHECKPOINT_PATHS if config.models[name]]
  if not given:
    raise InputError("config.models", "names no model; give at least one workdir, e.g. "
                     "--config.models.sft=/tmp/sft")
  return given


def on_task(config) -> bool:
  """Whether the prompts are the synthetic task's (no `prompts_file`): only then are there gold
  scores, a labeler ceiling, few-shot examples and a synthetic pretraining corpus to report."""
  return not config.prompts_file


def check_config(config: ml_collections.ConfigDict) -> None:
  """The workdirs and files the config names exist (a pipeline checks `check_settings` before its
  earlier stages have made them, and this when the evaluation starts)."""
  for name in _given(config):
    if not os.path.isdir(config.models[name]):
      raise InputError(f"config.models.{name}", f"{config.models[name]} is not a directory")
  for field in ("reward_from", "judge_from"):
    if config[field] and not os.path.isdir(config[field]):
      raise InputError(f"config.{field}", f"{config[field]} is not a directory")


def eval_prompts(config, task) -> tuple[list[str], str]:
  """(the evaluation's prompts, what they are): the first `num_prompts` of `prompts_file`, or the
  synthetic task's `split`."""
  if on_task(config):
    return (task.prompts(config.num_prompts, config.split),
            f"held-out prompts of the synthetic task's \"{config.split}\" split")
  [path] = data_sources.split_paths(config.prompts_file, "config.prompts_file")
  texts = [r["prompt"] for r in records.read_prompts(path)][:config.num_prompts]
  if not texts:
    raise InputError(path, "has no prompts")
  return texts, f"prompts of {path}"


def _check_data(config) -> None:
  """The evaluation's data fields: the prompt and ranking files readable, and nothing synthetic
  asked of a run on the user's prompts."""
  if not on_task(config):
    eval_prompts(config, None)  # the file is there and holds prompts
    if config.ptx_eval.source == "synthetic":
      raise InputError("config.ptx_eval.source", "is 'synthetic' but the prompts are "
                       f"{config.prompts_file}: the alignment tax would be measured on the "
                       "synthetic corpus; set ptx_eval.source=heldout (or files) with "
                       "ptx_eval.files=..., or none")
  if config.ptx_eval.source not in PTX_EVAL_SOURCES:
    raise InputError("config.ptx_eval.source",
                     f"{config.ptx_eval.source!r} is not one of {', '.join(PTX_EVAL_SOURCES)}")
  if config.ptx_eval.source in ("files", "heldout"):
    if not data_sources.split_paths(config.ptx_eval.files, "config.ptx_eval.files"):
      raise InputError("config.ptx_eval.files", f"source={config.ptx_eval.source} needs at "
                       "least one text file")
  if config.rankings_file:
    data_sources.split_paths(config.rankings_file, "config.rankings_file")


def check_settings(config: ml_collections.ConfigDict, layout: common.Layout, model_cfg=None,
                   trained=None) -> None:
  """Every setting the evaluation uses, checked before any model is loaded or sampled: the
  values and files below, the batch sizes over the mesh, and for each model it evaluates, its
  sampling (prompt_len + max_new_tokens, also the KL's and the reference's; GPT-prompted's
  few_shot.prompt_len) and pretraining-loss rows within its positions. Each model's ModelConfig
  comes from its workdir's config.json or Hugging Face checkpoint (tokenizer checked by
  content), or `trained[workdir]` for a model a pipeline has still to train. `model_cfg` is
  unused: each model has its own."""
  del model_cfg
  given = _given(config)
  if config.num_prompts < 1:
    raise InputError("config.num_prompts", f"must be >= 1, got {config.num_prompts}")
  if config.rm_train_rankings < 0:
    raise InputError("config.rm_train_rankings",
                     f"must be >= 0 (0 turns the training-pairs column off), got "
                     f"{config.rm_train_rankings}")
  if config.few_shot.n_shots < 0:
    raise InputError("config.few_shot.n_shots", f"must be >= 0, got {config.few_shot.n_shots}")
  _check_data(config)
  evaluation.z_value(config.confidence)  # raises for a confidence outside (0, 1)
  from instructjax.trainers import stages
  s, e = config.sampling, config.ptx_eval
  tokenizer = common.tokenizer_from_config(config)
  for name in given:
    workdir = config.models[name]
    cfg = (trained or {}).get(workdir) or model_config_of(name, workdir, config, tokenizer)
    try:
      stages.check_sampling(s, layout, cfg, greedy=config.greedy)
      if name == "gpt" and config.few_shot.n_shots > 0 and on_task(config):  # GPT-prompted
        common.check_seq_len(cfg, config.few_shot.prompt_len + s.max_new_tokens,
                             f"config.few_shot.prompt_len {config.few_shot.prompt_len} + "
                             f"config.sampling.max_new_tokens {s.max_new_tokens}")
      if e.source != "none":
        common.check_seq_len(cfg, e.seq_len, "config.ptx_eval.seq_len")
        parallel.check_global_batch(e.batch_size, layout.mesh, "config.ptx_eval.batch_size",
                                    rules=layout.rules)
    except InputError as error:
      raise InputError(error.where, f"{error.problem} (model {name}: {workdir})") from None


def model_config_of(name: str, workdir: str, config, tokenizer: Tokenizer):
  """The ModelConfig a workdir was trained with, or a Hugging Face checkpoint's (as
  `init_from_hf` reads it: the config's runtime fields, the vocabulary padded to 128); its
  tokenizer must be the evaluation's."""
  if hf.is_checkpoint(workdir):
    section = hf.tokenizer_section(workdir)
    if section:  # the checkpoint's own tokenizer files, compared by content
      common.check_same_tokenizer(config, tokenizer, ml_collections.ConfigDict(
          {"tokenizer": section}), workdir, f"config.models.{name}")
    return common.model_config(_reading_hf(config, workdir), tokenizer, inherit=False)
  stored = workdirs.read_config(workdir)
  if stored is None:
    print(f"[evaluate] {workdir} has no config.json: using config.model for {name}", flush=True)
    return common.model_config(config, tokenizer)
  common.check_same_tokenizer(config, tokenizer, stored, workdir, f"config.models.{name}")
  return common.ran_with(stored, tokenizer)


def _reading_hf(config, checkpoint: str) -> ml_collections.ConfigDict:
  """The config with `model.init_from_hf` pointed at `checkpoint`."""
  copy = ml_collections.ConfigDict(config.to_dict())
  copy.model.init_from_hf = checkpoint
  return copy


def load_policy(name: str, workdir: str, config, layout: common.Layout,
                tokenizer: Tokenizer) -> Policy:
  """The LanguageModel of a stage's latest checkpoint, or of a Hugging Face checkpoint, sharded
  on `layout`."""
  model_cfg = model_config_of(name, workdir, config, tokenizer)
  if hf.is_checkpoint(workdir):
    model = workdirs.handle(lambda rngs: LanguageModel(model_cfg, rngs=rngs), model_cfg, layout)
    params = common.hf_params(_reading_hf(config, workdir), layout, model_cfg)
    return Policy(name, workdir, model, params, None)
  model, params = workdirs.restore_model(workdir, LanguageModel, model_cfg, layout,
                                         CHECKPOINT_PATHS[name])
  return Policy(name, workdir, model, params, workdirs.latest_step(workdir))


# ------------------------------------------------------------------------------------------------
# Sampling and scoring.


class Compiled:
  """Jitted functions per model shape (ModelConfig), so that models of one shape — GPT, SFT
  and the PPO policies usually — compile each function once, not once per model."""

  def __init__(self, layout: common.Layout, tokenizer: Tokenizer):
    self.layout = layout
    self.tokenizer = tokenizer
    self._cache: dict[tuple, Any] = {}

  def _get(self, key: tuple, make):
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  def sampler(self, handle: common.ModelHandle, sampling: SamplingConfig) -> Sampler:
    return self._get(("sample", handle.cfg, sampling), lambda: Sampler(
        handle.graphdef, sampling, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
        mesh=self.layout.mesh, param_shardings=handle.param_shardings, rules=self.layout.rules))

  def log_probs(self, handle: common.ModelHandle):
    rows = parallel.batch_sharding(self.layout.mesh, 2)
    return self._get(("log_probs", handle.cfg), lambda: jax.jit(
        functools.partial(ppo.response_logprobs, handle.graphdef),
        in_shardings=(handle.param_shardings, rows, rows, rows), out_shardings=rows))

  def eval_step(self, handle: common.ModelHandle):
    return self._get(("eval_step", handle.cfg), lambda: jax.jit(
        functools.partial(sft.eval_step, graphdef=handle.graphdef),
        in_shardings=(handle.param_shardings, parallel.batch_sharding(self.layout.mesh)),
        out_shardings=parallel.replicated(self.layout.mesh)))


def _global_rows(arrays: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Every process holds the whole batch; each contributes its own rows to the global one."""
  n, i = jax.process_count(), jax.process_index()
  per = next(iter(arrays.values())).shape[0] // n
  return parallel.global_batch({k: v[i * per:(i + 1) * per] for k, v in arrays.items()}, mesh)




def sample(policy: Policy, prompts: Sequence[str], sampling: SamplingConfig, *, prompt_len: int,
           batch_size: int, compiled: Compiled, rng) -> list[generate.Completion]:
  """One response per prompt, in fixed-shape batches (see `generate.complete`)."""
  return generate.complete(compiled.sampler(policy.handle, sampling), policy.params,
                           compiled.tokenizer, prompts, rng,
                           prompt_len=prompt_len, batch_size=batch_size,
                           mesh=compiled.layout.mesh)


def response_log_probs(policy: Policy, prompts: Sequence[str],
                       completions: Sequence[generate.Completion], *, prompt_len: int,
                       max_new_tokens: int, batch_size: int,
                       compiled: Compiled) -> tuple[np.ndarray, np.ndarray]:
  """log pi(token | prompt, earlier tokens) of every response token, [n, N], and the response
  mask [n, N]: the policy's full forward over left-padded prompt + response."""
  layout, tokenizer = compiled.layout, compiled.tokenizer
  fn = compiled.log_probs(policy.handle)
  logps, masks = [], []
  for start in range(0, len(prompts), batch_size):
    chunk = list(range(start, min(start + batch_size, len(prompts))))
    filled = [prompts[i] for i in chunk] + [""] * (batch_size - len(chunk))
    prompt_tokens, prompt_mask = generate.encode_prompts(tokenizer, filled, prompt_len)
    response = np.full((batch_size, max_new_tokens), tokenizer.pad_id, np.int32)
    response_mask = np.zeros((batch_size, max_new_tokens), np.int32)
    for row, i in enumerate(chunk):
      ids = completions[i].tokens[:max_new_tokens]
      response[row, :len(ids)] = ids
      response_mask[row, :len(ids)] = 1
    batch = _global_rows(dict(tokens=np.concatenate([prompt_tokens, response], 1),
                              mask=np.concatenate([prompt_mask, response_mask], 1),
                              response_mask=response_mask), layout.mesh)
    with layout.scope():
      out = fn(policy.params, batch["tokens"], batch["mask"], batch["response_mask"])
    logps.append(parallel.to_host(out)[:len(chunk)])
    masks.append(response_mask[:len(chunk)])
  return np.concatenate(logps), np.concatenate(masks)


def pretraining_loss(policy: Policy, documents: Sequence[str], *, config,
                     compiled: Compiled) -> float:
  """Mean next-token loss over the held-out documents, packed as pretraining packs them."""
  e, layout, tokenizer = config.ptx_eval, compiled.layout, compiled.tokenizer
  common.check_seq_len(policy.handle.cfg, e.seq_len, "config.ptx_eval.seq_len")
  local_batch = parallel.check_global_batch(e.batch_size, layout.mesh,
                                            "config.ptx_eval.batch_size", rules=layout.rules)
  source = [{"text": text} for text in documents]
  data = lambda: iter(pipeline.eval_dataset(
      source, tokenizer, kind="pretrain", seq_len=e.seq_len, batch_size=local_batch,
      process_index=jax.process_index(), process_count=jax.process_count()))
  with layout.scope():
    losses = loop.heldout_loss(compiled.eval_step(policy.handle), policy.params, data, layout,
                               e.max_batches)
    return float(losses["eval_loss"])


def pretraining_documents(config, task, workdir: str) -> tuple[list[str], str]:
  """(held-out pretraining texts, what they are) for the alignment tax; ([], "") when off."""
  e = config.ptx_eval
  if e.source == "none":
    return [], ""
  if e.source == "synthetic":
    texts = task.pretraining_documents(e.num_documents, "eval")
    return texts, f"{len(texts)} held-out documents of the synthetic pretraining corpus"
  paths = data_sources.split_paths(e.files, "config.ptx_eval.files")
  what = ", ".join(paths)
  if e.source == "heldout":  # the builder PPO-ptx's ptx stream is built by holds it out
    sources = data_sources.built("text", {"train": paths}, os.path.join(workdir, "data", "tfds"))
    if "validation" not in sources:
      raise InputError("config.ptx_eval.files", f"{what} has no held-out part (a single "
                       "record too short to cut); give held-out text with ptx_eval.source=files")
    held_out = sources["validation"]
    texts = [pipeline.text_field(held_out[i], "text") for i in range(len(held_out))]
    what = f"the held-out part of {what} (as the PPO-ptx stage holds it out)"
  else:
    texts = [r["text"] for path in paths for r in records.read_text(path)]
  texts = texts[:e.num_documents or None]
  return texts, f"{len(texts)} document{'s' * (len(texts) != 1)} of {what}"


@dataclasses.dataclass
class RewardModel:
  graphdef: Any
  params: Any
  gain: float
  bias: float
  seq_len: int
  max_prompt_len: int
  fmt: formatting.Format  # how it was trained to read a prompt and a response

  def score(self, prompts, responses, *, batch_size: int, layout, tokenizer,
            ended=None) -> np.ndarray:
    """Normalised rewards (gain * r + bias) of the responses to the (original) prompts, each
    read with an EOS only if it `ended` (all when None), as PPO reads its rollouts."""
    raw = reward.score_texts(self.params, self.graphdef, tokenizer, prompts, responses,
                             seq_len=self.seq_len, max_prompt_len=self.max_prompt_len,
                             batch_size=batch_size, layout=layout, fmt=self.fmt, ended=ended)
    return self.gain * raw + self.bias


def load_reward(workdir: str, layout: common.Layout) -> RewardModel:
  graphdef, params, _, gain, bias = workdirs.load_reward_model(workdir, layout)
  trained = workdirs.read_config(workdir)
  return RewardModel(graphdef, params, gain, bias, trained.data.seq_len,
                     trained.data.max_prompt_len, formatting.from_config(trained))


# ------------------------------------------------------------------------------------------------
# One model.


def _sampling_configs(config) -> tuple[SamplingConfig, SamplingConfig, bool]:
  """(decoding, KL sampling, whether the decoding samples already serve for KL)."""
  s = config.sampling
  decoding = common.sampling_config(s, config.greedy)
  for_kl = SamplingConfig(max_new_tokens=s.max_new_tokens)
  return decoding, for_kl, decoding == for_kl


def evaluate_model(name: str, policy: Policy, sft_policy: Policy | None, prompts: Sequence[str],
                   documents: Sequence[str], *, config, task,
                   compiled: Compiled) -> dict[str, Any]:
  """Per-prompt outputs of one model (see `evaluation.summarise_model`) and its responses
  ("texts"); the RM scores all models' responses afterwards, in one pass."""
  s = config.sampling
  prompted = name == "gpt_prompted"
  contexts = ([task.few_shot_prompt(p, config.few_shot.n_shots) for p in prompts] if prompted
              else list(prompts))
  prompt_len = config.few_shot.prompt_len if prompted else s.prompt_len
  decoding, for_kl, reuse = _sampling_configs(config)
  kwargs = dict(prompt_len=prompt_len, batch_size=s.batch_size, compiled=compiled)
  completions = sample(policy, contexts, decoding, rng=jax.random.PRNGKey(config.seed), **kwargs)
  texts = [formatting.from_config(config).response_text(c.text) for c in completions]
  out: dict[str, Any] = dict(
      gold=[task.score(p, t) for p, t in zip(prompts, texts)] if task is not None else None,
      ended=[c.ended for c in completions], lengths=[len(c.tokens) for c in completions],
      prompts_truncated=sum(len(compiled.tokenizer.encode(c)) > prompt_len for c in contexts),
      workdir=policy.workdir, checkpoint_step=policy.step, texts=texts)
  if name == "sft":
    out["kl"] = [0.0] * len(prompts)  # KL(pi_SFT || pi_SFT) = 0 exactly
  elif sft_policy is not None and config.kl_from_sft:
    if sft_policy.handle.cfg.vocab_size != policy.handle.cfg.vocab_size:
      raise InputError(f"config.models.{name}", "its vocabulary differs from SFT's "
                       f"({policy.handle.cfg.vocab_size} vs {sft_policy.handle.cfg.vocab_size}): "
                       "no KL between them")
    samples = completions if reuse else sample(policy, contexts, for_kl,
                                               rng=jax.random.PRNGKey(config.seed + 1), **kwargs)
    logp, mask = response_log_probs(policy, contexts, samples, max_new_tokens=s.max_new_tokens,
                                    **kwargs)
    ref_logp, _ = response_log_probs(sft_policy, prompts, samples,
                                     max_new_tokens=s.max_new_tokens,
                                     **dict(kwargs, prompt_len=s.prompt_len))
    out["kl"] = evaluation.sequence_log_ratio(logp, ref_logp, mask).tolist()
  if documents:
    out["pretraining_loss"] = pretraining_loss(policy, documents, config=config,
                                               compiled=compiled)
  return out


def add_rm_scores(outputs: dict[str, dict[str, Any]], prompts: Sequence[str], rm: RewardModel, *,
                  batch_size: int, layout: common.Layout, tokenizer: Tokenizer,
                  key: str = "rm") -> None:
  """Sets outputs[name][key]: every model's responses to the original prompts scored by `rm`,
  in one pass."""
  names = list(outputs)
  all_prompts = [p for _ in names for p in prompts]
  all_texts = [t for name in names for t in outputs[name]["texts"]]
  all_ended = [e for name in names for e in outputs[name]["ended"]]
  scores = rm.score(all_prompts, all_texts, batch_size=batch_size, layout=layout,
                    tokenizer=tokenizer, ended=all_ended)
  for i, name in enumerate(names):
    outputs[name][key] = scores[i * len(prompts):(i + 1) * len(prompts)].tolist()


# ------------------------------------------------------------------------------------------------
# The stage.


def training_curves(config) -> dict[str, dict[str, list]]:
  """Curves of the PPO runs' metrics.jsonl (missing files and keys are left out)."""
  curves = {}
  for name in ("ppo", "ppo_ptx"):
    workdir = config.models[name]
    path = os.path.join(workdir, METRICS_FILE) if workdir else ""
    if path and os.path.isfile(path):
      run_curves = evaluation.training_curves(read_metrics(path))
      if run_curves:
        curves[name] = run_curves
  return curves


def reward_model_summary(reward_workdir: str, task) -> dict[str, Any]:
  """A reward model's last held-out accuracy from its metrics.jsonl; with the synthetic task,
  the labeler ceiling and the agreement of two labelers beside it."""
  path = os.path.join(reward_workdir, METRICS_FILE)
  summary = evaluation.reward_model_summary(read_metrics(path)) if os.path.isfile(path) else None
  summary = dict(summary or {})
  if task is not None:
    summary.setdefault("labeler_ceiling", task.labeler_agreement_ceiling())
    summary["labeler_agreement"] = task.inter_labeler_agreement()
  summary["workdir"] = reward_workdir
  return summary


def held_out_rankings(config, reward_workdir: str) -> tuple[list[dict], str]:
  """(rankings, where from) to measure a reward model's accuracy by K on: `rankings_file`, else
  the held-out comparisons the RM collected; ([], "") when there are none."""
  path = config.rankings_file or os.path.join(reward_workdir, comparisons.COMPARISONS_DIR,
                                              "eval.jsonl")
  if not os.path.isfile(path):
    return [], ""
  rankings, _ = read_rankings(path)
  return rankings, path


def accuracy_by_k(rm: RewardModel, rankings: Sequence[dict], *, batch_size: int, layout,
                  tokenizer: Tokenizer) -> dict[str, dict[str, float]]:
  """`evaluation.pair_accuracy_by_k` of the RM's scores of every ranking's responses, each read
  by the scoring rule (an EOS only where it `ended`)."""
  prompts, responses, ended = _flat(rankings)
  scores = iter(rm.score(prompts, responses, batch_size=batch_size, layout=layout,
                         tokenizer=tokenizer, ended=ended).tolist())
  return evaluation.pair_accuracy_by_k(
      (r["ranks"], [next(scores) for _ in r["responses"]]) for r in rankings)


def _sft_log_likelihoods(sft_policy: Policy, prompts: Sequence[str], responses: Sequence[str], *,
                         max_prompt_len: int, batch_size: int, compiled: Compiled,
                         fmt: formatting.Format, ended: Sequence[bool]) -> np.ndarray:
  """log pi_SFT(response [+ EOS where it ended] | prompt) of each whole response; prompts keep
  their last `max_prompt_len` tokens and join their responses by `fmt`: the sequences the
  reward model reads."""
  eos = compiled.tokenizer.eos_id
  tokenizer = compiled.tokenizer
  completions = [generate.Completion(
      p, r, (*formatting.encode_pair(tokenizer, fmt, p, r).response_ids, *[eos] * done), done,
      0.0) for p, r, done in zip(prompts, responses, ended, strict=True)]
  longest = max(1, *(len(c.tokens) for c in completions))
  log_probs, mask = response_log_probs(sft_policy, prompts, completions,
                                       prompt_len=max_prompt_len, max_new_tokens=longest,
                                       batch_size=batch_size, compiled=compiled)
  return (log_probs * mask).sum(1)


def _flat(rankings: Sequence[dict]) -> tuple[list[str], list[str], list[bool]]:
  """(prompt, response, ended) of every response of the rankings, in order: what the reward
  model scores (written responses without `ended` are complete)."""
  return ([r["prompt"] for r in rankings for _ in r["responses"]],
          [t for r in rankings for t in r["responses"]],
          [e for r in rankings for e in r.get("ended") or [True] * len(r["responses"])])


def _graded_rankings(reward_workdir: str, split: str) -> list[dict]:
  """The synthetic comparisons of one split ("eval" or "train") that carry gold scores; [] when
  there are none (e.g. an RM trained on files). A damaged file stops with its file:line."""
  path = os.path.join(reward_workdir, comparisons.COMPARISONS_DIR, f"{split}.jsonl")
  if not os.path.isfile(path):
    return []
  rankings, _ = read_rankings(path)
  return rankings if rankings and all("gold_scores" in r for r in rankings) else []


def reward_model_breakdown(rm: RewardModel, reward_workdir: str, fallback_task, *,
                           batch_size: int, layout, tokenizer: Tokenizer,
                           sft_policy: Policy | None = None, compiled: Compiled | None = None,
                           train_rankings: int = 0) -> dict[str, dict[str, float]] | None:
  """The RM's accuracy on its held-out synthetic comparisons, by what differs between the two
  responses (`synthetic.what_differs`): does it judge the remark the rankers dislike, the answer
  itself, or neither? None when there are no held-out comparisons with gold scores (e.g. an RM
  trained on files).

  With `sft_policy`, each kind also gets `sft_likelihood_gold_accuracy`: how often the SFT
  policy's own log-likelihood of the responses orders the same pairs like the gold score — what
  the reward model's initialisation knows, next to what the RM learned to read.

  With `train_rankings` > 0, each kind also gets `train_gold_accuracy`: the RM's gold-order
  accuracy on the first `train_rankings` of its own training rankings. Low there too means the RM
  did not learn to judge that kind at all (underfitting), high there only means it memorised."""
  rankings = _graded_rankings(reward_workdir, "eval")
  if not rankings:
    return None
  rm_config = workdirs.read_config(reward_workdir)  # the world the comparisons were ranked in
  task = synthetic_task(rm_config) if rm_config is not None else fallback_task

  def by_kind(rankings, scores: np.ndarray) -> dict[str, dict[str, float]]:
    scores = iter(scores.tolist())
    pairs = []
    for r in rankings:
      mine = [next(scores) for _ in r["responses"]]
      for a, b in itertools.combinations(range(len(mine)), 2):
        pairs.append((what_differs(r["responses"][a], r["responses"][b]), mine[a], mine[b],
                      r["gold_scores"][a], r["gold_scores"][b], r["ranks"][a], r["ranks"][b]))
    return evaluation.pair_accuracy_by_kind(pairs, task.labeler_agreement_ceiling)

  def rm_scores(prompts, responses, ended):
    return rm.score(prompts, responses, batch_size=batch_size, layout=layout, tokenizer=tokenizer,
                    ended=ended)

  prompts, responses, ended = _flat(rankings)
  out = by_kind(rankings, rm_scores(prompts, responses, ended))
  if sft_policy is not None:
    likelihood = by_kind(rankings, _sft_log_likelihoods(
        sft_policy, prompts, responses, max_prompt_len=rm.max_prompt_len, batch_size=batch_size,
        compiled=compiled or Compiled(layout, tokenizer), fmt=rm.fmt, ended=ended))
    for kind, row in out.items():
      row["sft_likelihood_gold_accuracy"] = likelihood[kind]["gold_accuracy"]
  train = _graded_rankings(reward_workdir, "train")[:train_rankings]
  if train:
    on_train = by_kind(train, rm_scores(*_flat(train)))
    for kind, row in out.items():  # a kind absent from the training slice gets NaN ("–")
      row["train_gold_accuracy"] = on_train.get(kind, {}).get("gold_accuracy", float("nan"))
  return out


def _settings(config, prompts_text: str, documents_text: str, judges: dict) -> dict[str, Any]:
  s = config.sampling
  decoding = ("greedy decoding" if config.greedy else
              f"sampling at temperature {s.temperature} (top_k={s.top_k}, top_p={s.top_p})")
  decoding += f", at most {s.max_new_tokens} tokens"
  kl = ("sum over the response tokens of log pi - log pi_SFT, on one temperature-1 sample per "
        "prompt from each model" if config.kl_from_sft else "")
  out = dict(num_prompts=config.num_prompts, prompts=prompts_text, decoding=decoding,
             kl_decoding=kl, pretraining_text=documents_text, confidence=config.confidence,
             prompt_len=s.prompt_len, judges=judges, seed=config.seed)
  if on_task(config):
    out.update(split=config.split, few_shot_n_shots=config.few_shot.n_shots,
               few_shot_prompt_len=config.few_shot.prompt_len, task_seed=config.synthetic.seed)
  return out


def _skipped(config, given: dict[str, str]) -> dict[str, str]:
  """The models of the paper's comparison this evaluation leaves out, and why."""
  skipped = {name: f"no workdir given (--config.models.{name})" for name in CHECKPOINT_PATHS
             if name not in given}
  if "gpt" not in given:
    skipped["gpt_prompted"] = "no GPT workdir given (--config.models.gpt)"
  elif not on_task(config):
    skipped["gpt_prompted"] = "no few-shot examples for these prompts"
  elif config.few_shot.n_shots == 0:
    skipped["gpt_prompted"] = "config.few_shot.n_shots is 0"
  return skipped


def _judges(config) -> dict[str, str]:
  """{judge: what it is} of the judges this evaluation scores with, in `evaluation.JUDGES`
  order (the first is the headline)."""
  out = {}
  if on_task(config):
    out["gold"] = "the synthetic task's gold scorer"
  if config.judge_from:
    out["judge"] = (f"the held-out judge reward model of {config.judge_from}, trained on "
                    "comparisons the proxy reward model never saw")
  if config.reward_from:
    out["rm"] = (f"the proxy reward model of {config.reward_from}, the reward PPO optimised "
                 "(a policy that games it wins here without being better)")
  return out


def _reward_models(config, task, sft_policy, compiled: Compiled, rms: dict) -> dict[str, Any]:
  """{"reward_model": proxy summary, "judge_model": judge summary}, each with its accuracy by K
  on the held-out rankings; the proxy's also broken down by what differs (synthetic)."""
  layout, tokenizer, batch = compiled.layout, compiled.tokenizer, config.sampling.batch_size
  out = {}
  for key, field in (("reward_model", "reward_from"), ("judge_model", "judge_from")):
    workdir = config[field]
    if not workdir:
      continue
    summary = reward_model_summary(workdir, task)
    rankings, where = held_out_rankings(config, workdir)
    if rankings:
      summary["by_k"] = accuracy_by_k(rms[field], rankings, batch_size=batch, layout=layout,
                                      tokenizer=tokenizer)
      summary["by_k_rankings"] = where
    if task is not None and field == "reward_from":
      breakdown = reward_model_breakdown(rms[field], workdir, task, layout=layout,
                                         tokenizer=tokenizer, batch_size=batch,
                                         sft_policy=sft_policy, compiled=compiled,
                                         train_rankings=config.rm_train_rankings)
      if breakdown:
        summary["by_difference"] = breakdown
    out[key] = summary
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The entry for `experiments.run` (config.stage == "evaluate"): evaluates the configured
  models and writes report.json, report.md and the plots into `workdir`; returns the results."""
  check_config(config)
  layout = common.Layout.from_config(config)
  check_settings(config, layout)
  tokenizer = common.tokenizer_from_config(config)
  task = synthetic_task(config) if on_task(config) else None
  prompts, prompts_text = eval_prompts(config, task)
  documents, documents_text = pretraining_documents(config, task, workdir)
  rms = {field: load_reward(config[field], layout) for field in ("reward_from", "judge_from")
         if config[field]}
  given = {name: config.models[name] for name in CHECKPOINT_PATHS if config.models[name]}
  skipped = _skipped(config, given)
  compiled = Compiled(layout, tokenizer)
  policies: dict[str, Policy] = {}

  def policy_of(name: str) -> Policy:  # GPT-prompted reuses GPT's parameters
    if name not in policies:
      policies[name] = load_policy(name, given[name], config, layout, tokenizer)
    return policies[name]

  sft_policy = policy_of("sft") if "sft" in given else None
  outputs = {}
  for name in evaluation.MODELS:
    if name in skipped:
      continue
    policy = policy_of("gpt" if name == "gpt_prompted" else name)
    outputs[name] = evaluate_model(name, policy, sft_policy, prompts, documents, config=config,
                                   task=task, compiled=compiled)
    if name != "gpt":  # frees what no later model needs; GPT-prompted follows GPT
      for done in [k for k in policies if k != "sft"]:
        del policies[done]
    print(f"[evaluate] {evaluation.LABELS[name]}: {len(prompts)} responses, mean length "
          f"{np.mean(outputs[name]['lengths']):.1f} tokens", flush=True)

  for field, key in (("reward_from", "rm"), ("judge_from", "judge")):
    if field in rms:
      add_rm_scores(outputs, prompts, rms[field], batch_size=config.sampling.batch_size,
                    layout=layout, tokenizer=tokenizer, key=key)
  texts = {name: out.pop("texts") for name, out in outputs.items()}
  results = dict(settings=_settings(config, prompts_text, documents_text, _judges(config)),
                 models=evaluation.summarise(outputs, config.confidence), skipped=skipped,
                 examples=[dict(prompt=p, responses={name: texts[name][i] for name in texts})
                           for i, p in enumerate(prompts[:config.report_examples])])
  results.update(_reward_models(config, task, sft_policy, compiled, rms))
  if jax.process_index() == 0:
    written = report.write_report(workdir, results, training_curves(config))
    print(f"[evaluate] wrote {written['markdown']}", flush=True)
  return results
