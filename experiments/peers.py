"""The PyTorch peers of `experiments.benchmark`, timed on this machine, in the same session:
`python -m experiments.peers [sft|reward|generate|ppo|all] [--layers 4 --d_model 256 ...] [--json F]`.

Benchmarks on a shared or throttled machine drift by 2-6x between sessions, so a speed-up is only
meaningful against a peer measured minutes apart on the same cores. This runs the plain-PyTorch
versions of the benchmark's stages at the same shapes (Hugging Face `transformers` GPT-2, float32,
every core torch sees):

  sft       one AdamW step of a plain PyTorch loop on [batch, seq] tokens, every token a target
            (what a hand-written training loop does; TRL's SFTTrainer adds its own overhead);
  reward    one AdamW step of the pairwise Bradley-Terry loss, the way pairwise trainers (TRL's
            RewardTrainer) batch it: `batch` sequences = batch / 2 (chosen, rejected) pairs, a
            linear head on the last token; throughput in pairs/s (compare with the benchmark's
            `seq_pairs/s`);
  generate  `model.generate` greedy with the KV cache, `new_tokens` forced (min_new_tokens), after
            `prompt_len` prompt tokens; new tokens/s;
  ppo       TRL's PPOTrainer (trl 1.12, the last release that has it): iterations of
            `ppo_rollouts` prompts of `ppo_prompt_len` tokens sampled to `ppo_new_tokens`, scored by
            a reward model and a value model of the same shape, `ppo_epochs` epochs of one
            minibatch (the benchmark's `ppo` defaults); seconds per iteration and rollouts/s, the
            median over `runs` iterations after two of warm-up (compare with the benchmark's
            plain-PPO row, `--ptx_coef 0`).

Needs torch and transformers (not in requirements.txt: `pip install torch==2.13.0 transformers`),
and for `ppo` also `trl==1.12.0` (its dependencies pin other packages, so use a separate
virtual environment); without them it says so and exits with status 1 (`all` skips `ppo` when
trl is missing). Nothing is downloaded: the models and the word-level tokenizer are made here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable


def _timed_runs(fn: Callable[[], Any], runs: int, warmup: int = 2) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _gpt2(args, torch, transformers, max_len: int):
  config = transformers.GPT2Config(
      vocab_size=args.vocab, n_positions=max(max_len, 64), n_embd=args.d_model,
      n_layer=args.layers, n_head=args.heads, n_inner=args.d_ff or 4 * args.d_model,
      attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
  torch.manual_seed(0)
  return transformers.GPT2LMHeadModel(config)


def run_sft(args, torch, transformers) -> dict[str, Any]:
  model = _gpt2(args, torch, transformers, args.seq).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  tokens = torch.randint(0, args.vocab, (args.batch, args.seq))

  def step():
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  times = _timed_runs(step, args.runs)
  return dict(stage="sft", median_s=statistics.median(times), min_s=min(times),
              throughput=args.batch * args.seq / statistics.median(times), unit="tokens/s")


def run_reward(args, torch, transformers) -> dict[str, Any]:
  if args.batch % 2:
    raise SystemExit(f"--batch {args.batch} must be even: (chosen, rejected) pairs")
  backbone = _gpt2(args, torch, transformers, args.seq).transformer.train()
  head = torch.nn.Linear(args.d_model, 1)
  params = list(backbone.parameters()) + list(head.parameters())
  optimizer = torch.optim.AdamW(params, lr=1e-5)
  tokens = torch.randint(0, args.vocab, (args.batch, args.seq))

  def step():
    hidden = backbone(input_ids=tokens).last_hidden_state[:, -1]
    rewards = head(hidden)[:, 0].view(-1, 2)
    loss = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  times = _timed_runs(step, args.runs)
  return dict(stage="reward", median_s=statistics.median(times), min_s=min(times),
              throughput=args.batch / 2 / statistics.median(times), unit="pairs/s")


def run_generate(args, torch, transformers) -> dict[str, Any]:
  model = _gpt2(args, torch, transformers, args.prompt_len + args.new_tokens).eval()
  prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len))
  attention = torch.ones_like(prompts)

  def generate():
    with torch.no_grad():
      out = model.generate(prompts, attention_mask=attention, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == args.prompt_len + args.new_tokens

  times = _timed_runs(generate, args.runs)
  return dict(stage="generate", median_s=statistics.median(times), min_s=min(times),
              throughput=args.batch * args.new_tokens / statistics.median(times),
              unit="new tokens/s")


def _word_tokenizer(vocab: int, transformers):
  """A tokenizer with ids 0..vocab-1 ("t0" is padding), built offline: TRL's trainer needs one."""
  import tokenizers
  words = {f"t{i}": i for i in range(vocab)}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="t0"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0",
                                              eos_token=f"t{vocab - 1}")


