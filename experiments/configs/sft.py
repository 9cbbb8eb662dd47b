"""Supervised fine-tuning (InstructGPT step 1): loss on demonstration tokens only.

Run after pretraining (or from scratch with an empty `init_from`):

  python -m experiments.run --config experiments/configs/pretrain.py:tiny --workdir /tmp/pretrain
  python -m experiments.run --config experiments/configs/sft.py:tiny --workdir /tmp/sft \
      --config.init_from=/tmp/pretrain/checkpoints

Variants: `tiny` (CPU, a few minutes) and `small`. Your own demonstrations (JSONL of
{"prompt", "completion"}): `--config.data.source=files --config.data.train_files=demos.jsonl`.
"""
from experiments.configs import base


def get_config(arg: str = "tiny"):
  size = arg or "tiny"
  c = base.base_config("sft")
  c.model = base.model_config(size)
  c.data = base.data_config("demonstrations", seq_len=96, max_prompt_len=64)
  c.data.num_train = 8_000
  c.data.num_eval = 256
  c.synthetic = base.synthetic_config()
  c.optimizer = base.optimizer_config(lr=1e-3, warmup_steps=20)
  c.steps = 300 if size == "tiny" else 2_000
  c.batch_size = 16 if size == "tiny" else 32
  c.eval_every = 100 if size == "tiny" else 500
  c.save_every = 100 if size == "tiny" else 500
  c.lock()
  return c
