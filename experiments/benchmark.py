"""Throughput benchmarks: `python -m experiments.benchmark <subcommand> [flags]`.

Subcommands:
  sampling   new tokens/s of the KV-cached decode vs the uncached recompute, the prefill time,
             ms per decode step and the analytic FLOPs per step.

Each subcommand registers an argument builder and a runner in `SUBCOMMANDS`; a new one (sft,
reward, ppo) adds its own pair. Timings are taken after a warm-up call (compilation excluded) and
reported as the median over `--runs` calls; `--json` also writes them to a file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instructjax import sampling
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel


def time_call(fn: Callable[[], Any], runs: int) -> list[float]:
  """Seconds per call of fn (its outputs blocked on), after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def summary(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

def add_model_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--flavour", default="gpt2", choices=["gpt2", "llama"])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
  add_model_args(parser)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--skip_uncached", action="store_true")
  parser.add_argument("--json", default=None, help="also write the results to this file")


def decode_step_flops(cfg: ModelConfig, batch: int, cache_len: int) -> int:
  """Matmul FLOPs of one single-token decode step over the whole cache (what the code runs:
  attention is not restricted to the filled slots)."""
  d, h, f = cfg.d_model, cfg.head_dim, cfg.d_ff
  projections = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * h + cfg.n_heads * h * d
  mlp = (3 if cfg.mlp == "swiglu" else 2) * d * f
  attention = 2 * cfg.n_heads * h * cache_len  # q.k over the cache, then p.v
  per_token = cfg.n_layers * (projections + mlp + attention) + d * cfg.vocab_size
  return 2 * batch * per_token


def run_sampling(args: argparse.Namespace) -> dict[str, Any]:
  cache_len = args.prompt_len + args.new_tokens
  cfg = ModelConfig(flavour=args.flavour, vocab_size=args.vocab, d_model=args.d_model,
                    n_layers=args.layers, n_heads=args.heads, max_len=max(cache_len, 64),
                    dtype=args.dtype)
  graphdef, state = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  prompts = jnp.asarray(np.random.default_rng(0).integers(
      0, args.vocab, (args.batch, args.prompt_len)), jnp.int32)
  mask = jnp.ones_like(prompts)
  rng = jax.random.PRNGKey(0)
  config = sampling.SamplingConfig(args.new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, greedy=not args.sample)
  # eos_id -1 never matches, so every run decodes the full max_new_tokens.
  ids = dict(eos_id=-1, pad_id=0)
  new_tokens = args.batch * args.new_tokens

  prefill = jax.jit(lambda p, t, m: sampling.prefill(graphdef, p, t, m,
                                                     max_new_tokens=args.new_tokens))
  prefill_times = summary(time_call(lambda: prefill(params, prompts, mask), args.runs))
  cached = sampling.Sampler(graphdef, config, **ids)
  out = cached(params, prompts, mask, rng)
  assert int(out.num_steps) == args.new_tokens, "the decode must run every step"
  cached_times = summary(time_call(lambda: cached(params, prompts, mask, rng), args.runs))
  decode_s = cached_times["median_s"] - prefill_times["median_s"]
  step_s = decode_s / max(args.new_tokens - 1, 1)
  flops = decode_step_flops(cfg, args.batch, cache_len)
  result = {
      "shape": {k: getattr(args, k) for k in ("flavour", "batch", "prompt_len", "new_tokens",
                                              "layers", "d_model", "heads", "vocab", "dtype")},
      "greedy": config.greedy,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "prefill_ms": 1e3 * prefill_times["median_s"],
      "cached": {**cached_times, "tokens_per_s": new_tokens / cached_times["median_s"],
                 "best_tokens_per_s": new_tokens / cached_times["min_s"]},
      "decode_step_ms": 1e3 * step_s,
      "decode_step_mflops": flops / 1e6,
      "decode_gflops_per_s": flops / step_s / 1e9 if step_s > 0 else float("nan"),
  }
  if not args.skip_uncached:
    uncached = sampling.Sampler(graphdef, config, fn=sampling.sample_uncached, **ids)
    uncached_times = summary(time_call(lambda: uncached(params, prompts, mask, rng), args.runs))
    result["uncached"] = {**uncached_times,
                          "tokens_per_s": new_tokens / uncached_times["median_s"]}
  return result


def print_sampling(result: dict[str, Any]) -> None:
  shape = result["shape"]
  print(f"sampling {shape} greedy={result['greedy']} on {result['devices']} "
        f"{result['backend']} device(s)")
  print(f"  prefill           {result['prefill_ms']:8.2f} ms")
  c = result["cached"]
  print(f"  cached decode     {c['tokens_per_s']:10.0f} new tokens/s (median; best "
        f"{c['best_tokens_per_s']:.0f})  total {1e3 * c['median_s']:.1f} ms")
  print(f"  per decode step   {result['decode_step_ms']:8.3f} ms  "
        f"({result['decode_step_mflops']:.1f} MFLOP, {result['decode_gflops_per_s']:.1f} GFLOP/s)")
  if "uncached" in result:
    u = result["uncached"]
    print(f"  uncached decode   {u['tokens_per_s']:10.0f} new tokens/s (median)  "
          f"total {1e3 * u['median_s']:.1f} ms  -> cache speed-up "
          f"{c['tokens_per_s'] / u['tokens_per_s']:.1f}x")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

SUBCOMMANDS: dict[str, tuple[Callable, Callable, Callable]] = {
    "sampling": (add_sampling_args, run_sampling, print_sampling),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  for name, (add_args, _, _) in SUBCOMMANDS.items():
    add_args(commands.add_parser(name))
  args = parser.parse_args(argv)
  _, run, report = SUBCOMMANDS[args.command]
  result = run(args)
  report(result)
  if getattr(args, "json", None):
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
