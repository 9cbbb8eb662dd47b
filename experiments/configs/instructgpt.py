"""The whole InstructGPT method on the synthetic instruction task, the project's main command:

  python -m experiments.run --config experiments/configs/instructgpt.py --workdir /tmp/instructgpt

pretrain -> SFT -> comparison collection + reward model -> PPO (ptx_coef = 0) and PPO-ptx ->
evaluation of GPT, GPT-prompted, SFT, PPO and PPO-ptx, ending with <workdir>/report.md and
report.json. Each stage runs in <workdir>/<stage>; re-running the command skips finished stages and
resumes an interrupted one. Sized for a 2-core CPU (no files, no GPU); `:smoke` is a ~2-minute
version for tests; `:small` takes every stage's `small` variant (the GPT-2-like reference shape,
the paper's PPO settings: 256 rollouts a 500-iteration run), a size for one GPU:

  python -m experiments.run --config experiments/configs/instructgpt.py:small --workdir /tmp/small

Your own model and data, one command (`:hf` sized for GPT-2 small or a ~1B Llama on one GPU,
`:hf_tiny` for a CPU and a small checkpoint): SFT from the Hugging Face checkpoint -> reward model
and a held-out judge reward model (disjoint shares of the comparisons) -> PPO and PPO-ptx ->
evaluation on the prepared evaluation prompts -> report, no pretrain stage
(`instructjax/trainers/recipe.py` says what each field sets):

  python -m experiments.prepare_data hh_rlhf --in hh.jsonl.gz --out /tmp/prepared
  python -m experiments.run --config experiments/configs/instructgpt.py:hf --workdir /tmp/real \
      --config.init_from_hf=/models/gpt2 --config.data_dir=/tmp/prepared \
      --config.ptx_files=/data/corpus.jsonl

Every stage's config is a section: e.g. `--config.sft.steps=600`,
`--config.ppo_ptx.ppo.ptx_coef=2.0`, `--config.stages=pretrain,sft` (comma-separated, run in
pipeline order).
"""
from ml_collections import config_dict

from experiments.configs import evaluate, ppo, pretrain, reward, sft
from instructjax.trainers.pipeline import STAGE_NAMES

STAGES = ("pretrain", "sft", "reward", "ppo", "ppo_ptx", "evaluate")  # the default pipeline's
SMOKE_MODEL = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=128)


def _sections(size: str) -> dict:
  plain_ppo = ppo.get_config(size)
  with plain_ppo.unlocked():
    plain_ppo.ppo.ptx_coef = 0.0  # the paper's "PPO": no pretraining gradient
  return dict(pretrain=pretrain.get_config(size), sft=sft.get_config(size),
              reward=reward.get_config(size), ppo=plain_ppo, ppo_ptx=ppo.get_config(size),
              evaluate=evaluate.get_config(size))


def _smoke(c: config_dict.ConfigDict) -> None:
  """Minutes-long sizes for the end-to-end test: every stage runs, nothing is meant to learn."""
  for name in STAGES:
    c[name].model.update(SMOKE_MODEL)
    # All instructions: a barely trained policy answers the digit tasks all alike, and rankings
    # that tie everywhere are skipped, leaving the smoke RM nothing to train on.
    c[name].synthetic.instructions = ""
  for name in ("pretrain", "sft"):
    c[name].data.num_train, c[name].data.num_eval = 200, 32
    c[name].steps, c[name].eval_every, c[name].save_every, c[name].log_every = 6, 6, 6, 3
    c[name].batch_size = 8
  c.sft.eval_samples = 8
  c.sft.sampling.batch_size = 8
  r = c.reward
  r.data.num_train_prompts, r.data.num_eval_prompts = 24, 8
  r.normalisation_prompts = 8
  r.steps, r.eval_every, r.save_every, r.log_every = 4, 4, 4, 2
  r.batch_size = 8
  r.sampling.batch_size = 16
  for name in ("ppo", "ppo_ptx"):
    p = c[name]
    p.iterations, p.eval_every, p.save_every, p.log_every = 2, 2, 2, 1
    p.rollout_batch_size = 8
    p.eval_samples = 8
    p.sampling.batch_size = 8
    p.ptx.batch_size = 8
    p.ptx.num_train, p.ptx.num_eval, p.ptx.eval_batches = 64, 16, 1
    p.data.num_prompts = 32
  e = c.evaluate
  e.num_prompts = 8
  e.sampling.batch_size = 8
  e.ptx_eval.num_documents, e.ptx_eval.max_batches = 16, 1


def _default(c: config_dict.ConfigDict) -> None:
  """Sizes for the whole method in about 15 minutes on a 2-core CPU."""
  for name in ("ppo", "ppo_ptx"):
    c[name].iterations, c[name].eval_every, c[name].save_every = 40, 20, 20


def _real(size: str) -> dict:
  """The real recipe's sections: no pretrain (the checkpoint is pretrained), a judge beside the
  reward model, every stage on text of real length (`_real_sizes`)."""
  sections = _sections("small" if size == "hf" else "tiny")
  del sections["pretrain"]
  sections["judge"] = reward.get_config("small" if size == "hf" else "tiny")
  for section in sections.values():
    section.unlock()
  (_real_sizes if size == "hf" else _real_tiny_sizes)(sections)
  return sections


