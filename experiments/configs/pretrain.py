"""Pretraining: next-token loss on a text corpus, to make a small base model locally.

The default corpus is the synthetic task's plain text (it never answers an instruction), so the
SFT stage starts from a model that knows the vocabulary but not the task. Run:

  python -m experiments.run --config experiments/configs/pretrain.py:tiny --workdir /tmp/pretrain

Variants: `tiny` (CPU, about a minute) and `small` (the GPT-2-like reference shape). For your own
corpus: `--config.data.source=files --config.data.train_files=a.txt,b.jsonl`.
"""
from experiments.configs import base


def get_config(arg: str = "tiny"):
  size = arg or "tiny"
  c = base.base_config("pretrain")
  c.model = base.model_config(size)
  c.data = base.data_config("text", seq_len=128)
  c.data.num_train = 4_000
  c.data.num_eval = 256
  c.synthetic = base.synthetic_config()
  c.optimizer = base.optimizer_config(lr=2e-3, warmup_steps=20)
  c.steps = 300 if size == "tiny" else 2_000
  c.batch_size = 16 if size == "tiny" else 32
  c.eval_every = 100 if size == "tiny" else 500
  c.save_every = 100 if size == "tiny" else 500
  c.lock()
  return c
