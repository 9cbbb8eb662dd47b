"""PPO-ptx (InstructGPT step 3): the SFT policy optimised against the reward model.

Run after SFT and the reward model:

  python -m experiments.run --config experiments/configs/ppo.py:tiny --workdir /tmp/ppo \
      --config.init_from=/tmp/sft --config.reward_from=/tmp/rm

The policy and the frozen reference start from the SFT checkpoint (`init_from`), the value model
from the reward model (`reward_from`, or a zero head on the SFT backbone with
`--config.ppo.value_init=zero`), and the reward is the RM's normalised score. The `model` section
must equal the SFT run's. Plain PPO (no pretraining gradient): `--config.ppo.ptx_coef=0`.

Every PPOConfig field lives in the `ppo` section; `small` keeps the paper's values
(InstructGPT / lm-human-preferences), `tiny` is tuned for the tiny CPU models (see the comments).
Prompts: the synthetic task's "ppo" split, or your JSONL of {"prompt": ...} with
`--config.data.source=files --config.data.files=prompts.jsonl`. Pretraining text for ptx and for
the held-out pretraining loss: the synthetic corpus, or `--config.ptx.source=files
--config.ptx.files=a.txt,b.jsonl`.

Ablations (`sweep` below): `python -m experiments.sweep --config experiments/configs/ppo.py:tiny
--workdir /tmp/ppo_sweep --local -- --config.init_from=/tmp/sft --config.reward_from=/tmp/rm`.
"""
from ml_collections import config_dict

from experiments.configs import base
from instructjax.objectives.ppo import PPOConfig

placeholder = config_dict.placeholder


def ppo_section() -> config_dict.ConfigDict:
  """Every field of `objectives.ppo.PPOConfig` at its default (the dataclass is the one source
  of the defaults, InstructGPT's and lm-human-preferences', and says what each field does), plus
  the trainer's `value_init` and `value_head_fit`. `temperature` is also the sampling
  temperature (linked below)."""
  p = base.section_from_dataclass(PPOConfig)
  p.value_init = "reward"       # trainer only: reward (RM's head + backbone) | zero (SFT backbone)
  # trainer only: none | first_rollout (before the first update, refit the value head's scale and
  # bias by least squares so the first rollout's values match its returns; docs/ppo.md, "What the
  # first values predict")
  p.value_head_fit = "none"
  return p


def data_section() -> config_dict.ConfigDict:
  d = config_dict.ConfigDict()
  d.source = "synthetic"        # synthetic (the task's "ppo" split) | files
  d.files = ""                  # comma-separated JSONL(.gz) of {"prompt": ...} for source=files
  d.num_prompts = 4_000         # synthetic prompts; the stream repeats, reshuffled every epoch
  return d


def ptx_section(seq_len: int, batch_size: int) -> config_dict.ConfigDict:
  """Pretraining text: the ptx gradient's stream and the held-out pretraining loss."""
  x = config_dict.ConfigDict()
  x.source = "synthetic"        # synthetic corpus | files | none (needs ptx_coef=0; no eval)
  x.files = ""                  # comma-separated .txt/.jsonl(.gz) for source=files
  x.eval_files = ""             # empty: hold out every 20th training record
  x.seq_len = seq_len           # packed rows
  x.batch_size = batch_size     # rows per PPO minibatch (global)
  x.num_train = 4_000           # synthetic documents
  x.num_eval = 256
  x.eval_batches = 8            # held-out batches of sampling.batch_size rows; 0 = all
  return x


