"""Sample completions from a trained checkpoint and print them (with gold scores on the synthetic
task). The model and tokenizer come from the checkpoint's own workdir (its config.json):

  python -m experiments.run --config experiments/configs/sample.py --workdir /tmp/samples \
      --config.checkpoint=/tmp/sft

`checkpoint` is a stage workdir (pretrain, SFT or PPO; a PPO run samples its policy). Prompts are
held-out synthetic prompts by default, or `--config.prompts_file=prompts.jsonl` (JSON Lines with a
"prompt" field, or a text file with one prompt per line). Results go to <workdir>/samples.jsonl.
"""
from ml_collections import config_dict

from experiments.configs import base


def get_config(arg: str = ""):
  c = config_dict.ConfigDict()
  c.stage = "sample"
  c.seed = 0
  c.distributed = False
  c.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = base.base_config("sample").sharding_rules
  c.checkpoint = ""            # a stage workdir (or its checkpoints/ directory)
  c.step = config_dict.placeholder(int)  # default: the latest checkpoint
  c.prompts_file = ""          # default: the synthetic task's held-out prompts
  c.split = "eval"             # synthetic split to take prompts from
  c.style = ""                 # synthetic prompt style: plain | few-shot | user ("" = mixed)
  c.num_prompts = 8
  c.sampling = base.sampling_config(prompt_len=64)
  c.sampling.batch_size = 8
  c.greedy = False
  c.lock()
  return c
