"""Reward model (InstructGPT step 2): a scalar head on the SFT model, trained on K-way rankings.

Run after SFT:

  python -m experiments.run --config experiments/configs/reward.py:tiny --workdir /tmp/rm \
      --config.init_from=/tmp/sft

With the default synthetic data the stage first collects comparisons: the SFT policy samples
K = data.min_k..data.max_k responses per prompt of the task's "rm" split (and of the held-out
"eval" split), the simulated labeler ranks them, and the rankings are written to
`/tmp/rm/comparisons/` (once; a re-run reuses them). After the last step it fits the reward
normalisation on SFT samples of `normalisation_prompts` PPO prompts and writes
`/tmp/rm/reward_normalisation.json`.

The `model` section must equal the SFT run's (same variant, same overrides): the reward model's
backbone is the SFT model's, copied bit for bit, and a different shape is refused.

Variants: `tiny` (CPU, a few minutes) and `small`. Your own rankings (JSONL of {"prompt",
"responses": [K], "ranks": [K]}, rank 0 = best, ties allowed):
`--config.data.source=files --config.data.train_files=rankings.jsonl [--config.data.eval_files=...]`.
The pairwise ablation: `--config.data.mode=pairwise` (or `python -m experiments.sweep --config
experiments/configs/reward.py:tiny --workdir DIR --local -- --config.init_from=/tmp/sft`).
"""
from ml_collections import config_dict

from experiments.configs import base


def data_config(seq_len: int = 96, max_prompt_len: int = 64) -> config_dict.ConfigDict:
  d = config_dict.ConfigDict()
  d.source = "synthetic"      # synthetic (collected from the SFT policy) | files
  d.train_files = ""          # comma-separated ranking JSONL(.gz) files for source=files
  d.eval_files = ""           # empty: hold out every 20th training ranking
  d.on_bad = "error"          # error (names file:line) | skip (counted and logged)
  d.mode = "kway"             # kway: a prompt's K responses in one element | pairwise (ablation)
  d.min_k = 4                 # responses sampled per prompt, uniform in [min_k, max_k]
  d.max_k = 6                 # also the model input's K; longer rankings in files are an error
  d.seq_len = seq_len         # prompt + response + eos per row
  d.max_prompt_len = max_prompt_len
  # The share of the training rankings this model trains on, by where a hash of the prompt falls
  # in [0, 1) (`reward.in_share`): a held-out judge RM trains on [0.5, 1) while the proxy RM
  # PPO optimises trains on [0, 0.5), so no comparison of one is the other's.
  d.prompt_share = (0.0, 1.0)
  d.num_train_prompts = 2_000  # synthetic: "rm" split prompts to collect rankings for
  d.num_eval_prompts = 256     # synthetic: held-out "eval" split prompts
  return d


def get_config(arg: str = "tiny"):
  size = arg or "tiny"
  c = base.base_config("reward")
  c.model = base.model_config(size)  # must equal the SFT model's
  c.data = data_config()
  c.synthetic = base.synthetic_config()
  # How comparisons (and the normalisation's reference samples) are drawn from the SFT policy.
  c.sampling = base.sampling_config(prompt_len=64)
  c.sampling.batch_size = 128
  c.sampling.temperature = 1.0
  c.normalise = True           # fit gain/bias so SFT samples of PPO prompts get mean 0, std 1
  c.normalisation_prompts = 256
  # JSONL of {"prompt"} the normalisation samples (e.g. the PPO prompts, prepare_data's
  # ppo/prompts.jsonl); empty: the synthetic task's "ppo" split, or the training rankings' prompts.
  c.normalisation_files = ""
  # Tiny, measured on 2 CPU cores (docs/pipeline.md, "Tiny settings"): at lr 3e-4 the loss stays
  # near ln 2 for the whole epoch; 1e-3 moves it (2e-3 is unstable), and a second epoch at 1e-3 only
  # overfits (train loss 0.64, held-out accuracy down), as InstructGPT found. Four times the prompts
  # (8 000, 500 steps) gave the same held-out accuracy (0.60 labeler / 0.75 gold order): what is
  # left is judging the answers, which the SFT policy's own likelihood does (0.74 of answer pairs in
  # gold order) but a scalar read at the last token does not learn here.
  c.optimizer = base.optimizer_config(lr=1e-3 if size == "tiny" else 3e-4, warmup_steps=10)
  c.optimizer.weight_decay = 0.0
  c.steps = 125 if size == "tiny" else 1_000  # tiny: one epoch of 2 000 prompts at batch 16
  if size == "tiny":
    c.data.seq_len = 88         # the longest prompt (64) + a 24-token sample (with EOS), as SFT
  c.batch_size = 16 if size == "tiny" else 32
  c.log_every = 10
  c.eval_every = 50 if size == "tiny" else 250
  c.eval_batches = 0           # the whole held-out set
  c.save_every = 50 if size == "tiny" else 250
  if size != "tiny":
    c.data.num_train_prompts = 16_000
    c.data.num_eval_prompts = 1_024
    c.data.max_k = 9
    # PPO's small sampling (128 + 48): the RM is trained and normalised on what PPO draws.
    c.data.seq_len, c.data.max_prompt_len = 176, 128
    c.sampling.prompt_len, c.sampling.max_new_tokens = 128, 48
    c.optimizer.lr = 1e-4
  c.lock()
  return c


def sweep(arg: str = "tiny") -> list[dict]:
  """InstructGPT's ablation: all C(K, 2) pairs of a prompt in one element vs. shuffled pairs.

  Both runs see the same comparisons for the same number of epochs: a K-way element holds
  about 10 pairs at K = 4..6, so the pairwise run uses a 10x larger batch of pairs. Run with
  `python -m experiments.sweep --config experiments/configs/reward.py:tiny --workdir DIR --local
  -- --config.init_from=/tmp/sft` (both runs collect the same comparisons from the same seed).
  """
  batch = get_config(arg).batch_size
  return [{"name": "kway", "overrides": {"data.mode": "kway"}},
          {"name": "pairwise", "overrides": {"data.mode": "pairwise", "batch_size": 10 * batch}}]