def get_config(arg: str = "tiny"):
  size = arg or "tiny"
  c = base.base_config("ppo")
  c.model = base.model_config(size)  # must equal the SFT model's
  c.reward_from = ""                 # the reward model's workdir
  # model: the RM of reward_from | gold: the synthetic task's gold scorer as an oracle reward
  # (normalised on the first rollout), to separate a reward model's errors from PPO's own.
  c.reward_source = "model"
  c.frozen_dtype = "float32"         # float32 | bfloat16: storage of the reference and the RM
  c.data = data_section()
  c.synthetic = base.synthetic_config()
  c.sampling = base.sampling_config(prompt_len=64, max_new_tokens=24)
  c.ppo = ppo_section()
  c.sampling.temperature = c.ppo.get_ref("temperature")
  c.ptx = ptx_section(seq_len=64, batch_size=16)
  c.eval_samples = 128               # held-out "eval" prompts for the greedy gold score
  c.eval_at_start = True             # evaluate the SFT policy at step 0, for before/after
  c.iterations = 200                 # rollout -> score -> advantages -> update
  # The shared tooling (sweep, progress) counts `steps`; here a step is one PPO iteration.
  c.steps = c.get_ref("iterations")
  c.rollout_batch_size = 64          # episodes per iteration (global)
  del c["batch_size"]
  c.optimizer = base.optimizer_config(lr=1e-5, warmup_steps=10)
  c.optimizer.decay = "constant"     # InstructGPT: constant after a short warmup
  c.optimizer.b2 = 0.999
  c.value_lr = placeholder(float)    # None: the policy's lr
  c.log_every = 5
  c.eval_every = 50
  c.save_every = 50
  del c["eval_batches"]              # see ptx.eval_batches
  if size == "tiny":
    # Tuned on the tiny CPU models (docs/ppo.md, "Flags"). Responses are ~6 tokens and a CPU run
    # sees a few thousand episodes, so beta starts higher than the paper's and the adaptive
    # controller gets a short horizon (it may move beta by 0.2 * 64 / 500 = 2.6% an iteration): from
    # beta 0.05 with a 2 000-episode horizon, KL ran to 12 nats in 20 iterations. The ptx term is a
    # token-mean NLL next to a whitened, token-mean PPO loss, so the paper's 27.8 would swamp the RL
    # gradient at this scale.
    c.ppo.kl_coef = 0.2
    c.ppo.adaptive_kl = True
    c.ppo.kl_target = 3.0
    c.ppo.kl_horizon = 500.0
    c.ppo.num_minibatches = 2
    c.ppo.ptx_coef = 0.1
    c.optimizer.lr = 1e-4
    c.value_lr = 3e-4
    c.iterations = 100
    c.eval_every = 25
    c.save_every = 25
    c.eval_samples = 128
    c.data.num_prompts = 2_000
    c.ptx.num_train = 2_000
  else:
    c.model.max_len = 256
    c.sampling.prompt_len, c.sampling.max_new_tokens = 128, 48
    c.ptx.seq_len = 128
    c.rollout_batch_size = 256
    c.ppo.num_minibatches = 4
    c.ptx.batch_size = 64
    c.iterations = 500
  c.lock()
  return c


def sweep(arg: str = "tiny") -> list[dict]:
  """The main PPO ablations, each one change from the variant's defaults.

  baseline (PPO-ptx as configured), no_ptx (plain PPO, the paper's "PPO" model), fixed vs
  adaptive KL (whichever the variant does not use), no_whitening (rewards and advantages),
  value_zero (value head zero on the SFT backbone instead of the reward model), value_fit (the
  value head's scale and bias refitted to the first rollout's returns), and tf_adam
  (lm-human-preferences' TF1 Adam: eps 1e-5 added to sqrt(v) before bias correction, for policy
  and value; b2 is already TF's 0.999 here, clipping and the schedule stay as configured).
  """
  config = get_config(arg)
  adaptive = config.ppo.adaptive_kl
  return [
      {"name": "baseline", "overrides": {"ppo.ptx_coef": config.ppo.ptx_coef}},
      {"name": "no_ptx", "overrides": {"ppo.ptx_coef": 0.0}},
      {"name": "fixed_kl" if adaptive else "adaptive_kl",
       "overrides": {"ppo.adaptive_kl": not adaptive}},
      {"name": "no_whitening",
       "overrides": {"ppo.whiten_rewards": False, "ppo.whiten_advantages": False}},
      {"name": "value_zero", "overrides": {"ppo.value_init": "zero"}},
      {"name": "value_fit", "overrides": {"ppo.value_head_fit": "first_rollout"}},
      {"name": "tf_adam", "overrides": {"optimizer.adam_style": "tf", "optimizer.eps": 1e-5}},
  ]
