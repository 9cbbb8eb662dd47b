"""Throughput, MFU, compile time and memory of every stage's step:
`python -m experiments.benchmark [sft|reward|sampling|ppo|all] [flags] [--json out.json]`.

Stages (random-init models, synthetic batches; the reference shape is the default: GPT-2-like,
4 layers, d_model 256, 4 heads, d_ff 1024, vocab 512, seq 128, batch 16, float32):
  sft       one AdamW step of `objectives.sft.train_step` on [batch, seq] tokens, every token a
            target. Throughput: tokens/s = batch * seq / step time.
  reward    one AdamW step of `objectives.reward.train_step` on a K-way ranking batch of `batch`
            sequences = batch / K prompts x K responses (K = --k, default 4), each of `seq`
            tokens. Throughput: pairs/s, a pair being one comparison (C(K, 2) per prompt: 16
            sequences = 4 prompts x 6 pairs = 24 pairs per step). A pairwise trainer (TRL's
            RewardTrainer) runs 2 sequences per pair, so `seq_pairs/s` = sequences / 2 / s is also
            reported: it is the number to compare with such trainers.
  sampling  KV-cached decode (`sampling.Sampler`, greedy) of --new_tokens after --prompt_len;
            throughput: new tokens/s (prefill included). Also reports the uncached recompute,
            and the bytes a decode step must read (every weight and the whole KV cache, in the
            compute dtype) per measured step time, against a memory read rate measured in the
            same run (a sum over 256 MiB on CPU, 4 GiB on an accelerator): small-batch decoding's
            roofline is bandwidth, not FLOPs.
  ppo       one PPO-ptx iteration (`objectives.ppo`) with a random-init policy, reference, value
            and reward model of the same shape: --ppo_rollouts prompts of --ppo_prompt_len tokens
            sampled to --ppo_new_tokens (rollout), `score_phase` + `advantage_phase` (score),
            `ppo_update` with --ppo_epochs x --ppo_minibatches steps, each with as many ptx rows
            as rollout rows, of --ptx_seq tokens (default P + N) (update). Throughput: rollouts/s of the whole iteration, and of each phase.
  all       every stage, each in a fresh subprocess (so peak memory is per stage), one table.

Timing: each step is compiled first (compile time = trace + lower + compile), run once to warm
up, then `--runs` times back to back, as a training loop runs it. Right after, in the same
process, the benchmark times `--runs` samples of two float32 matmuls (bfloat16 on GPU/TPU): a
large one (2048^3 on CPU, 8192^3 on an accelerator) and one at the model's own MLP shape,
(batch*seq) x d_model x d_ff. Reported: the median step time (and min/max), and medians of the
rates. Each run also records the process's CPU time (user + sys), so a loaded machine can
be read too: the `cpu` MFU compares FLOPs per CPU-second of the step with those of the matmul.
On a shared virtual machine the cores can also slow down for seconds at a time, which a
median taken minutes apart (steps first, probe after) cannot cancel; noise of that kind only
ever slows things down, so `MFU best` divides the model FLOPs by the fastest step and the
fastest probe sample instead.

Model FLOPs (`forward_flops`) count the matrix multiplications the code runs, exactly:
  per token and layer:   projections 2 * d * (N + 2 K) * h  +  output 2 * N * h * d
                         MLP         2 * m * d * f   (m = 2 for GELU, 3 for SwiGLU)
                         attention   2 * 2 * N * h * S   (q.k and p.v over S keys; causal masking
                                     does not skip work, so S is the full length, or the cache
                                     length with a KV cache)
  per unembedded position  2 * d * V;   per scalar-head position  2 * d.
Norms, biases, softmax, GELU, the embedding gather and the optimizer are not counted. Training is
3x the forward: each matmul has a forward, an input-gradient and a weight-gradient product of the
same size (the embedding's input gradient is a scatter, not a matmul, and is not counted, but
the first layer's input gradient is computed to reach the embedding, so every layer is 3x).
With N * h = d and no GQA this is the usual per-token training count
  6 * P_matmul + 12 * L * d * S,   P_matmul = L * (4 d^2 + 2 d f) + d V,
e.g. at the reference shape 6 * 3,276,800 + 12 * 4 * 256 * 128 = 21.2 MFLOP/token, 43.5 GFLOP
per 2048-token SFT step. A decode step's FLOPs (`decode_step_flops`) are one token per row over
the whole cache. MFU = model FLOPs / step time / the large matmul's measured FLOP/s.

Peak memory: the device's `peak_bytes_in_use` (`metrics.device_memory_stats`) where the backend
reports it (GPU, TPU); on CPU the process's peak RSS (`resource.getrusage`), which includes the
Python process and jax itself (~0.4-0.6 GB), so `all` runs each stage in its own process.

glibc on Linux hands XLA's large per-step buffers back to the OS after every step and page-faults
them in again (hundreds of MB of minor faults per SFT step). Run as a script, the benchmark
re-executes itself with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (transparent huge pages for
malloc), which cuts those faults ~200x; `--no_hugetlb` turns this off. Export the same variable
for CPU training runs.

Devices: `--devices N` shards every batch over N devices (a data-parallel mesh, run under the
default logical-axis rules as the trainers run). On CPU the benchmark first restarts itself with
the cores split into N XLA devices (`--xla_force_host_platform_device_count=N`); one device per
core beats XLA's default of one device whose every op is split over the cores, because most ops
of these small models are too small to split well (2 cores: decode 1.4x, SFT and reward steps
1.1-1.2x; the entry points do the same with INSTRUCTJAX_CPU_DEVICES=N). The remat policy defaults
to the configs' "dots".
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import host
from instructjax import metrics, parallel, sampling
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel, ScalarModel
from instructjax.objectives import ppo, reward, sft
from experiments.configs import base as config_base
from instructjax.trainers import common, workdirs
from instructjax.trainers import ppo as ppo_trainer

STAGES = ("sft", "reward", "sampling", "ppo")
HUGETLB = host.HUGETLB


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def time_call(fn: Callable[[], Any], runs: int) -> list[float]:
  """Seconds per call of fn (its outputs blocked on), after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one call, its outputs blocked on."""
  wall, cpu = time.perf_counter(), cpu_seconds()
  jax.block_until_ready(fn())
  return time.perf_counter() - wall, cpu_seconds() - cpu


def summary(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def one_device():
  """A one-device mesh context: inside a multi-device benchmark's mesh scope, the probe's
  matmul would otherwise be replicated and run on every device at once."""
  return jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("probe",)))


class MatmulProbe:
  """The device's measured matmul rate: a large square matmul and one at the model's MLP shape.

  Each `sample()` times both once (several calls for the small one, whose single call is too
  short to time on its own) and records FLOP/s by wall clock and by process CPU time.
  """

  def __init__(self, model_shape: tuple[int, int, int]):
    accelerator = jax.default_backend() != "cpu"
    self.dtype = jnp.bfloat16 if accelerator else jnp.float32
    n = 8192 if accelerator else 2048
    self.shapes = {"large": (n, n, n), "model": tuple(model_shape)}
    rng = np.random.default_rng(0)
    self._fns, self.flops = {}, {}
    for name, (m, k, n_) in self.shapes.items():
      with one_device():
        a = jnp.asarray(rng.standard_normal((m, k)), self.dtype)
        b = jnp.asarray(rng.standard_normal((k, n_)), self.dtype)
        matmul = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
      self._fns[name] = functools.partial(matmul, a, b)
      self.flops[name] = 2 * m * k * n_
    self._repeats = {name: 1 for name in self.shapes}
    for name, fn in self._fns.items():  # warm up, then size the repeats to ~20 ms per sample
      jax.block_until_ready(fn())
      wall, _ = timed(fn)
      self._repeats[name] = max(1, min(50, int(0.02 / max(wall, 1e-6))))
    self.wall_rates = {name: [] for name in self.shapes}
    self.cpu_rates = {name: [] for name in self.shapes}

  def sample(self) -> None:
    for name, fn in self._fns.items():
      repeats = self._repeats[name]
      wall, cpu = timed(lambda: [fn() for _ in range(repeats)])
      self.wall_rates[name].append(repeats * self.flops[name] / wall)
      self.cpu_rates[name].append(repeats * self.flops[name] / max(cpu, 1e-9))

  def result(self) -> dict[str, Any]:
    out = {"dtype": jnp.dtype(self.dtype).name}
    for name, shape in self.shapes.items():
      out[name] = {"shape": list(shape),
                   "gflops_per_s": statistics.median(self.wall_rates[name]) / 1e9,
                   "gflops_per_s_spread": [min(self.wall_rates[name]) / 1e9,
                                           max(self.wall_rates[name]) / 1e9],
                   "gflops_per_cpu_s": statistics.median(self.cpu_rates[name]) / 1e9}
    return out


class ReadProbe:
  """The device's measured memory read rate, the roofline of a batch-small decode step (which
  reads every weight and the whole KV cache once per token): a float32 sum over an array far
  larger than any cache (256 MiB on CPU, 4 GiB on an accelerator), on one device."""

  def __init__(self, nbytes: int | None = None):
    accelerator = jax.default_backend() != "cpu"
    self.bytes = nbytes or ((4 << 30) if accelerator else (256 << 20))
    with one_device():
      x = jnp.ones((self.bytes // 4,), jnp.float32)
      total = jax.jit(jnp.sum).lower(x).compile()
    self._call = functools.partial(total, x)
    jax.block_until_ready(self._call())
    self.rates: list[float] = []

  def sample(self) -> None:
    wall, _ = timed(self._call)
    self.rates.append(self.bytes / wall)

  def result(self) -> dict[str, Any]:
    return {"bytes": self.bytes, "gb_per_s": statistics.median(self.rates) / 1e9,
            "gb_per_s_spread": [min(self.rates) / 1e9, max(self.rates) / 1e9]}


def measure(phases: dict[str, Callable[[], Any]], runs: int, probe: MatmulProbe | None,
            profile: str | None = None) -> dict[str, dict[str, Any]]:
  """Runs the phases in order `runs` times after one warm-up round, then samples the matmul probe
  `runs` times. Returns per phase the wall and CPU seconds of every run. With `profile` (a
  folder), one more round of the phases afterwards is traced (`jax.profiler`, a Perfetto trace under DIR that
  `python -m experiments.profile_summary DIR` reads).

  The probe is not interleaved with the steps: with glibc's huge-page malloc, the first step
  after a different program's allocations pays the kernel's page compaction (+0.5 CPU-s at the
  reference shape, measured), which a training loop that only runs its step never sees.
  """
  for fn in phases.values():
    jax.block_until_ready(fn())
  walls = {name: [] for name in phases}
  cpus = {name: [] for name in phases}
  for _ in range(runs):
    for name, fn in phases.items():
      wall, cpu = timed(fn)
      walls[name].append(wall)
      cpus[name].append(cpu)
  if probe is not None:
    for _ in range(runs):
      probe.sample()
  if profile:
    with jax.profiler.trace(profile, create_perfetto_trace=True):
      for fn in phases.values():
        jax.block_until_ready(fn())
  return {name: {"wall": walls[name], "cpu": cpus[name]} for name in phases}



def compile_timed(jitted, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def peak_memory() -> dict[str, Any]:
  """Device peak bytes where the backend reports them, else the process's peak RSS."""
  stats = metrics.device_memory_stats()
  if stats.get("peak_bytes_in_use") is not None:
    return {"kind": "device peak", "bytes": stats["peak_bytes_in_use"]}
  # Linux reports ru_maxrss in KiB.
  return {"kind": "process peak RSS", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
          * 1024}


