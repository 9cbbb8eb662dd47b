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
  tiny = size == "tiny"
  # Tiny, measured on 2 CPU cores (docs/pipeline.md, "Tiny settings"): 300 steps at lr 1e-3 left the
  # greedy gold score at ~0.3; at lr 2e-3 1 000 steps reach ~0.55 and 1 500 steps ~0.65, in ~170
  # CPU-seconds. 88 tokens hold the longest prompt (64) + answer (8) + remark (15) + EOS.
  c.data = base.data_config("demonstrations", seq_len=88 if tiny else 96, max_prompt_len=64)
  c.data.num_train = 8_000
  c.data.num_eval = 256
  c.synthetic = base.synthetic_config()
  c.sampling = base.sampling_config(prompt_len=64)
  c.eval_samples = 128        # held-out synthetic prompts whose greedy answers get a gold score
  c.optimizer = base.optimizer_config(lr=2e-3 if tiny else 1e-3, warmup_steps=50 if tiny else 20)
  c.steps = 1_500 if tiny else 2_000
  c.batch_size = 16 if tiny else 32
  c.eval_every = 250 if tiny else 500
  c.save_every = 500
  c.lock()
  return c


def sweep(arg: str = "tiny") -> list[dict]:
  """Learning rate x weight decay around the defaults, one run each (see experiments/sweep.py).

  Run with `python -m experiments.sweep --config experiments/configs/sft.py:tiny --workdir DIR
  --local`, then the same with `--summary` for the table.
  """
  del arg  # the same grid brackets both sizes' default learning rates (tiny 2e-3, small 1e-3)
  return [{"name": f"lr{lr:g}_wd{wd:g}",
           "overrides": {"optimizer.lr": lr, "optimizer.weight_decay": wd}}
          for lr in (3e-4, 1e-3, 3e-3) for wd in (0.0, 0.1)]
