"""The reward-model stage (InstructGPT step 2): comparisons in, a normalised scalar reward out.

  data     synthetic: sample K responses per prompt from the SFT policy and rank them with the
           task's simulated labeler (`comparisons.py`), written as ranking JSONL; or files:
           the user's ranking JSONL. Both -> TFDS "rankings" build -> grain ranking pipeline
           ("kway": one element per prompt with all its pairs, or the "pairwise" ablation).
  model    a ScalarModel whose backbone is the SFT model's (`init_from`), sharded like the LM.
  loop     the shared supervised loop with `objectives.reward.train_step`; held-out pair
           accuracy (overall and per K), loss, reward mean/std; on the synthetic task also the
           accuracy against the gold ordering and the labeler's ceiling.
  output   checkpoints, and after the last step the normalisation (gain, bias) that gives the
           SFT policy's samples on the PPO prompts reward mean 0 and std 1, fitted once the
           final checkpoint is on disk and stored in `<workdir>/reward_normalisation.json`.

PPO reads the result with `workdirs.load_reward_model(workdir, layout)`: the ScalarModel's graph,
its parameters restored onto that layout's shardings, the model config, and gain and bias;
the reward PPO uses is `gain * r + bias` (`objectives.reward.apply_normalisation`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from instructjax import parallel
from instructjax.data import formatting, ranking_batches, rankings, records
from instructjax.data.records import iter_jsonl, write_jsonl
from instructjax.data.builders import rankings as rankings_builder
from instructjax.data.synthetic import SyntheticTask
from instructjax.errors import InputError
from instructjax.models.decoder import LanguageModel, ScalarModel
from instructjax.objectives import reward
from instructjax.trainers import common, comparisons, data_sources, loop, workdirs
from instructjax.trainers.data_sources import synthetic_task

NORMALISATION_FILE = workdirs.NORMALISATION_FILE


# ----------------------------------------------------------------------------- data


def check_files(paths: Sequence[str], *, max_k: int, on_bad: str) -> rankings.Stats:
  """Validates ranking files before building: errors name file:line, skips are counted.

  A ranking of more than `max_k` responses is an error whatever `on_bad` says: it is a config
  mismatch (raise data.max_k), not a bad record to leave out.
  """
  rankings.check_on_bad(on_bad)
  stats = rankings.Stats()
  for path in paths:
    for where, value in iter_jsonl(path):
      stats.read += 1
      try:
        rankings.validate_ranking(value, where, max_k=max_k)
      except rankings.RankingProblem as e:
        if on_bad == "error" or e.reason == "too_many_responses":
          raise
        stats.skipped[e.reason] += 1
        continue
      stats.written += 1
  if stats.skipped:
    print(f"[reward] skipping {sum(stats.skipped.values())} bad rankings: {stats}", flush=True)
  return stats


def in_share(prompt: str, share: Sequence[float]) -> bool:
  """Whether `prompt` belongs to the [low, high) share of prompts: sha256 of the prompt, salted
  so that the share is independent of prepare_data's split into sets, read as a number in
  [0, 1)."""
  digest = hashlib.sha256(("rm share\0" + prompt).encode("utf-8")).digest()
  low, high = share
  return low <= int.from_bytes(digest[:8], "big") / 2.0 ** 64 < high


def whole_share(share: Sequence[float]) -> bool:
  return tuple(share) == (0.0, 1.0)


def check_share(share) -> None:
  if (len(share) != 2 or not all(isinstance(x, (int, float)) for x in share)
      or not 0.0 <= share[0] < share[1] <= 1.0):
    raise InputError("config.data.prompt_share", f"must be (low, high) with 0 <= low < high <= "
                     f"1, got {tuple(share)}")


def _write_share(paths: Sequence[str], share, workdir: str) -> list[str]:
  """The training rankings whose prompt is in `share`, written (process 0) to
  `<workdir>/data/share-LOW-HIGH.jsonl` in the order read."""
  out = os.path.join(workdir, "data", f"share-{share[0]:g}-{share[1]:g}.jsonl")
  kept = [value for path in paths for _, value in iter_jsonl(path)  # bad ones were counted
          if isinstance(value, dict) and isinstance(value.get("prompt"), str)
          and in_share(value["prompt"], share)]
  if not kept:
    raise InputError("config.data.prompt_share", f"{tuple(share)} keeps none of the training "
                     f"rankings of {', '.join(paths)}")
  if jax.process_index() == 0:
    write_jsonl(out, kept)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("instructjax ranking share written")
  print(f"[reward] data.prompt_share {tuple(share)}: {len(kept)} training rankings", flush=True)
  return [out]


def _sources_from_files(config, workdir: str) -> tuple[dict[str, list[str]], rankings.Stats]:
  d = config.data
  paths = {"train": data_sources.split_paths(d.train_files, "config.data.train_files")}
  if not paths["train"]:
    raise InputError("config.data.train_files", "source=files needs at least one ranking file")
  if d.eval_files:
    paths["validation"] = data_sources.split_paths(d.eval_files, "config.data.eval_files")
  stats = check_files([p for split in paths.values() for p in split], max_k=d.max_k,
                      on_bad=d.on_bad)
  if not whole_share(d.prompt_share):
    paths["train"] = _write_share(paths["train"], d.prompt_share, workdir)
  return paths, stats


def ranking_sources(config, workdir: str, paths: dict[str, list[str]], on_bad: str) -> dict:
  """Random-access train/validation sources of the TFDS "rankings" build (process 0 builds)."""
  tfds.disable_progress_bar()
  tfds_dir = os.path.join(workdir, "data", "tfds")
  if jax.process_index() == 0:
    sources = rankings_builder.build(paths, tfds_dir, on_bad=on_bad)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("instructjax rankings built")
  if jax.process_index() != 0:
    sources = rankings_builder.build(paths, tfds_dir, on_bad=on_bad)
  if "validation" not in sources:
    raise InputError("config.data.eval_files", "no held-out split could be made from the "
                     "training rankings (a single record); give --config.data.eval_files")
  return sources


def check_data_config(config) -> None:
  d = config.data
  if d.mode not in ranking_batches.RANKING_MODES:
    raise InputError("config.data.mode", f"{d.mode!r} is not one of {ranking_batches.RANKING_MODES}")
  if d.source not in ("synthetic", "files"):
    raise InputError("config.data.source", f"{d.source!r} is not 'synthetic' or 'files'")
  rankings.check_on_bad(d.on_bad)
  comparisons.check_k_range(d.min_k, d.max_k)
  check_share(d.prompt_share)
  if d.source == "synthetic" and not whole_share(d.prompt_share):
    raise InputError("config.data.prompt_share", "applies to ranking files (source=files); "
                     "synthetic comparisons are collected per run")
  if d.source == "files":
    data_sources.check_files(config, "data.train_files", "data.eval_files")
  if config.normalisation_files:
    data_sources.split_paths(config.normalisation_files, "config.normalisation_files")


def check_settings(config, layout: common.Layout, model_cfg, trained=None) -> None:
  """Every setting the stage uses after step 0, checked before it (and before any comparison is
  collected): the data section, the rows fit the model, the batch fits the mesh, the cadence,
  and what the end of the run needs — the normalisation samples the SFT policy (`init_from`,
  whose architecture `model_cfg` is) with `config.sampling` and scores the samples in batches of
  `sampling.batch_size`. Synthetic comparisons sample the same policy the same way."""
  del trained  # the policy sampled is the one `model_cfg` describes
  from instructjax.trainers import stages
  check_data_config(config)
  common.check_seq_len(model_cfg, config.data.seq_len)
  parallel.check_global_batch(config.batch_size, layout.mesh, rules=layout.rules)
  loop.check_cadence(config)
  if config.init_from and (config.normalise or config.data.source == "synthetic"):
    stages.check_sampling(config.sampling, layout, model_cfg)  # its batch size too
  elif config.normalise:  # scores the training rankings' responses in sampling.batch_size rows
    parallel.check_global_batch(config.sampling.batch_size, layout.mesh,
                                "config.sampling.batch_size", rules=layout.rules)
  if config.normalise:
    if config.normalisation_prompts < 1:
      raise InputError("config.normalisation_prompts",
                       f"must be >= 1 to fit the normalisation, got {config.normalisation_prompts}")


def mean_pairs(source) -> float:
  """Average comparisons per training element (for the pairs/s throughput)."""
  total = sum(len(rankings.pairs(ranking_batches.ranking_record(source[i])["ranks"]))
              for i in range(len(source)))
  return total / max(len(source), 1)


def gold_gaps(source) -> np.ndarray:
  """|gold(w) - gold(l)| of every labeler pair of records that carry gold scores."""
  gaps = []
  for i in range(len(source)):
    record = ranking_batches.ranking_record(source[i])
    gold = record.get("gold_scores")
    if gold is not None:
      gaps += [abs(gold[w] - gold[l]) for w, l in rankings.pairs(record["ranks"])]
  return np.asarray(gaps, np.float64)


@dataclasses.dataclass
class RankingData:
  """What the loop needs of the data: iterators, and host-side facts about the comparisons."""
  train_ds: Any
  eval_data_fn: Callable[[], Any]
  train_source: Any
  task: SyntheticTask | None      # the synthetic task when the data came from it
  pairs_per_element: float        # comparisons per training element, for pairs/s
  ceiling: dict[str, float]       # labeler ceiling(s) on the held-out pairs
  host_counts: dict[str, float]   # collection and skip counts, logged with every step


def datasets(config, workdir: str, layout: common.Layout, tokenizer, model_cfg,
             local_batch: int) -> RankingData:
  """Collects (synthetic) or checks (files) the rankings, builds them, and makes the pipelines."""
  d = config.data
  task, file_stats, collected = None, rankings.Stats(), {}
  if d.source == "synthetic":
    task = synthetic_task(config)
    collected = comparisons.collect(config, workdir, layout, tokenizer, task, model_cfg)
    where = comparisons.paths(workdir)
    paths, on_bad = {"train": [where["train"]], "validation": [where["validation"]]}, "error"
  else:
    paths, file_stats = _sources_from_files(config, workdir)
    on_bad = d.on_bad
  sources = ranking_sources(config, workdir, paths, on_bad)
  kwargs = dict(seq_len=d.seq_len, max_prompt_len=d.max_prompt_len, max_k=d.max_k,
                batch_size=local_batch, process_index=jax.process_index(),
                process_count=jax.process_count(), fmt=formatting.from_config(config))
  train_ds = ranking_batches.ranking_dataset(sources["train"], tokenizer, seed=config.seed,
                                             mode=d.mode, **kwargs)
  # Evaluation is K-way in both modes, so the ablation's two arms are measured alike.
  eval_data_fn = lambda: iter(ranking_batches.ranking_eval_dataset(sources["validation"],
                                                                   tokenizer, **kwargs))
  return RankingData(
      train_ds=train_ds, eval_data_fn=eval_data_fn, train_source=sources["train"], task=task,
      pairs_per_element=1.0 if d.mode == "pairwise" else mean_pairs(sources["train"]),
      ceiling=labeler_ceiling(task, sources["validation"]),
      host_counts=dict(comparisons.flat_counts(collected),
                       skipped_records=float(sum(file_stats.skipped.values()))))


# ----------------------------------------------------------------------------- state and steps


def build_model_state(config, layout: common.Layout, model_cfg, optimizer):
  """Graph definition, abstract sharded state and an initialiser of a fresh ScalarModel state."""
  return common.supervised_state(config.seed, layout,
                                 lambda rngs: ScalarModel(model_cfg, rngs=rngs), optimizer)


def eval_sums(params, batch, *, graphdef):
  """Summed held-out statistics against the labeler's ranks and against the gold ordering."""
  rewards = reward.reward_forward(params, graphdef, batch["tokens"], batch["mask"])
  _, aux = reward.ranking_loss(rewards, batch["ranks"], batch["valid"])
  _, gold = reward.ranking_loss(rewards, batch["gold_ranks"], batch["gold_valid"])
  return dict(aux, gold_correct=gold["correct"], gold_pairs=gold["pairs"])