# ---------------------------------------------------------------------------------------------
# Model FLOPs (see the module docstring)
# ---------------------------------------------------------------------------------------------

def forward_flops(cfg: ModelConfig, positions: int, keys: int, unembedded: int = 0,
                  scalar_positions: int = 0) -> int:
  """Matmul FLOPs of one forward over `positions` tokens (summed over the batch), each attending
  over `keys` slots, with `unembedded` positions through the LM head and `scalar_positions`
  through a scalar head."""
  d, h, f = cfg.d_model, cfg.head_dim, cfg.d_ff
  projections = 2 * d * (cfg.n_heads + 2 * cfg.n_kv_heads) * h + 2 * cfg.n_heads * h * d
  mlp = 2 * (3 if cfg.mlp == "swiglu" else 2) * d * f
  attention = 2 * 2 * cfg.n_heads * h * keys
  per_position = cfg.n_layers * (projections + mlp + attention)
  return (positions * per_position + unembedded * 2 * d * cfg.vocab_size
          + scalar_positions * 2 * d)


def decode_step_flops(cfg: ModelConfig, batch: int, cache_len: int) -> int:
  """Matmul FLOPs of one single-token decode step over the whole cache (what the code runs:
  attention is not restricted to the filled slots)."""
  return forward_flops(cfg, batch, cache_len, unembedded=batch)


