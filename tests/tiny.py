"""Tiny configs for trainer tests: the stage configs' `tiny` variant, shrunk further."""
from experiments.configs import pretrain, reward, sft

TINY_MODEL = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64)
# Every instruction: a barely trained test policy answers digit tasks all alike (all-tied
# rankings are skipped), while the word tasks still give it rankable comparisons.
ALL_INSTRUCTIONS = ""


def override(config, overrides):
  """Sets {"a.b.c": value} fields of an unlocked config."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value


def lm_config(stage: str = "sft", **overrides):
  """A locked config of the pretrain/SFT stage that trains in seconds on CPU."""
  config = (sft if stage == "sft" else pretrain).get_config("tiny")
  with config.unlocked():
    config.model.update(TINY_MODEL)
    config.synthetic.instructions = ALL_INSTRUCTIONS
    config.data.seq_len = 48
    if stage == "sft":
      config.data.max_prompt_len = 40
      config.sampling.prompt_len = 40
      config.sampling.max_new_tokens = 8
      config.sampling.batch_size = 8
      config.eval_samples = 8
    config.data.num_train = 200
    config.data.num_eval = 32
    config.batch_size = 8
    config.steps = 6
    config.log_every = 2
    config.eval_every = 3
    config.eval_batches = 2
    config.save_every = 3
    config.optimizer.warmup_steps = 2
    override(config, overrides)
  return config


def reward_config(**overrides):
  """A locked reward-model config matching `lm_config("sft")`'s model, trained in seconds."""
  config = reward.get_config("tiny")
  with config.unlocked():
    config.model.update(TINY_MODEL)
    config.synthetic.instructions = ALL_INSTRUCTIONS
    config.data.seq_len = 48
    config.data.max_prompt_len = 40
    config.data.min_k, config.data.max_k = 2, 4
    config.data.num_train_prompts = 24
    config.data.num_eval_prompts = 8
    config.sampling.prompt_len = 40
    config.sampling.max_new_tokens = 8
    config.sampling.batch_size = 16
    config.normalisation_prompts = 8
    config.batch_size = 8
    config.steps = 4
    config.log_every = 2
    config.eval_every = 2
    config.eval_batches = 0
    config.save_every = 2
    config.optimizer.warmup_steps = 1
    override(config, overrides)
  return config


def ppo_config(**overrides):
  """A locked PPO config matching `lm_config("sft")`'s model: a few iterations in seconds."""
  from experiments.configs import ppo
  config = ppo.get_config("tiny")
  with config.unlocked():
    config.model.update(TINY_MODEL)
    config.synthetic.instructions = ALL_INSTRUCTIONS
    config.sampling.prompt_len = 40
    config.sampling.max_new_tokens = 8
    config.sampling.batch_size = 8
    config.eval_samples = 8
    config.data.num_prompts = 24
    config.ptx.seq_len = 32
    config.ptx.batch_size = 8
    config.ptx.num_train = 40
    config.ptx.num_eval = 8
    config.ptx.eval_batches = 1
    config.rollout_batch_size = 16
    config.ppo.ppo_epochs = 2
    config.ppo.num_minibatches = 2
    config.iterations = 3
    config.log_every = 1
    config.eval_every = 2
    config.save_every = 2
    config.eval_at_start = False
    config.optimizer.warmup_steps = 1
    override(config, overrides)
  return config


def write_gpt2_files(directory, merges):
  """A tiny vocab.json + merges.txt in GPT-2's format: the 256 byte tokens, one token per merge
  (in order, repeats once), then <|endoftext|>. Returns the directory."""
  import json
  import pathlib
  from instructjax.data.tokenizers import bytes_to_unicode
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  vocab = {char: byte for byte, char in bytes_to_unicode().items()}
  merges = list(dict.fromkeys(merges))
  for merge in merges:
    vocab.setdefault(merge.replace(" ", ""), len(vocab))
  vocab["<|endoftext|>"] = len(vocab)
  (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                        encoding="utf-8")
  return directory
