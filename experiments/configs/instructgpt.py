"""The whole InstructGPT method on the synthetic instruction task, the project's main command:

  python -m experiments.run --config experiments/configs/instructgpt.py --workdir /tmp/instructgpt

pretrain -> SFT -> comparison collection + reward model -> PPO (ptx_coef = 0) and PPO-ptx ->
evaluation of GPT, GPT-prompted, SFT, PPO and PPO-ptx, ending with <workdir>/report.md and
report.json. Each stage runs in <workdir>/<stage>; re-running the command skips finished stages and
resumes an interrupted one. Sized for a 2-core CPU (no files, no GPU); `:smoke` is a ~2-minute
version for tests; `:small` takes every stage's `small` variant (the GPT-2-like reference shape,
the paper's PPO settings: 256 rollouts a 500-iteration run), a size for one GPU:

  python -m experiments.run --config experiments/configs/instructgpt.py:small --workdir /tmp/small
 Every stage's config is a section: e.g. `--config.sft.steps=600`,
`--config.ppo_ptx.ppo.ptx_coef=2.0`, `--config.stages=pretrain,sft` (comma-separated, run in
pipeline order).
"""
from ml_collections import config_dict

from experiments.configs import evaluate, ppo, pretrain, reward, sft
from instructjax.trainers.pipeline import STAGE_NAMES as STAGES
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


VARIANTS = ("", "smoke", "small")


def get_config(arg: str = ""):
  if arg not in VARIANTS:
    raise ValueError(f"instructgpt.py:{arg}: no such variant; one of {VARIANTS}")
  c = config_dict.ConfigDict()
  c.stage = "pipeline"
  c.distributed = False
  c.stages = ",".join(STAGES)
  for name, section in _sections("small" if arg == "small" else "tiny").items():
    c[name] = section
  with c.unlocked():
    if arg == "smoke":
      _smoke(c)
    elif not arg:
      _default(c)
  c.lock()
  return c