def decode_step_bytes(cfg: ModelConfig, batch: int, cache_len: int) -> int:
  """Bytes one decode step must read at least, in the compute dtype: every matmul weight once
  (the token embedding only as the tied unembedding; a gathered row is negligible) and the
  whole KV cache (keys and values of every layer, every slot: attention runs over all of it)."""
  cache = 2 * cfg.n_layers * batch * cache_len * cfg.n_kv_heads * cfg.head_dim
  return (matmul_params(cfg) + cache) * jnp.dtype(cfg.compute_dtype).itemsize


def matmul_params(cfg: ModelConfig) -> int:
  """P_matmul of the docstring: weights that enter a matmul (the LM head counted once)."""
  d, h, f = cfg.d_model, cfg.head_dim, cfg.d_ff
  per_layer = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * h + cfg.n_heads * h * d + (
      3 if cfg.mlp == "swiglu" else 2) * d * f
  return cfg.n_layers * per_layer + d * cfg.vocab_size


# ---------------------------------------------------------------------------------------------
# Shared flags and helpers
# ---------------------------------------------------------------------------------------------

def add_args(parser: argparse.ArgumentParser) -> None:
  """Every flag, for every stage (`all` passes them on to each stage)."""
  parser.add_argument("--flavour", default="gpt2", choices=["gpt2", "llama"])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--d_ff", type=int, default=None, help="default 4 * d_model")
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--seq", type=int, default=128, help="sequence length (sft, reward, ptx)")
  parser.add_argument("--batch", type=int, default=16, help="sequences per step (all stages)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--scan_unroll", type=int, default=1, help="ModelConfig.scan_unroll")
  parser.add_argument("--attention_impl", default=None, choices=["xla", "cudnn"],
                      help="ModelConfig.attention_impl (default: cuDNN's flash attention on a "
                      "GPU in bfloat16, XLA's elsewhere; see layers.attention_implementation)")
  parser.add_argument("--remat", default="dots", choices=["none", "full", "dots"],
                      help="ModelConfig.remat; the configs' default is dots")
  parser.add_argument("--devices", type=int, default=1,
                      help="shard every batch over this many devices (data parallel); on CPU the "
                      "benchmark first splits the cores into this many XLA devices")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--json", default=None, help="also write the results to this file")
  parser.add_argument("--no_probe", action="store_true",
                      help="skip the matmul-rate probe (no MFU)")
  parser.add_argument("--profile", default=None,
                      help="trace one more round of the timed steps into this folder "
                      "(summarise with python -m experiments.profile_summary DIR)")
  # sft
  parser.add_argument("--compile_depths", default="4,16",
                      help="layer counts whose SFT step compile time is reported ('' = skip)")
  # reward
  parser.add_argument("--k", type=int, default=4, help="responses per prompt in a reward batch")
  # sampling
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
  parser.add_argument("--skip_uncached", action="store_true")
  # ppo
  parser.add_argument("--ppo_rollouts", type=int, default=16)
  parser.add_argument("--ppo_prompt_len", type=int, default=32)
  parser.add_argument("--ppo_new_tokens", type=int, default=32)
  parser.add_argument("--ppo_epochs", type=int, default=4)
  parser.add_argument("--ppo_minibatches", type=int, default=1)
  parser.add_argument("--ptx_coef", type=float, default=27.8, help="0 = plain PPO, no ptx rows")
  parser.add_argument("--ptx_seq", type=int, default=None,
                      help="ptx row length; default the rollout's, ppo_prompt_len + ppo_new_tokens")
  # all
  parser.add_argument("--no_hugetlb", action="store_true",
                      help="do not re-execute with GLIBC_TUNABLES=glibc.malloc.hugetlb=1")