def run_ppo(args, torch, transformers) -> dict[str, Any]:
  import tempfile

  import datasets
  from trl.experimental.ppo import PPOConfig, PPOTrainer

  P, N, B = args.ppo_prompt_len, args.ppo_new_tokens, args.ppo_rollouts
  policy = _gpt2(args, torch, transformers, P + N)
  ref_policy = _gpt2(args, torch, transformers, P + N)

  def scalar_model():
    config = policy.config.__class__.from_dict({**policy.config.to_dict(), "num_labels": 1,
                                                "pad_token_id": 0})
    return transformers.GPT2ForSequenceClassification(config)

  # Prompts avoid the padding id so that TRL sees every prompt token as real.
  prompts = torch.randint(1, args.vocab, (B * (args.runs + 2), P))
  dataset = datasets.Dataset.from_dict({"input_ids": prompts.tolist()})
  times: list[float] = []

  class IterationTimes(transformers.TrainerCallback):
    def on_step_end(self, *_, **__):
      times.append(time.perf_counter())

  with tempfile.TemporaryDirectory() as out:
    config = PPOConfig(
        output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=args.ppo_epochs, response_length=N,
        local_rollout_forward_batch_size=B, total_episodes=len(dataset), stop_token=None,
        missing_eos_penalty=None, num_sample_generations=0, report_to="none",
        save_strategy="no", logging_steps=10_000, use_cpu=True, seed=0, disable_tqdm=True)
    trainer = PPOTrainer(args=config, processing_class=_word_tokenizer(args.vocab, transformers),
                         model=policy, ref_model=ref_policy, reward_model=scalar_model(),
                         value_model=scalar_model(), train_dataset=dataset,
                         callbacks=[IterationTimes()])
    start = time.perf_counter()
    trainer.train()
  iteration_s = [b - a for a, b in zip([start, *times], times)][2:]
  return dict(stage="ppo", median_s=statistics.median(iteration_s), min_s=min(iteration_s),
              throughput=B / statistics.median(iteration_s), unit="rollouts/s")


STAGES = {"sft": run_sft, "reward": run_reward, "generate": run_generate, "ppo": run_ppo}


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.peers", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=[*STAGES, "all"])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--d_ff", type=int, default=None, help="default 4 * d_model")
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--ppo_rollouts", type=int, default=16)
  parser.add_argument("--ppo_prompt_len", type=int, default=32)
  parser.add_argument("--ppo_new_tokens", type=int, default=32)
  parser.add_argument("--ppo_epochs", type=int, default=4)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  if args.runs < 1:
    parser.error(f"--runs {args.runs}: time at least one run")
  return args


def _has_trl() -> bool:
  import importlib.util
  return importlib.util.find_spec("trl") is not None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = parse(list(sys.argv[1:] if argv is None else argv))
  try:
    import torch
    import transformers
  except ImportError as e:
    print(f"peers need torch and transformers ({e}); pip install torch==2.13.0 transformers",
          file=sys.stderr)
    raise SystemExit(1)
  transformers.logging.set_verbosity_error()
  stages = list(STAGES) if args.command == "all" else [args.command]
  if "ppo" in stages and not _has_trl():
    if args.command == "ppo":
      print("the ppo peer needs trl 1.12 (pip install trl==1.12.0, in its own virtual "
            "environment)", file=sys.stderr)
      raise SystemExit(1)
    print("skipping ppo: trl is not installed", file=sys.stderr)
    stages.remove("ppo")
  rows = [STAGES[name](args, torch, transformers) for name in stages]
  print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; layers {args.layers}, d_model {args.d_model}, vocab "
        f"{args.vocab}, batch {args.batch}, seq {args.seq}")
  for row in rows:
    print(f"{row['stage']:<10}{1e3 * row['median_s']:>10.1f} ms (min {1e3 * row['min_s']:.1f})"
          f"{row['throughput']:>12,.1f} {row['unit']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                 "args": vars(args), "rows": rows}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
