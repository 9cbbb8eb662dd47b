"""Fields every stage's config shares: mesh, sharding rules, tokenizer, model, optimizer, logging.

Stage configs start from `base_config()` and change what they need; every config is locked before
it is returned, so a typo in `--config.field=value` is an error.
"""
import dataclasses

from ml_collections import config_dict

from instructjax import parallel
from instructjax.data.formatting import Format
from instructjax.data.synthetic import TaskConfig
from instructjax.models.config import ModelConfig
from instructjax.sampling import SamplingConfig

placeholder = config_dict.placeholder

def section_from_dataclass(cls, **config_defaults) -> config_dict.ConfigDict:
  """A config section holding every field of dataclass `cls` at its default, so the dataclass is
  the one source of its defaults (and its comments say what each field does). A field that may
  be None becomes a typed placeholder, so an override can set a value or None.
  `config_defaults` are the few fields whose config default differs from the dataclass's, each
  named with its reason where it is passed."""
  section = config_dict.ConfigDict()
  for field in dataclasses.fields(cls):
    default = config_defaults.pop(field.name, field.default)
    annotation = str(field.type)
    if "None" in annotation or default is None:
      kind = next((t for t in (bool, int, float, str) if t.__name__ in annotation), float)
      section[field.name] = placeholder(kind)
      if default is not None:
        section[field.name] = default
    else:
      section[field.name] = default
  if config_defaults:
    raise ValueError(f"{cls.__name__} has no fields {sorted(config_defaults)}")
  return section


# Sizes of the model for each variant: "tiny" runs on a laptop CPU in minutes; "small" is the
# GPT-2-like reference shape the benchmarks use. The tiny model uses rotary positions: with
# learned absolute ones it learns the task measurably slower in the same CPU budget (SFT
# gold 0.39 vs 0.42, pretraining eval loss 0.97 vs 0.88 at equal steps).
MODEL_SIZES = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_len=128, position="rope"),
    "small": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_len=256),
}


def model_config(size: str = "tiny", flavour: str = "gpt2") -> config_dict.ConfigDict:
  """The decoder section: every `ModelConfig` field (the dataclass holds the defaults), the
  variant's sizes, and `init_from_hf`, a local Hugging Face checkpoint dir whose architecture
  and weights the model takes."""
  m = section_from_dataclass(
      ModelConfig, flavour=flavour,
      # None: the tokenizer's vocabulary, padded to a multiple of 128 (`common.model_config`).
      vocab_size=None, real_vocab_size=None,
      # "dots" keeps only matmul outputs for the backward pass and recomputes the elementwise
      # ops (norms, GELU, softmax) there: less memory traffic, so faster on CPU too (benchmark
      # at the reference shape: SFT step -7 to -11 %, tiny SFT +20 % steps/s); results differ
      # only by floating-point rounding.
      remat="dots")
  m.init_from_hf = ""
  m.update(MODEL_SIZES[size])
  return m


def optimizer_config(lr: float = 1e-3, warmup_steps: int = 20) -> config_dict.ConfigDict:
  o = config_dict.ConfigDict()
  o.lr = lr
  o.warmup_steps = warmup_steps
  o.decay = "cosine"          # cosine | linear | constant
  o.end_fraction = 0.1        # final lr = end_fraction * lr
  o.weight_decay = 0.0
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8                # used as given by either adam_style
  # torch: optax.adamw (eps added to the bias-corrected sqrt(v)); tf: TF1's AdamOptimizer as in
  # lm-human-preferences (eps added to sqrt(v) before bias correction; they used eps=1e-5,
  # b2=0.999: set those too, e.g. --config.optimizer.eps=1e-5). See sft.ADAM_STYLES.
  o.adam_style = "torch"
  o.clip_norm = 1.0           # global-norm clipping; <= 0 turns it off
  return o


def base_config(stage: str) -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.distributed = False       # or INSTRUCTJAX_DISTRIBUTED=1: jax.distributed.initialize()
  c.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = [list(rule) for rule in parallel.DEFAULT_RULES]
  # special_tokens_in_text: records rendered by a chat template (prepare_data --chat_template)
  # spell the template's tokens (<|im_start|>) as text; True reads them as those tokens.
  c.tokenizer = config_dict.ConfigDict(dict(kind="byte", path="", special_tokens_in_text=False))
  # How a prompt and a response join into one text before tokenising (`formatting.Format`):
  # `--config.format.separator=' '` for HH-RLHF / TL;DR prompts (prepare_data's format.json).
  c.format = section_from_dataclass(Format)
  c.model = model_config()
  c.optimizer = optimizer_config()
  c.init_from = ""            # a checkpoint directory of the previous stage
  c.steps = 200
  c.batch_size = 16           # global, across all processes
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 8          # 0 = the whole held-out split
  c.save_every = 100
  c.keep_checkpoints = 2
  c.async_checkpoints = False
  return c


def data_config(fmt: str, seq_len: int, max_prompt_len: int = 0) -> config_dict.ConfigDict:
  """Where the records come from: the synthetic task (no files) or local files."""
  d = config_dict.ConfigDict()
  d.source = "synthetic"      # synthetic | files
  d.format = fmt              # demonstrations | text
  d.train_files = ""          # comma-separated paths (JSONL, .txt, .gz) for source=files
  d.eval_files = ""           # empty: hold out every 20th training record
  d.seq_len = seq_len
  d.max_prompt_len = max_prompt_len
  d.too_long = "truncate"     # truncate | error | skip (counted and logged)
  d.num_train = 20_000        # synthetic records to generate
  d.num_eval = 512
  return d


def synthetic_config() -> config_dict.ConfigDict:
  """The synthetic task's knobs: every `instructjax.data.synthetic.TaskConfig` field (the
  dataclass holds the defaults and says what each does); every stage must agree.
  `max_prompt_chars` must fit data.max_prompt_len and sampling.prompt_len (1 char = 1 token)."""
  return section_from_dataclass(
      TaskConfig,
      # Comma-separated subset of the task's instructions ("" = all nine). The default keeps the
      # digit-list ones, still easy (first, last), medium (count, max, min) and hard (sort): a
      # 2-layer byte model does not learn the character-copying ones (upper, reverse, repeat:
      # greedy gold 0.1-0.25 after 1 000 SFT steps) within a CPU budget, and prompts whose K
      # samples are all wrong give the reward model comparisons that are nearly pure labeler noise.
      instructions="first,last,count,max,min,sort",
      list_len=(2, 4),
      # Most demonstrations end with a remark the rankers dislike ("hope it helps."): the paper's
      # premise that comparisons carry preferences the demonstrations lack. At 0 the only thing
      # RLHF can improve is the task skill itself, which a CPU-sized PPO run barely moves
      # (docs/results.md). Above 0.5, SFT's greedy answer carries the remark.
      remark_rate=0.6)


def sampling_config(prompt_len: int, max_new_tokens: int = 24) -> config_dict.ConfigDict:
  """How evaluation and data collection sample: every `SamplingConfig` field (the dataclass
  holds the defaults), and how prompts are batched and left-padded/cut to prompt_len."""
  s = section_from_dataclass(SamplingConfig, max_new_tokens=max_new_tokens)
  del s["greedy"]  # chosen per use (the evaluation's greedy pass), not per config
  s.prompt_len = prompt_len
  s.batch_size = 64
  return s