def model_config(args: argparse.Namespace, max_len: int) -> ModelConfig:
  return ModelConfig(flavour=args.flavour, vocab_size=args.vocab, d_model=args.d_model,
                     n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
                     max_len=max(max_len, 64), dtype=args.dtype, scan_unroll=args.scan_unroll,
                     remat=args.remat, attention_impl=args.attention_impl)


def split(model) -> tuple[nnx.GraphDef, Any]:
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def shape_of(args: argparse.Namespace, cfg: ModelConfig) -> dict[str, Any]:
  return dict(flavour=cfg.flavour, layers=cfg.n_layers, d_model=cfg.d_model, heads=cfg.n_heads,
              d_ff=cfg.d_ff, vocab=cfg.vocab_size, seq=args.seq, batch=args.batch,
              dtype=cfg.dtype, scan_unroll=cfg.scan_unroll, remat=cfg.remat,
              attention_impl=cfg.attention_impl)


def random_tokens(rng: np.random.Generator, shape, vocab: int) -> jax.Array:
  return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)


def make_probe(args, model_shape) -> MatmulProbe | None:
  return None if args.no_probe else MatmulProbe(model_shape)


def data_mesh(args) -> jax.sharding.Mesh | None:
  """A (data = --devices, 1, 1) mesh, or None for one device."""
  if args.devices <= 1:
    return None
  if jax.device_count() < args.devices:
    raise SystemExit(f"--devices {args.devices}: only {jax.device_count()} devices here")
  devices = np.array(jax.devices()[:args.devices]).reshape(args.devices, 1, 1)
  return jax.sharding.Mesh(devices, parallel.MESH_AXES)


def mesh_scope(args):
  """The context the trainers run their steps in (`Layout.scope`: the mesh and the logical-axis
  rules), so the models' activation constraints keep every batch dimension split; nothing for
  one device."""
  mesh = data_mesh(args)
  if mesh is None:
    return contextlib.nullcontext()
  return common.Layout(mesh, parallel.DEFAULT_RULES).scope()


def place(mesh, replicated: Any, rows: Any) -> tuple[Any, Any]:
  """Puts `replicated` on every device of the mesh and splits the leading axis of every array
  in `rows` over it; jit then runs the steps data parallel. Unchanged without a mesh."""
  if mesh is None:
    return replicated, rows
  whole = parallel.replicated(mesh)
  split_rows = lambda x: jax.device_put(x, parallel.batch_sharding(mesh, x.ndim))
  return jax.device_put(replicated, whole), jax.tree.map(split_rows, rows)


def phase_row(name: str, timing: dict[str, list[float]], flops: float, units: float,
              unit: str, probe: MatmulProbe | None, compile_s: float | None = None
              ) -> dict[str, Any]:
  """One table row: times, throughput and MFU from a phase's runs."""
  wall = summary(timing["wall"])
  cpu_s = statistics.median(timing["cpu"])
  row = dict(stage=name, **wall, cpu_s=cpu_s, throughput=units / wall["median_s"], unit=unit,
             best_throughput=units / wall["min_s"], model_gflop=flops / 1e9,
             gflops_per_s=flops / wall["median_s"] / 1e9, compile_s=compile_s)
  if probe is not None and flops:
    large = probe.result()["large"]
    row["mfu"] = row["gflops_per_s"] / large["gflops_per_s"]
    if jax.default_backend() == "cpu":  # on an accelerator the host's CPU time says nothing
      row["mfu_cpu"] = flops / max(cpu_s, 1e-9) / 1e9 / large["gflops_per_cpu_s"]
    row["mfu_best"] = flops / wall["min_s"] / 1e9 / large["gflops_per_s_spread"][1]
  return row


def finish(stage: str, args, cfg, rows, probe, extra=None) -> dict[str, Any]:
  result = {"stage": stage, "shape": shape_of(args, cfg), "backend": jax.default_backend(),
            "devices": args.devices, "hugetlb": HUGETLB in os.environ.get(
                "GLIBC_TUNABLES", ""),
            "load_average": os.getloadavg(), "rows": rows, "peak_memory": peak_memory()}
  if probe is not None:
    result["matmul"] = probe.result()
  result.update(extra or {})
  return result


# ---------------------------------------------------------------------------------------------
# sft
# ---------------------------------------------------------------------------------------------

def sft_step_and_state(cfg: ModelConfig):
  graphdef, params = split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  schedule = sft.learning_rate_schedule(1e-4, 10, 1000)
  optimizer = sft.make_optimizer(schedule, weight_decay=0.01)
  state = sft.init_state(params, optimizer, 0)
  step = jax.jit(functools.partial(sft.train_step, graphdef=graphdef, optimizer=optimizer,
                                   schedule=schedule), donate_argnums=0)
  return step, state


def stateful(compiled, state, batch):
  """A zero-argument call of a donating step that threads its state through."""
  holder = [state]

  def call():
    holder[0], step_metrics = compiled(holder[0], batch)
    return step_metrics["loss"]
  return call


