"""The real recipe's one place where a Hugging Face checkpoint and a prepared data directory
become every stage's settings (`experiments/configs/instructgpt.py:hf`).

The recipe's config has the pipeline's stage sections and four fields of its own:

  init_from_hf    the checkpoint directory (config.json + *.safetensors + tokenizer files): SFT
                  starts from its weights and every later stage inherits its architecture
                  (`common.model_config`); it is the evaluation's GPT; its tokenizer files are
                  every stage's tokenizer (`tokenizers.kind_in`, or `tokenizer_kind`);
  data_dir        what `experiments.prepare_data` wrote: SFT's demonstrations, the reward
                  models' rankings (the judge's on a disjoint share of the prompts), PPO's
                  prompts (also what the reward normalisation samples), the evaluation's
                  prompts and held-out rankings, and format.json's separator for every stage;
  ptx_files       the pretraining text PPO-ptx mixes in and whose held-out part measures the
                  alignment tax (empty: no ptx stage can run; the evaluation reports no tax);
  judge_share     the share of the RM set's prompts the held-out judge trains on (the proxy RM
                  trains on the rest).

`resolve` fills a stage's data path only where the section leaves it empty, so a
`--config.<stage>.data.train_files=...` override wins; everything else it sets is derived.
"""
from __future__ import annotations

import json
import os

import ml_collections

from instructjax.errors import InputError
from instructjax.models import hf

FIELDS = ("init_from_hf", "data_dir", "ptx_files", "judge_share", "tokenizer_kind")


def is_recipe(config: ml_collections.ConfigDict) -> bool:
  return "data_dir" in config


def _read(data_dir: str, name: str) -> dict:
  path = os.path.join(data_dir, name)
  if not os.path.isfile(path):
    raise InputError("config.data_dir", f"{data_dir} has no {name}: not a directory "
                     "`python -m experiments.prepare_data ... --out DIR` wrote")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _fill(section, field: str, value) -> None:
  """Sets a dotted field, a path only where the section leaves it empty."""
  *parents, leaf = field.split(".")
  for parent in parents:
    section = section[parent]
  if isinstance(value, str) and section[leaf] not in ("", None):
    return
  section[leaf] = value


def check(config: ml_collections.ConfigDict) -> None:
  """The recipe's own fields name what it needs, before anything is read or trained."""
  if not config.init_from_hf:
    raise InputError("config.init_from_hf", "the real recipe starts from a Hugging Face "
                     "checkpoint directory: --config.init_from_hf=DIR")
  hf.read_hf_config(config.init_from_hf)  # a clear error for a directory that is not one
  if not config.data_dir:
    raise InputError("config.data_dir", "the real recipe reads a prepared data directory: "
                     "--config.data_dir=DIR (`python -m experiments.prepare_data ... --out DIR`)")
  if not 0.0 < config.judge_share < 1.0:
    raise InputError("config.judge_share", f"must be in (0, 1), got {config.judge_share}")
  if "ppo_ptx" in [name.strip() for name in config.stages.split(",")] and not config.ptx_files:
    if config.ppo_ptx.ppo.ptx_coef > 0:
      raise InputError("config.ptx_files", "PPO-ptx mixes in pretraining text: name it "
                       "(--config.ptx_files=corpus.jsonl or .txt), or leave ppo_ptx out of "
                       "--config.stages")


def resolve(config: ml_collections.ConfigDict) -> None:
  """Sets every stage section from the recipe's fields (in place; see the module docstring)."""
  check(config)
  ckpt, data = config.init_from_hf, config.data_dir
  summary, fmt = _read(data, "summary.json"), _read(data, "format.json")
  counts = summary["files"]

  def path(name: str) -> str:
    return os.path.join(data, name) if counts.get(name) else ""

  special = bool(summary.get("chat_template", {}).get("special_tokens_in_text"))
  tokenizer = (dict(kind=config.tokenizer_kind, path=ckpt) if config.tokenizer_kind
               else hf.tokenizer_section(ckpt))
  if tokenizer is None:
    raise InputError("config.init_from_hf", f"{ckpt} holds no tokenizer files (vocab.json + "
                     "merges.txt, tokenizer.model or tokenizer.json); set --config.tokenizer_kind "
                     "and put them there")
  tokenizer = dict(tokenizer, special_tokens_in_text=special)
  share = 1.0 - config.judge_share
  with config.unlocked():
    for name in ("pretrain", "sft", "reward", "judge", "ppo", "ppo_ptx", "evaluate"):
      if name not in config:
        continue
      section = config[name]
      section.tokenizer.update(tokenizer)
      section.format.separator = fmt["separator"]
    if "sft" in config:
      _fill(config.sft, "model.init_from_hf", ckpt)
      config.sft.data.source = "files"
      _fill(config.sft, "data.train_files", path("sft/train.jsonl"))
      _fill(config.sft, "data.eval_files", path("sft/eval.jsonl"))
    for name, part in (("reward", (0.0, share)), ("judge", (share, 1.0))):
      if name not in config:
        continue
      r = config[name]
      r.data.source = "files"
      _fill(r, "data.train_files", path("rm/train.jsonl"))
      _fill(r, "data.eval_files", path("rm/eval.jsonl"))
      r.data.min_k, r.data.max_k = 2, max(2, summary["rm_max_k"])
      if "judge" in config:
        r.data.prompt_share = part
      _fill(r, "normalisation_files", path("ppo/prompts.jsonl"))
    for name in ("ppo", "ppo_ptx"):
      if name not in config:
        continue
      p = config[name]
      p.data.source = "files"
      _fill(p, "data.files", path("ppo/prompts.jsonl"))
      if config.ptx_files:
        p.ptx.source = "files"
        _fill(p, "ptx.files", config.ptx_files)
      else:
        p.ptx.source = "none"
    if "evaluate" in config:
      e = config.evaluate
      _fill(e, "prompts_file", path("eval/prompts.jsonl"))
      _fill(e, "rankings_file", path("eval/rankings.jsonl"))
      if "pretrain" not in config:
        _fill(e, "models.gpt", ckpt)
      if config.ptx_files:
        e.ptx_eval.source = "heldout"
        _fill(e, "ptx_eval.files", config.ptx_files)
      else:
        e.ptx_eval.source = "none"
