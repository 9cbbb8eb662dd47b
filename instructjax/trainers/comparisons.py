"""Synthetic comparison collection: InstructGPT's labelling loop, run locally.

The paper's reward-model data comes from labelers ranking K = 4..9 samples of the SFT policy
for one prompt. Here the SFT policy samples K responses per prompt (K drawn uniformly in
[data.min_k, data.max_k] for each prompt; the prompt is repeated K times in the sampling batch,
so all of them come from one batched call, not K calls) and the synthetic task's simulated
labeler ranks them (`SyntheticTask.rank`, seeded per prompt). The result is written as ranking
JSONL files into `<workdir>/comparisons/`, which then go through the same TFDS builder and
grain pipeline as a user's own ranking files.

Each record also keeps `gold_scores` (the task's gold score of every response), so evaluation
can measure the reward model's agreement with the gold ordering, not only with the noisy
labeler, and `ended` (whether each sample emitted EOS), so the reward model reads every
response as the policy emitted it — the one scoring rule PPO uses on its rollouts. Every
sample is kept, an empty one (EOS at once) too: it is the answer PPO can most easily collapse
to, so the reward model must see it ranked. A prompt whose responses all tie (e.g. all equal,
or all equally wrong) gives no pair and is skipped, and counted.

Collection runs once: the files and a `summary.json` (counts, timing, the settings they were
made with) are written atomically by process 0, and a re-run or a resumed run that finds them
reads them instead of sampling again. Finding files collected with other settings is an error
(use a fresh workdir), so a changed config never silently trains on stale comparisons.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from instructjax.data import formatting, rankings
from instructjax.data.synthetic import SyntheticTask
from instructjax.data.tokenizers import Tokenizer
from instructjax.errors import InputError
from instructjax.models.decoder import LanguageModel
from instructjax.trainers import common, generate, workdirs

COMPARISONS_DIR = "comparisons"
SUMMARY_FILE = "summary.json"
# The task split each file's prompts come from: "rm" is reserved for reward-model data and
# "eval" is disjoint from it in its (instruction, input) pairs.
TASK_SPLITS = {"train": "rm", "validation": "eval"}

class Sampled(NamedTuple):
  text: str     # as records store it (`Format.response_text`)
  ended: bool   # the sample emitted EOS


# prompts -> one response per prompt (a policy's samples, or the task's stand-in).
Responder = Callable[[Sequence[str]], list[Sampled]]


@dataclasses.dataclass
class Counts:
  """What collection made of one split's prompts."""
  prompts: int = 0
  responses: int = 0
  records: int = 0
  pairs: int = 0
  empty_responses: int = 0   # kept and ranked: the policy's immediate EOS
  truncated_responses: int = 0  # no EOS within max_new_tokens: scored without one
  all_tied_skipped: int = 0


# ----------------------------------------------------------------------------- ranking


def draw_ks(n: int, min_k: int, max_k: int, seed: int) -> np.ndarray:
  """K for each of `n` prompts, uniform in [min_k, max_k]."""
  check_k_range(min_k, max_k)
  return np.random.default_rng([seed, zlib.crc32(b"k per prompt")]).integers(
      min_k, max_k + 1, size=n)


def check_k_range(min_k: int, max_k: int) -> None:
  if not 2 <= min_k <= max_k:
    raise InputError("config.data.min_k/max_k", f"need 2 <= min_k <= max_k, got min_k={min_k}, "
                     f"max_k={max_k}")


def rank_prompt(task: SyntheticTask, prompt: str, responses: Sequence[Sampled],
                rng: np.random.Generator, counts: Counts) -> dict | None:
  """The labeler's ranking record of one prompt's responses, or None (counted) if it has no pair."""
  counts.prompts += 1
  counts.responses += len(responses)
  counts.empty_responses += sum(not r.text for r in responses)
  counts.truncated_responses += sum(not r.ended for r in responses)
  texts = [r.text for r in responses]
  ranks = task.rank(prompt, texts, rng)
  if len(set(ranks)) == 1:
    counts.all_tied_skipped += 1
    return None
  counts.records += 1
  counts.pairs += len(rankings.pairs(ranks))
  return {"prompt": prompt, "responses": texts, "ranks": ranks,
          "ended": [r.ended for r in responses],
          "gold_scores": [task.score(prompt, t) for t in texts]}


def make_rankings(task: SyntheticTask, prompts: Sequence[str], ks: Sequence[int],
                  respond: Responder, *, labeler_seed: int) -> tuple[list[dict], Counts]:
  """Samples ks[i] responses to prompts[i] in ONE call to `respond`, then ranks each prompt's.

  The labeler of prompt i draws from its own generator (labeler_seed, i), so a ranking does
  not depend on how many prompts came before it or on batching.
  """
  flat = [p for p, k in zip(prompts, ks) for _ in range(int(k))]
  texts = respond(flat)
  if len(texts) != len(flat):
    raise InputError("responder", f"returned {len(texts)} responses for {len(flat)} prompts")
  records, counts, start = [], Counts(), 0
  for i, (prompt, k) in enumerate(zip(prompts, ks)):
    rng = np.random.default_rng([labeler_seed, i])
    record = rank_prompt(task, prompt, texts[start:start + int(k)], rng, counts)
    start += int(k)
    if record is not None:
      records.append(record)
  return records, counts


# ----------------------------------------------------------------------------- responders