def compile_scaling(args, depths: list[int], known: dict[int, float]) -> dict[str, float]:
  """Compile seconds of the SFT step per layer count (scanned layers: should stay flat); depths
  in `known` are not compiled again."""
  rng = np.random.default_rng(0)
  tokens = random_tokens(rng, (args.batch, args.seq), args.vocab)
  batch = dict(tokens=tokens, mask=jnp.ones_like(tokens), loss_mask=jnp.ones_like(tokens))
  out = {}
  for depth in depths:
    if depth in known:
      out[str(depth)] = known[depth]
      continue
    cfg = model_config(argparse.Namespace(**{**vars(args), "layers": depth}), args.seq)
    step, state = sft_step_and_state(cfg)
    _, seconds = compile_timed(step, state, batch)
    out[str(depth)] = seconds
  return out


def run_sft(args: argparse.Namespace) -> dict[str, Any]:
  cfg = model_config(args, args.seq)
  rng = np.random.default_rng(0)
  tokens = random_tokens(rng, (args.batch, args.seq), args.vocab)
  batch = dict(tokens=tokens, mask=jnp.ones_like(tokens), loss_mask=jnp.ones_like(tokens))
  step, state = sft_step_and_state(cfg)
  state, batch = place(data_mesh(args), state, batch)
  compiled, compile_s = compile_timed(step, state, batch)
  probe = make_probe(args, (args.batch * args.seq, cfg.d_model, cfg.d_ff))
  timing = measure({"sft": stateful(compiled, state, batch)}, args.runs, probe, args.profile)
  n_tokens = args.batch * args.seq
  flops = 3 * forward_flops(cfg, n_tokens, args.seq, unembedded=n_tokens)
  rows = [phase_row("sft", timing["sft"], flops, n_tokens, "tokens/s", probe, compile_s)]
  depths = [int(d) for d in args.compile_depths.split(",") if d.strip()]
  extra = {"compile_s_by_layers": compile_scaling(args, depths, {args.layers: compile_s})} if depths else {}
  return finish("sft", args, cfg, rows, probe, extra)


# ---------------------------------------------------------------------------------------------
# reward
# ---------------------------------------------------------------------------------------------

def reward_batch(args, rng: np.random.Generator) -> dict[str, jax.Array]:
  """batch / K prompts of K responses each, all real, all ranks distinct (C(K, 2) pairs)."""
  if args.batch % args.k or args.k < 2:
    raise SystemExit(f"--batch {args.batch} must be a multiple of --k {args.k} >= 2")
  prompts = args.batch // args.k
  tokens = random_tokens(rng, (prompts, args.k, args.seq), args.vocab)
  ranks = np.stack([rng.permutation(args.k) for _ in range(prompts)]).astype(np.int32)
  return dict(tokens=tokens, mask=jnp.ones_like(tokens), ranks=jnp.asarray(ranks),
              valid=jnp.ones((prompts, args.k), bool))


