"""Where a traced step's device time goes: `python -m experiments.profile_summary DIR [--top 25]`.

DIR is a `jax.profiler.trace(DIR, create_perfetto_trace=True)` folder, e.g. what
`python -m experiments.benchmark sft --profile DIR` writes. The summary sums the durations of the
ops on the device's timelines (the processes named after a GPU or TPU; on a CPU, where XLA's ops
run on host threads, every timeline) by op name and by kind:

  matmul     cuBLAS / cuBLASLt GEMMs (nvjet_*), XLA's triton GEMMs, `dot` / `convolution` ops
  attention  cuDNN fused attention (flash) kernels
  copy       memcpy / memset / transposes / copies
  collective all-reduce, all-gather, reduce-scatter, NCCL
  fusion     everything else XLA fused (norms, softmax, activations, the optimizer)

It prints the kinds' shares of the traced time and the top ops, and with --json writes both.
The trace holds one round of the steps, so the times are per step of each traced phase.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import Any

KINDS = (
    ("attention", re.compile(r"cudnn|flash|fmha|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cublas|nvjet|matmul|\bdot\b|dot\.|dot_|convolution|wgmma|"
                          r"sm90_xmma|cutlass", re.I)),
    ("collective", re.compile(r"all-reduce|all_reduce|allreduce|all-gather|all_gather|"
                              r"reduce-scatter|reduce_scatter|nccl|collective", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
)
DEVICE_PROCESS = re.compile(r"/device:(GPU|TPU)", re.I)


def kind_of(name: str) -> str:
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return "fusion"


def find_trace(folder: str) -> str:
  """The newest Perfetto trace (perfetto_trace.json.gz) under `folder`."""
  paths = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise SystemExit(f"{folder}: no perfetto_trace.json.gz under it (trace with "
                     "create_perfetto_trace=True, e.g. experiments.benchmark --profile DIR)")
  return max(paths, key=os.path.getmtime)


def load_events(path: str) -> list[dict[str, Any]]:
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def device_op_times(events: list[dict[str, Any]]) -> tuple[dict[str, float], list[str]]:
  """Microseconds per op name on the device timelines, and the names of the timelines read. A
  CPU has no device timeline: there XLA's ops run on its host threads (named tf_XLA...), and
  the Python tracer's and the executor's own spans ($..., ThunkExecutor) are left out."""
  processes = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  devices = {pid for pid, name in processes.items() if DEVICE_PROCESS.search(name)}
  if devices:
    # A device's kernels are on its "Stream #..." threads; its "XLA Modules" / "XLA Ops" threads
    # repeat the same time as spans over whole programs and HLO ops.
    streams = {key for key, name in threads.items() if key[0] in devices and "Stream" in name}
    if streams:
      reads = lambda e: (e.get("pid"), e.get("tid")) in streams
      timelines = sorted(f"{processes[key[0]]} {threads[key]}" for key in streams)
    else:
      spans = {key for key, name in threads.items() if re.search(r"XLA Modules|XLA Ops|Steps",
                                                                   name)}
      reads = lambda e: e.get("pid") in devices and (e.get("pid"), e.get("tid")) not in spans
      timelines = sorted(processes[pid] for pid in devices)
  else:
    xla_threads = {key for key, name in threads.items() if "XLA" in name}
    reads = lambda e: (e.get("pid"), e.get("tid")) in xla_threads
    timelines = sorted(threads[key] for key in xla_threads)
  totals: dict[str, float] = collections.defaultdict(float)
  for e in events:
    name = e.get("name", "?")
    if (e.get("ph") == "X" and "dur" in e and reads(e) and not name.startswith("$")
        and not name.startswith("ThunkExecutor")):
      totals[name] += float(e["dur"])
  return dict(totals), timelines


def summarise(folder: str, top: int = 25) -> dict[str, Any]:
  path = find_trace(folder)
  totals, timelines = device_op_times(load_events(path))
  by_kind: dict[str, float] = collections.defaultdict(float)
  for name, us in totals.items():
    by_kind[kind_of(name)] += us
  total = sum(totals.values())
  ops = sorted(totals.items(), key=lambda item: -item[1])[:top]
  return {"trace": path, "timelines": timelines, "total_ms": total / 1e3,
          "kinds": {k: {"ms": v / 1e3, "share": v / total if total else 0.0}
                    for k, v in sorted(by_kind.items(), key=lambda item: -item[1])},
          "top_ops": [{"name": n, "ms": us / 1e3, "share": us / total if total else 0.0,
                       "kind": kind_of(n)} for n, us in ops]}


def print_summary(summary: dict[str, Any]) -> None:
  print(f"{summary['trace']}: {summary['total_ms']:.1f} ms of ops on "
        f"{len(summary['timelines'])} timeline(s)")
  print("  " + ", ".join(f"{kind} {100 * v['share']:.0f}% ({v['ms']:.1f} ms)"
                         for kind, v in summary["kinds"].items()))
  for op in summary["top_ops"]:
    print(f"  {op['ms']:9.2f} ms {100 * op['share']:5.1f}%  {op['kind']:<10} {op['name'][:90]}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m experiments.profile_summary",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("folder")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--json", default=None, help="also write the summary to this file")
  args = parser.parse_args(argv)
  summary = summarise(args.folder, args.top)
  print_summary(summary)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