def jit_steps(graphdef, optimizer, schedule, shardings, layout, use_dropout: bool):
  train = functools.partial(reward.train_step, graphdef=graphdef, optimizer=optimizer,
                            schedule=schedule, use_dropout=use_dropout)
  return common.jit_supervised(train, functools.partial(eval_sums, graphdef=graphdef), shardings,
                               layout)


def run_eval(evaluate, params, eval_data_fn: Callable, layout, max_batches: int,
             ceiling: dict[str, float]) -> dict[str, float]:
  """Held-out ranking metrics (`reward.eval_metrics`) plus gold accuracy and the ceiling."""
  sums: dict[str, Any] = {}
  for i, local in enumerate(eval_data_fn()):
    if max_batches and i >= max_batches:
      break
    out = jax.device_get(evaluate(params, parallel.global_batch(local, layout.mesh)))
    for key, value in out.items():
      sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)
  metrics = reward.eval_metrics(sums)
  if float(sums["gold_pairs"]) > 0:
    metrics["eval_gold_accuracy"] = float(sums["gold_correct"] / sums["gold_pairs"])
  metrics.update(ceiling)
  return metrics


def labeler_ceiling(task: SyntheticTask | None, eval_source) -> dict[str, float]:
  """The best held-out accuracy any reward model can expect against the simulated labeler.

  `labeler_ceiling` is exact for the held-out pairs' gold-score gaps; `labeler_ceiling_reference`
  is the task's figure on its calibration pairs. Empty for data without gold scores.
  """
  if task is None:
    return {}
  gaps = gold_gaps(eval_source)
  if not (gaps > 0).any():
    return {}
  return dict(labeler_ceiling=task.labeler_agreement_ceiling(gaps),
              labeler_ceiling_reference=task.labeler_agreement_ceiling())