def run_reward(args: argparse.Namespace) -> dict[str, Any]:
  cfg = model_config(args, args.seq)
  batch = reward_batch(args, np.random.default_rng(0))
  graphdef, params = split(ScalarModel(cfg, rngs=nnx.Rngs(0)))
  schedule = reward.learning_rate_schedule(1e-5, 10, 1000)
  optimizer = reward.make_optimizer(schedule, weight_decay=0.01)
  state = reward.init_state(params, optimizer, 0)
  state, batch = place(data_mesh(args), state, batch)
  step = jax.jit(functools.partial(reward.train_step, graphdef=graphdef, optimizer=optimizer,
                                   schedule=schedule), donate_argnums=0)
  compiled, compile_s = compile_timed(step, state, batch)
  probe = make_probe(args, (args.batch * args.seq, cfg.d_model, cfg.d_ff))
  timing = measure({"reward": stateful(compiled, state, batch)}, args.runs, probe,
                   args.profile)
  n_tokens = args.batch * args.seq
  # The scalar head runs at every position (the reward is read at the last one).
  flops = 3 * forward_flops(cfg, n_tokens, args.seq, scalar_positions=n_tokens)
  pairs = (args.batch // args.k) * math.comb(args.k, 2)
  row = phase_row("reward", timing["reward"], flops, pairs, "pairs/s", probe, compile_s)
  row["seq_pairs_per_s"] = args.batch / 2 / row["median_s"]
  return finish("reward", args, cfg, [row], probe, {"k": args.k, "pairs_per_step": pairs})


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

def run_sampling(args: argparse.Namespace) -> dict[str, Any]:
  cache_len = args.prompt_len + args.new_tokens
  cfg = model_config(args, cache_len)
  graphdef, params = split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  prompts = random_tokens(np.random.default_rng(0), (args.batch, args.prompt_len), args.vocab)
  mesh = data_mesh(args)
  params, (prompts, mask) = place(mesh, params, (prompts, jnp.ones_like(prompts)))
  rng = jax.random.PRNGKey(0)
  config = sampling.SamplingConfig(args.new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, greedy=not args.sample)
  # eos_id -1 never matches, so every run decodes the full max_new_tokens.
  ids = dict(eos_id=-1, pad_id=0)
  new_tokens = args.batch * args.new_tokens

  prefill = jax.jit(lambda p, t, m: sampling.prefill(graphdef, p, t, m,
                                                     max_new_tokens=args.new_tokens))
  prefill_compiled, _ = compile_timed(prefill, params, prompts, mask)
  cached = sampling.Sampler(graphdef, config, mesh=mesh, **ids)
  start = time.perf_counter()
  out = cached(params, prompts, mask, rng)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - start  # the first call compiles (and runs once)
  assert int(out.num_steps) == args.new_tokens, "the decode must run every step"
  probe = make_probe(args, (args.batch, cfg.d_model, cfg.d_ff))
  phases = {"prefill": lambda: prefill_compiled(params, prompts, mask),
            "cached": lambda: cached(params, prompts, mask, rng)}
  timing = measure(phases, args.runs, probe, args.profile)
  read_rate = None
  if not args.no_probe:
    read_probe = ReadProbe()
    for _ in range(args.runs):
      read_probe.sample()
    read_rate = read_probe.result()
  prefill_times = summary(timing["prefill"]["wall"])
  cached_times = summary(timing["cached"]["wall"])
  decode_s = cached_times["median_s"] - prefill_times["median_s"]
  step_s = decode_s / max(args.new_tokens - 1, 1)
  step_flops = decode_step_flops(cfg, args.batch, cache_len)
  prefill_flops = forward_flops(cfg, args.batch * args.prompt_len, cache_len,
                                unembedded=args.batch)
  total_flops = prefill_flops + (args.new_tokens - 1) * step_flops
  rows = [phase_row("sampling", timing["cached"], total_flops, new_tokens, "new tokens/s",
                    probe, compile_s),
          phase_row("  prefill", timing["prefill"], prefill_flops, args.batch * args.prompt_len,
                    "prompt tokens/s", probe)]
  result = {
      "greedy": config.greedy,
      "prefill_ms": 1e3 * prefill_times["median_s"],
      "cached": {**cached_times, "tokens_per_s": new_tokens / cached_times["median_s"],
                 "best_tokens_per_s": new_tokens / cached_times["min_s"]},
      "decode_step_ms": 1e3 * step_s,
      "decode_step_mflops": step_flops / 1e6,
      "decode_gflops_per_s": step_flops / step_s / 1e9 if step_s > 0 else float("nan"),
      "decode_step_mbytes": decode_step_bytes(cfg, args.batch, cache_len) / 1e6,
  }
  result["decode_gb_per_s"] = (result["decode_step_mbytes"] / 1e3 / step_s if step_s > 0
                               else float("nan"))
  if read_rate is not None:
    result["read"] = read_rate
    # The share of the bandwidth roofline reached: its bound step time / the measured step time.
    result["decode_bandwidth_utilisation"] = (result["decode_gb_per_s"]
                                              / result["read"]["gb_per_s"])
  if not args.skip_uncached:
    uncached = sampling.Sampler(graphdef, config, fn=sampling.sample_uncached, mesh=mesh, **ids)
    uncached_timing = measure({"uncached": lambda: uncached(params, prompts, mask, rng)},
                              max(1, min(args.runs, 3)), None)
    uncached_times = summary(uncached_timing["uncached"]["wall"])
    result["uncached"] = {**uncached_times,
                          "tokens_per_s": new_tokens / uncached_times["median_s"]}
    rows.append(phase_row("  uncached", uncached_timing["uncached"], 0, new_tokens,
                          "new tokens/s", None))
  out = finish("sampling", args, cfg, rows, probe, result)
  out["shape"].update(prompt_len=args.prompt_len, new_tokens=args.new_tokens)
  return out


# ---------------------------------------------------------------------------------------------
# ppo
# ---------------------------------------------------------------------------------------------

def ppo_layout(args: argparse.Namespace) -> common.Layout:
  """The trainer's layout on --devices devices, all on the data axis."""
  n = max(args.devices, 1)
  if jax.device_count() < n:
    raise SystemExit(f"--devices {n}: only {jax.device_count()} devices here")
  mesh = parallel.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, jax.devices()[:n])
  return common.Layout(mesh, parallel.DEFAULT_RULES)