def _set_sampling(sections: dict, prompt_len: int, max_new_tokens: int, batch_size: int) -> None:
  """One sampling shape for the stages that sample, and rows that hold it."""
  for name in ("reward", "judge", "ppo", "ppo_ptx", "evaluate"):
    s = sections[name].sampling
    s.prompt_len, s.max_new_tokens, s.batch_size = prompt_len, max_new_tokens, batch_size
  for name in ("reward", "judge"):
    d = sections[name].data
    d.max_prompt_len, d.seq_len = prompt_len, prompt_len + max_new_tokens


def _real_sizes(sections: dict) -> None:
  """GPT-2 small or a ~1B Llama on one GPU (bf16 compute, parameters in float32)."""
  for section in sections.values():
    section.model.dtype = "bfloat16"
  sft_ = sections["sft"]
  sft_.data.seq_len, sft_.data.max_prompt_len = 512, 384
  sft_.steps, sft_.batch_size, sft_.eval_every, sft_.save_every = 1_000, 32, 200, 200
  sft_.optimizer.lr, sft_.optimizer.warmup_steps = 1e-5, 50  # fine-tuning a pretrained model
  _set_sampling(sections, prompt_len=384, max_new_tokens=128, batch_size=32)
  for name in ("reward", "judge"):
    r = sections[name]
    r.steps, r.batch_size, r.eval_every, r.save_every = 500, 32, 100, 100
    r.optimizer.lr = 9e-6  # InstructGPT's reward-model learning rate
  for name in ("ppo", "ppo_ptx"):
    p = sections[name]
    p.rollout_batch_size, p.iterations, p.eval_every, p.save_every = 128, 200, 50, 50
    p.ptx.seq_len, p.ptx.batch_size = 512, 32
    p.optimizer.lr = 1.41e-5  # lm-human-preferences' GPT-2 policy learning rate
  e = sections["evaluate"]
  e.num_prompts, e.ptx_eval.seq_len, e.ptx_eval.batch_size = 256, 512, 16


def _real_tiny_sizes(sections: dict) -> None:
  """A small checkpoint on a 2-core CPU, in minutes: every stage runs on real text."""
  sft_ = sections["sft"]
  sft_.data.seq_len, sft_.data.max_prompt_len = 192, 128
  sft_.steps, sft_.batch_size, sft_.eval_every, sft_.save_every, sft_.log_every = 60, 8, 30, 30, 10
  sft_.optimizer.lr, sft_.optimizer.warmup_steps = 5e-4, 10
  sft_.eval_batches = 4
  _set_sampling(sections, prompt_len=128, max_new_tokens=32, batch_size=16)
  for name in ("reward", "judge"):
    r = sections[name]
    r.steps, r.batch_size, r.eval_every, r.save_every, r.log_every = 40, 8, 20, 20, 10
    r.optimizer.lr, r.optimizer.warmup_steps = 5e-5, 5
    r.normalisation_prompts = 32
  for name in ("ppo", "ppo_ptx"):
    p = sections[name]
    p.iterations, p.eval_every, p.save_every, p.log_every = 12, 6, 6, 2
    p.rollout_batch_size, p.ppo.num_minibatches = 16, 2
    p.ptx.seq_len, p.ptx.batch_size, p.ptx.eval_batches = 128, 8, 2
  e = sections["evaluate"]
  e.num_prompts, e.report_examples = 64, 3
  e.ptx_eval.seq_len, e.ptx_eval.batch_size, e.ptx_eval.max_batches = 128, 8, 4


def _recipe_fields(c: config_dict.ConfigDict) -> None:
  """The real recipe's own fields (`instructjax/trainers/recipe.py`)."""
  c.init_from_hf = ""     # a Hugging Face checkpoint directory (weights + tokenizer files)
  c.data_dir = ""         # what `python -m experiments.prepare_data ... --out DIR` wrote
  c.ptx_files = ""        # pretraining text for PPO-ptx and the alignment tax (.txt / JSONL)
  c.judge_share = 0.5     # share of the RM set's prompts the held-out judge trains on
  c.tokenizer_kind = ""   # empty: told by the checkpoint's files (gpt2 | hf_json | sentencepiece)


VARIANTS = ("", "smoke", "small", "hf", "hf_tiny")


def get_config(arg: str = ""):
  if arg not in VARIANTS:
    raise ValueError(f"instructgpt.py:{arg}: no such variant; one of {VARIANTS}")
  c = config_dict.ConfigDict()
  c.stage = "pipeline"
  c.distributed = False
  if arg in ("hf", "hf_tiny"):
    sections = _real(arg)
    _recipe_fields(c)
  else:
    sections = _sections("small" if arg == "small" else "tiny")
  c.stages = ",".join(name for name in STAGE_NAMES if name in sections)
  for name, section in sections.items():
    c[name] = section
  with c.unlocked():
    if arg == "smoke":
      _smoke(c)
    elif not arg:
      _default(c)
  c.lock()
  return c