# ----------------------------------------------------------------------------- normalisation


def response_rows(tokenizer, fmt: formatting.Format, prompts: Sequence[str],
                  responses: Sequence[str], ended: Sequence[bool], *, seq_len: int,
                  max_prompt_len: int) -> dict[str, np.ndarray]:
  """tokens/mask [N, 1, T] of each (prompt, response) as training reads it
  (`ranking_batches.scored_rows`: EOS only where the response ended)."""
  tokens = np.full([len(prompts), 1, seq_len], tokenizer.pad_id, np.int32)
  mask = np.zeros([len(prompts), 1, seq_len], np.int32)
  for i, (prompt, response, done) in enumerate(zip(prompts, responses, ended, strict=True)):
    [row] = ranking_batches.scored_rows(tokenizer, fmt, prompt, [response], seq_len=seq_len,
                                        max_prompt_len=max_prompt_len, ended=[done])
    tokens[i, 0, :len(row)] = row
    mask[i, 0, :len(row)] = 1
  return {"tokens": tokens, "mask": mask}


def score_texts(params, graphdef, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                seq_len: int, max_prompt_len: int, batch_size: int, layout,
                fmt: formatting.Format, ended: Sequence[bool] | None = None) -> np.ndarray:
  """The reward model's raw reward of each (prompt, response), in fixed-shape batches, read by
  the one scoring rule (`ranking_batches.scored_rows`): the pair joined by `fmt`, an EOS after
  each response that `ended` (all when None: written responses are complete).

  Every process passes all the texts; each feeds its share of every batch to the global one.
  """
  score = jax.jit(lambda p, t, m: reward.reward_forward(p, graphdef, t, m))
  n_proc, index = jax.process_count(), jax.process_index()
  ended = [True] * len(responses) if ended is None else list(ended)
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = slice(start, start + batch_size)
    rows = response_rows(tokenizer, fmt, prompts[chunk], responses[chunk], ended[chunk],
                         seq_len=seq_len, max_prompt_len=max_prompt_len)
    n = len(rows["tokens"])
    # A full batch every time: one compile, and it divides over the batch shards.
    rows = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)])
            for k, v in rows.items()}
    per = batch_size // n_proc
    local = {k: v[index * per:(index + 1) * per] for k, v in rows.items()}
    with layout.scope():
      batch = parallel.global_batch(local, layout.mesh)
      rewards = score(params, batch["tokens"], batch["mask"])
    host = (jax.device_get(rewards) if n_proc == 1
            else multihost_utils.process_allgather(rewards, tiled=True))
    out.append(np.asarray(host)[:n, 0])
  return np.concatenate(out) if out else np.zeros([0])