def run_ppo(args: argparse.Namespace) -> dict[str, Any]:
  """One PPO-ptx iteration through the trainer's own jitted phases (`trainers.ppo.jit_phases`),
  at random parameters: responses run the full --ppo_new_tokens (no token is EOS)."""
  B, P, N = args.ppo_rollouts, args.ppo_prompt_len, args.ppo_new_tokens
  T = P + N
  ptx_seq = args.ptx_seq or T
  cfg = model_config(args, max(T, ptx_seq))
  layout = ppo_layout(args)
  ppo_cfg = ppo.PPOConfig(ppo_epochs=args.ppo_epochs, num_minibatches=args.ppo_minibatches,
                          ptx_coef=args.ptx_coef)
  schedule = sft.learning_rate_schedule(1e-5, 0, 1000, decay="constant")
  optimizers = {"policy": sft.make_optimizer(schedule), "value": sft.make_optimizer(schedule)}
  config = ml_collections.ConfigDict(dict(sampling=config_base.sampling_config(P, N)))
  never_ends = types.SimpleNamespace(eos_id=-1, pad_id=0)
  steps = args.ppo_epochs * args.ppo_minibatches

  with layout.scope():
    handles, params = {}, {}
    for name, model_cls, seed in (("policy", LanguageModel, 0), ("value", ScalarModel, 1),
                                  ("reward", ScalarModel, 2)):
      model_fn = lambda rngs, cls=model_cls: cls(cfg, rngs=rngs)
      handles[name] = workdirs.handle(model_fn, cfg, layout)
      params[name] = jax.device_put(split(model_fn(nnx.Rngs(seed)))[1],
                                    handles[name].param_shardings)
    models = ppo_trainer.Models(**handles)
    whole = parallel.replicated(layout.mesh)
    frozen = dict(reference=jax.tree.map(jnp.copy, params["policy"]), reward=params["reward"],
                  reward_gain=jax.device_put(jnp.float32(1.0), whole),
                  reward_bias=jax.device_put(jnp.float32(0.0), whole))
    _, shardings = ppo_trainer.state_shardings(models, optimizers, layout, ppo_cfg, seed=0)
    init = lambda p, v: ppo.init_state(p, v, optimizers, ppo_cfg, seed=0)
    state0 = jax.jit(init, out_shardings=shardings)(params["policy"], params["value"])
    phases = ppo_trainer.jit_phases(config, layout, models, frozen, shardings, optimizers,
                                    ppo_cfg, never_ends)

    rng = np.random.default_rng(0)
    rows = parallel.batch_sharding(layout.mesh, 2)
    prompts = jax.device_put(random_tokens(rng, (B, P), args.vocab), rows)
    prompt_mask = jax.device_put(jnp.ones((B, P), jnp.int32), rows)
    ptx = None
    if args.ptx_coef:
      # As many pretraining rows per optimiser step as rollout rows, of the rollout's length.
      ptx_tokens = random_tokens(rng, (steps, B // args.ppo_minibatches, ptx_seq), args.vocab)
      ptx = jax.device_put(dict(tokens=ptx_tokens, mask=jnp.ones_like(ptx_tokens),
                                loss_mask=jnp.ones_like(ptx_tokens)),
                           ppo_trainer.ptx_sharding(layout.mesh))

    # Compile every phase once, on the first rollout.
    start = time.perf_counter()
    sample = jax.block_until_ready(phases.rollout(state0["params"]["policy"], prompts,
                                                  prompt_mask, jax.random.PRNGKey(0)))
    rollout_compile_s = time.perf_counter() - start
    score_c, score_compile_s = compile_timed(phases.score, state0["params"], frozen, prompts,
                                             prompt_mask, sample, None)
    scored = score_c(state0["params"], frozen, prompts, prompt_mask, sample, None)
    advantage_c, advantage_compile_s = compile_timed(phases.advantage, scored,
                                                     state0["kl_coef"])
    ready, _ = advantage_c(scored, state0["kl_coef"])
    update_c, update_compile_s = compile_timed(phases.update, state0, ready, ptx)

  holder = {"state": state0}
  live = {}

  def do_rollout():
    policy = holder["state"]["params"]["policy"]
    live["sample"] = phases.rollout(policy, prompts, prompt_mask, jax.random.fold_in(
        jax.random.PRNGKey(0), holder["state"]["step"]))
    return live["sample"].tokens

  def do_score():
    scored = score_c(holder["state"]["params"], frozen, prompts, prompt_mask, live["sample"],
                     None)
    live["ready"], live["metrics"] = advantage_c(scored, holder["state"]["kl_coef"])
    return live["ready"]["advantages"]

  def do_update():
    holder["state"], update_metrics = update_c(holder["state"], live["ready"], ptx)
    return update_metrics["loss"]

  probe = make_probe(args, (B * T, cfg.d_model, cfg.d_ff))
  timing = measure({"rollout": do_rollout, "score": do_score, "update": do_update}, args.runs,
                   probe, args.profile)
  rollout_flops = (forward_flops(cfg, B * P, T, unembedded=B)
                   + (N - 1) * decode_step_flops(cfg, B, T))
  # policy and reference: logits at the N predicting positions; value and reward: scalar heads.
  score_flops = (2 * forward_flops(cfg, B * T, T, unembedded=B * N)
                 + 2 * forward_flops(cfg, B * T, T, scalar_positions=B * T))
  per_step_rows = B // args.ppo_minibatches
  update_flops = steps * 3 * (
      forward_flops(cfg, per_step_rows * T, T, unembedded=per_step_rows * N)
      + forward_flops(cfg, per_step_rows * T, T, scalar_positions=per_step_rows * T)
      + (forward_flops(cfg, per_step_rows * ptx_seq, ptx_seq,
                       unembedded=per_step_rows * ptx_seq) if ptx is not None else 0))
  total = {"wall": [sum(x) for x in zip(*(timing[p]["wall"] for p in timing))],
           "cpu": [sum(x) for x in zip(*(timing[p]["cpu"] for p in timing))]}
  compile_s = rollout_compile_s + score_compile_s + advantage_compile_s + update_compile_s
  rows = [phase_row("ppo", total, rollout_flops + score_flops + update_flops, B, "rollouts/s",
                    probe, compile_s),
          phase_row("  rollout", timing["rollout"], rollout_flops, B, "rollouts/s", probe,
                    rollout_compile_s),
          phase_row("  score", timing["score"], score_flops, B, "rollouts/s", probe,
                    score_compile_s + advantage_compile_s),
          phase_row("  update", timing["update"], update_flops, B, "rollouts/s", probe,
                    update_compile_s)]
  # The last timed rollout: how far the sampler's log-probs are from the score phase's.
  gap = {k: float(v) for k, v in jax.device_get(live["metrics"]).items()
         if k.startswith("sampler_")}
  out = finish("ppo", args, cfg, rows, probe,
               {"sampler_gap": gap, "ppo": dict(rollouts=B, prompt_len=P, new_tokens=N, epochs=args.ppo_epochs,
                            minibatches=args.ppo_minibatches, ptx_coef=args.ptx_coef,
                            ptx_rows_per_step=per_step_rows if ptx is not None else 0,
                            ptx_seq=ptx_seq if ptx is not None else 0)})
  return out


# ---------------------------------------------------------------------------------------------
# all: every stage in its own process
# ---------------------------------------------------------------------------------------------

def run_all(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
  passed = [a for a in argv if a != "all"]
  if args.json:  # each child writes its own file; drop the parent's --json
    i = passed.index("--json") if "--json" in passed else None
    passed = (passed[:i] + passed[i + 2:] if i is not None
              else [a for a in passed if not a.startswith("--json=")])
  stages = {}
  with tempfile.TemporaryDirectory() as tmp:
    for stage in STAGES:
      path = os.path.join(tmp, f"{stage}.json")
      command = [sys.executable, "-m", "experiments.benchmark", stage, *passed, "--json", path,
                 "--quiet"]
      subprocess.run(command, check=True, env=os.environ.copy(),
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      with open(path) as f:
        stages[stage] = json.load(f)
  return {"stage": "all", "stages": stages}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def format_bytes(n: int | None) -> str:
  return "-" if n is None else f"{n / 2**20:.0f} MiB"


def print_table(result: dict[str, Any]) -> None:
  results = list(result["stages"].values()) if result["stage"] == "all" else [result]
  first = results[0]
  print(f"backend {first['backend']} x{first['devices']}  shape {first['shape']}  "
        f"hugetlb={first['hugetlb']}  load average {first['load_average'][0]:.1f}")
  for r in results:
    if "matmul" in r:
      m = r["matmul"]
      print(f"  [{r['stage']}] matmul {m['dtype']}: large {m['large']['shape']} "
            f"{m['large']['gflops_per_s']:.1f} GFLOP/s ({m['large']['gflops_per_cpu_s']:.1f} per "
            f"CPU-s), model {m['model']['shape']} {m['model']['gflops_per_s']:.1f} GFLOP/s")
  header = (f"{'stage':<12}{'step ms':>10}{'(min-max)':>17}{'throughput':>22}{'compile s':>11}"
            f"{'peak mem':>11}{'GFLOP':>9}{'GFLOP/s':>9}{'MFU':>7}{'MFU cpu':>9}{'MFU best':>10}")
  print(header)
  print("-" * len(header))
  for r in results:
    for i, row in enumerate(r["rows"]):
      spread = f"({1e3 * row['min_s']:.0f}-{1e3 * row['max_s']:.0f})"
      compile_s = "-" if row.get("compile_s") is None else f"{row['compile_s']:.1f}"
      memory = format_bytes(r["peak_memory"]["bytes"]) if i == 0 else ""
      mfu = f"{100 * row['mfu']:.0f}%" if "mfu" in row else "-"
      mfu_cpu = f"{100 * row['mfu_cpu']:.0f}%" if "mfu_cpu" in row else "-"
      mfu_best = f"{100 * row['mfu_best']:.0f}%" if "mfu_best" in row else "-"
      throughput = f"{row['throughput']:,.0f} {row['unit']}"
      print(f"{row['stage']:<12}{1e3 * row['median_s']:>10.1f}{spread:>17}{throughput:>22}"
            f"{compile_s:>11}{memory:>11}{row['model_gflop']:>9.2f}{row['gflops_per_s']:>9.1f}"
            f"{mfu:>7}{mfu_cpu:>9}{mfu_best:>10}")
  for r in results:
    if r["stage"] == "reward":
      row = r["rows"][0]
      print(f"reward: K={r['k']}, {r['pairs_per_step']} pairs/step; as 2-sequence pairs "
            f"(pairwise trainers): {row['seq_pairs_per_s']:.1f} pairs/s")
    if r["stage"] == "sampling":
      line = (f"sampling: prefill {r['prefill_ms']:.1f} ms, decode step {r['decode_step_ms']:.2f}"
              f" ms ({r['decode_gflops_per_s']:.1f} GFLOP/s; reads {r['decode_step_mbytes']:.1f} "
              f"MB, {r['decode_gb_per_s']:.1f} GB/s")
      if "read" in r:
        line += (f" = {100 * r['decode_bandwidth_utilisation']:.0f}% of the measured read rate "
                 f"{r['read']['gb_per_s']:.1f} GB/s")
      line += ")"
      if "uncached" in r:
        line += (f"; KV cache speed-up over recompute "
                 f"{r['cached']['tokens_per_s'] / r['uncached']['tokens_per_s']:.1f}x")
      print(line)
    if r.get("sampler_gap"):
      g = r["sampler_gap"]
      print(f"ppo: sampler vs score-phase log-probs |diff| mean {g['sampler_logp_gap']:.2e}, max "
            f"{g['sampler_logp_gap_max']:.2e}; importance ratio pi_old / pi_sampler in "
            f"[{g['sampler_ratio_min']:.4f}, {g['sampler_ratio_max']:.4f}]")
    if "compile_s_by_layers" in r:
      by = ", ".join(f"{k} layers {v:.1f} s" for k, v in r["compile_s_by_layers"].items())
      print(f"sft step compile time (scan_unroll={r['shape']['scan_unroll']}): {by}")
  print(f"peak memory: {first['peak_memory']['kind']}; MFU = model FLOPs / step time / the "
        f"large matmul's rate; 'MFU cpu' uses process CPU time for both (robust to load); "
        f"'MFU best' the fastest step and probe sample (robust to slow spells)")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

SUBCOMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "sft": run_sft,
    "reward": run_reward,
    "sampling": run_sampling,
    "ppo": run_ppo,
}


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=[*SUBCOMMANDS, "all"])
  add_args(parser)
  parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse(argv)
  if args.command == "all":
    result = run_all(args, argv)
  else:
    with mesh_scope(args):
      result = SUBCOMMANDS[args.command](args)
  if not args.quiet:
    print_table(result)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  host.reexec("experiments.benchmark", sys.argv[1:], hugetlb="--no_hugetlb" not in sys.argv[1:],
              cpu_devices=parse(sys.argv[1:]).devices)
  main(sys.argv[1:])