def policy_responder(config, layout: common.Layout, tokenizer: Tokenizer,
                     handle: common.ModelHandle, params, *, seed: int) -> Responder:
  """Samples of the policy at `config.sampling` (temperature, top-k/p) for a list of prompts,
  as records store responses (`Format.response_text`: the separator the policy emitted first
  is left to the join)."""
  s, fmt = config.sampling, formatting.from_config(config)
  sampler = common.sampler(handle, common.sampling_config(s), tokenizer, layout)

  def respond(prompts: Sequence[str]) -> list[str]:
    completions = generate.complete(sampler, params, tokenizer, prompts, jax.random.PRNGKey(seed),
                                    prompt_len=s.prompt_len, batch_size=s.batch_size,
                                    mesh=layout.mesh)
    return [Sampled(fmt.response_text(c.text), c.ended) for c in completions]
  return respond


def simulated_responder(task: SyntheticTask, *, seed: int) -> Responder:
  """The task's graded stand-in responses, for a run without an SFT policy (from scratch)."""
  def respond(prompts: Sequence[str]) -> list[str]:
    rng = np.random.default_rng([seed, zlib.crc32(b"simulated responses")])
    return [Sampled(task.simulated_response(p, rng), True) for p in prompts]
  return respond


# ----------------------------------------------------------------------------- files


def settings(config) -> dict:
  """What the collected comparisons depend on; stored with them and checked on reuse."""
  d, s = config.data, config.sampling
  return dict(init_from=config.init_from, seed=config.seed, task=config.synthetic.to_dict(),
              num_train_prompts=d.num_train_prompts, num_eval_prompts=d.num_eval_prompts,
              min_k=d.min_k, max_k=d.max_k, temperature=s.temperature, top_k=s.top_k,
              top_p=s.top_p, max_new_tokens=s.max_new_tokens, prompt_len=s.prompt_len,
              separator=formatting.from_config(config).separator)


def paths(workdir: str) -> dict[str, str]:
  directory = os.path.join(workdir, COMPARISONS_DIR)
  return {"train": os.path.join(directory, "train.jsonl"),
          "validation": os.path.join(directory, "eval.jsonl"),
          "summary": os.path.join(directory, SUMMARY_FILE)}


def read_summary(workdir: str, config) -> dict | None:
  """The summary of comparisons already collected in `workdir`, or None if there are none."""
  where = paths(workdir)
  if not all(os.path.isfile(p) for p in where.values()):
    return None
  with open(where["summary"]) as f:
    summary = json.load(f)
  want = json.loads(json.dumps(settings(config)))
  if summary.get("settings") != want:
    changed = sorted(k for k in want if summary.get("settings", {}).get(k) != want[k])
    raise InputError(where["summary"], f"comparisons in this workdir were collected with other "
                     f"settings (differ in {changed}); use a fresh --workdir or restore them")
  return summary


def collect(config, workdir: str, layout: common.Layout, tokenizer: Tokenizer,
            task: SyntheticTask, model_cfg) -> dict:
  """Collects train and held-out comparisons once; returns the summary (counts, seconds).

  Every process takes part in sampling (the sampler is sharded); process 0 writes.
  """
  summary = read_summary(workdir, config)
  if summary is not None:
    print(f"[{config.stage}] reusing comparisons in {workdir}/{COMPARISONS_DIR}", flush=True)
    return summary
  d = config.data
  check_k_range(d.min_k, d.max_k)
  start = time.perf_counter()
  if config.init_from:
    handle, params = workdirs.restore_model(config.init_from, LanguageModel, model_cfg, layout)
    respond = policy_responder(config, layout, tokenizer, handle, params, seed=config.seed)
    policy = f"samples of the SFT policy {config.init_from}"
  else:
    respond = simulated_responder(task, seed=config.seed)
    policy = "the synthetic task's simulated responses (no init_from)"
  records, counts = {}, {}
  for split, n, split_seed in (("train", d.num_train_prompts, 0),
                               ("validation", d.num_eval_prompts, 1)):
    prompts = task.prompts(n, TASK_SPLITS[split])
    ks = draw_ks(n, d.min_k, d.max_k, seed=config.seed * 2 + split_seed)
    records[split], counts[split] = make_rankings(
        task, prompts, ks, respond, labeler_seed=zlib.crc32(f"{config.seed}/{split}".encode()))
    if not records[split]:
      raise InputError(f"comparisons ({split})", f"only {len(records[split])} of {n} prompts gave "
                       f"a ranking with a pair ({counts[split]}); more prompts or a higher "
                       "sampling temperature")
  seconds = time.perf_counter() - start
  summary = dict(settings=settings(config), policy=policy, seconds=seconds,
                 **{split: dataclasses.asdict(c) for split, c in counts.items()})
  where = paths(workdir)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(where["summary"]), exist_ok=True)
    for split in ("train", "validation"):
      rankings.write_rankings(where[split], records[split])
    tmp = where["summary"] + ".tmp"
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
    os.replace(tmp, where["summary"])  # written last: its presence marks a finished collection
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("instructjax comparisons written")
  print(f"[{config.stage}] collected comparisons from {policy} in {seconds:.1f}s: "
        + "; ".join(f"{split} {c.records} rankings, {c.pairs} pairs, {c.all_tied_skipped} "
                    f"all-tied skipped, {c.empty_responses} empty and {c.truncated_responses} "
                    "truncated responses"
                    for split, c in counts.items()), flush=True)
  return summary


def flat_counts(summary: dict) -> dict[str, float]:
  """The summary's counts as metrics: comparisons_{split}_{count}."""
  out = {}
  for split, short in (("train", "train"), ("validation", "eval")):
    for key, value in summary.get(split, {}).items():
      out[f"comparisons_{short}_{key}"] = float(value)
  if "seconds" in summary:
    out["comparisons_seconds"] = float(summary["seconds"])
  return out