def reference_samples(config, layout, tokenizer, model_cfg, task, train_source):
  """(prompts, responses, ended, description) of the reference set the normalisation is fitted
  on; `ended` says which responses emitted EOS (the scoring rule's input).

  By default: one sample of the SFT policy per PPO prompt (the synthetic task's "ppo" split, or
  the training rankings' prompts for files). Without a policy (no init_from): the responses
  of the training rankings.
  """
  n = config.normalisation_prompts
  if config.init_from:
    if config.normalisation_files:
      paths = data_sources.split_paths(config.normalisation_files, "config.normalisation_files")
      prompts = [r["prompt"] for path in paths for r in records.read_prompts(path)][:n]
      where = f"{len(prompts)} prompts of {', '.join(paths)}"
    elif task is not None:
      prompts = task.prompts(n, "ppo")
      where = f"{n} prompts of the synthetic 'ppo' split"
    else:
      seen = dict.fromkeys(ranking_batches.ranking_record(train_source[i])["prompt"]
                           for i in range(len(train_source)))
      prompts = list(seen)[:n]
      where = f"{len(prompts)} prompts of the training rankings"
    handle, params = workdirs.restore_model(config.init_from, LanguageModel, model_cfg, layout)
    respond = comparisons.policy_responder(config, layout, tokenizer, handle, params,
                                           seed=config.seed + 1)
    samples = respond(prompts)
    return (prompts, [s.text for s in samples], [s.ended for s in samples],
            f"SFT policy samples for {where}")
  prompts, responses, ended = [], [], []
  for i in range(len(train_source)):
    record = ranking_batches.ranking_record(train_source[i])
    done = record.get("ended") or [True] * len(record["responses"])
    for response, response_ended in zip(record["responses"], done):
      if len(prompts) < n:
        prompts.append(record["prompt"])
        responses.append(response)
        ended.append(response_ended)
  return (prompts, responses, ended,
          f"{len(prompts)} responses of the training rankings (no init_from)")


def fit_normalisation(config, layout, tokenizer, model_cfg, task, train_source, params,
                      graphdef) -> dict[str, Any]:
  """gain and bias that give the reference set reward mean 0 and std 1, and what it was."""
  prompts, responses, ended, description = reference_samples(config, layout, tokenizer, model_cfg,
                                                             task, train_source)
  rewards = score_texts(params, graphdef, tokenizer, prompts, responses,
                        seq_len=config.data.seq_len, max_prompt_len=config.data.max_prompt_len,
                        batch_size=config.sampling.batch_size, layout=layout,
                        fmt=formatting.from_config(config), ended=ended)
  gain, bias = reward.normalisation(rewards)
  result = dict(gain=gain, bias=bias, reference=description, reference_size=len(rewards),
                raw_mean=float(rewards.mean()), raw_std=float(rewards.std()))
  return result


# ----------------------------------------------------------------------------- entry points


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the reward-model stage in `workdir`; returns the final metrics."""
  layout = common.Layout.from_config(config)
  tokenizer = common.tokenizer_from_config(config)
  model_cfg = common.model_config(config, tokenizer)
  check_settings(config, layout, model_cfg)
  local_batch = parallel.check_global_batch(config.batch_size, layout.mesh, rules=layout.rules)
  schedule, optimizer = common.make_optimizer(config.optimizer, config.steps)
  if not config.init_from:
    print("[reward] WARNING: no config.init_from: the reward model starts from scratch, not from "
          "an SFT model (and synthetic comparisons use the task's simulated responses)",
          flush=True)
  data = datasets(config, workdir, layout, tokenizer, model_cfg, local_batch)
  task = data.task

  with layout.scope():
    graphdef, abstract, shardings, init = build_model_state(config, layout, model_cfg, optimizer)
    train_step, eval_step = jit_steps(graphdef, optimizer, schedule, shardings, layout,
                                      use_dropout=model_cfg.dropout > 0)
    ckpt = loop.checkpointer(config, workdir)
    data_iter = iter(data.train_ds)

    def create():
      state = common.create_sharded(init, shardings)
      if config.init_from:
        _, sft_params = workdirs.restore_model(config.init_from, LanguageModel, model_cfg, layout)
        params = reward.init_from_sft(sft_params, state["params"])
        state = dict(state, params=jax.device_put(params, shardings["params"]))
        print(f"[{config.stage}] backbone initialised from {config.init_from}", flush=True)
      return state

    state, _ = loop.restore_or_init(config.stage, ckpt, abstract, create, data_iter)
    common.save_config(workdir, config, model_cfg)

    def final_eval(state) -> dict[str, float]:
      if not config.normalise:
        return {}
      result = fit_normalisation(config, layout, tokenizer, model_cfg, task, data.train_source,
                                 state["params"], graphdef)
      common.save_json(os.path.join(workdir, NORMALISATION_FILE), result)
      print(f"[{config.stage}] reward normalisation gain={result['gain']:.4g} "
            f"bias={result['bias']:.4g} on {result['reference']}", flush=True)
      return dict(normalisation_gain=result["gain"], normalisation_bias=result["bias"],
                  reference_reward_mean=result["raw_mean"],
                  reference_reward_std=result["raw_std"])

    return loop.train_loop(
        config, workdir, state=state, step_fn=loop.batch_steps(train_step, data_iter, layout),
        data_state=data_iter, ckpt=ckpt,
        evaluate=lambda state: run_eval(eval_step, state["params"], data.eval_data_fn, layout,
                                        config.eval_batches, data.ceiling),
        final_eval=final_eval,
        items_per_step=("pairs_per_second", config.batch_size * data.pairs_per_element),
        host_metrics=lambda _: data.host_counts)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The entry for `experiments.run` (config.stage == "reward")."""
  return train(config, workdir)
