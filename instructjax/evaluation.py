"""The statistics of InstructGPT's evaluation, as pure functions on arrays and metric records.

The paper compares GPT (zero-shot), GPT-prompted (few-shot), SFT, PPO and PPO-ptx by how often
labelers prefer each model's output to SFT's (Figure 1), by the reward model's score, by how far
each policy moved from SFT (KL), and by the "alignment tax": the loss on pretraining text. The
stand-alone evaluation (`instructjax/trainers/evaluate.py`) samples the models and calls these
functions; `instructjax/report.py` renders what they return.

Conventions:
  * Confidence intervals are two-sided at `confidence` (0.95 by default).
  * A mean's interval is the normal approximation mean +- z * s / sqrt(n), s the sample standard
    deviation (ddof = 1); with one value it has no width to estimate and is NaN.
  * A win rate compares two models' responses to the same prompts by one judge's score (`JUDGES`:
    the gold scorer, a held-out judge reward model, or the proxy reward model): a higher score
    is a win (1), an equal one a tie (1/2), a lower one a loss (0), and the win rate is the mean
    outcome, (wins + ties / 2) / n. Its interval is the Wilson score interval of that proportion
    over the n prompts. Counting a tie as half a success keeps the estimate unbiased; because a
    tie has less variance than a coin flip, the interval is slightly conservative when there are
    ties, and unlike the normal approximation it stays inside [0, 1] and keeps a width when every
    prompt is a win (or a loss).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from instructjax.errors import InputError

# The five models of the paper's Figure 1, in its order; keys of results and of the config.
MODELS = ("gpt", "gpt_prompted", "sft", "ppo", "ppo_ptx")
LABELS = {"gpt": "GPT", "gpt_prompted": "GPT-prompted", "sft": "SFT", "ppo": "PPO",
          "ppo_ptx": "PPO-ptx"}
BASELINE = "sft"

# What the PPO trainer logs, by what a plot needs; the first name a record has is used, so
# curves survive a renamed metric (or a trainer that logs only some of them).
CURVE_KEYS = {
    "gold_score": ("gold_score", "rollout_gold_score"),
    "rm_score": ("rm_score", "score"),
    "kl": ("kl", "kl_sequence"),
    "eval_gold_score": ("eval_gold_score",),
    "eval_ptx_loss": ("eval_ptx_loss",),
}


def z_value(confidence: float) -> float:
  """The standard normal quantile of a two-sided interval (1.96 at 0.95)."""
  if not 0.0 < confidence < 1.0:
    raise InputError("confidence", f"must be in (0, 1), got {confidence!r}")
  return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _values(values: Iterable[float], where: str) -> np.ndarray:
  array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, np.float64)
  array = array.reshape(-1)
  if array.size == 0:
    raise InputError(where, "needs at least one value")
  if not np.isfinite(array).all():
    bad = int((~np.isfinite(array)).sum())
    raise InputError(where, f"{bad} of {array.size} values are not finite")
  return array


def mean_ci(values: Iterable[float], confidence: float = 0.95,
            where: str = "values") -> dict[str, float]:
  """Mean with a normal-approximation interval: {mean, low, high, stderr, n}."""
  x = _values(values, where)
  mean = float(x.mean())
  stderr = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
  half = z_value(confidence) * stderr
  return dict(mean=mean, low=mean - half, high=mean + half, stderr=stderr, n=int(x.size))


def win_outcomes(scores: Sequence[float], baseline_scores: Sequence[float]) -> np.ndarray:
  """Per-prompt outcome of a model against the baseline: 1 win, 0.5 tie, 0 loss."""
  a = _values(scores, "scores")
  b = _values(baseline_scores, "baseline scores")
  if a.shape != b.shape:
    raise InputError("win rate", f"{a.size} scores against {b.size} baseline scores; both models "
                     "must answer the same prompts")
  return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson score interval of a proportion successes / n (successes may be fractional)."""
  if n < 1 or not 0.0 <= successes <= n:
    raise InputError("wilson interval", f"needs 0 <= successes <= n and n >= 1, got "
                     f"{successes} of {n}")
  z = z_value(confidence)
  p = successes / n
  denominator = 1.0 + z * z / n
  centre = (p + z * z / (2.0 * n)) / denominator
  half = z / denominator * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
  return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float],
             confidence: float = 0.95) -> dict[str, float]:
  """How often `scores` beat `baseline_scores` prompt by prompt, ties counting half.

  Returns {win_rate, low, high (Wilson interval), wins, ties, losses, n}.
  """
  outcomes = win_outcomes(scores, baseline_scores)
  wins, ties = int((outcomes == 1.0).sum()), int((outcomes == 0.5).sum())
  n = int(outcomes.size)
  low, high = wilson_interval(wins + 0.5 * ties, n, confidence)
  return dict(win_rate=float(outcomes.mean()), low=low, high=high, wins=wins, ties=ties,
              losses=n - wins - ties, n=n)


def sequence_log_ratio(logp: np.ndarray, ref_logp: np.ndarray,
                       response_mask: np.ndarray) -> np.ndarray:
  """Sum over each response's tokens of log pi - log pi_ref, [B].

  On responses sampled from pi its mean estimates KL(pi || pi_ref) per sequence (the k1
  estimator PPO penalises); a single sample may be negative.
  """
  logp, ref_logp = np.asarray(logp, np.float64), np.asarray(ref_logp, np.float64)
  real = np.asarray(response_mask) > 0
  if logp.shape != ref_logp.shape or logp.shape != real.shape:
    raise InputError("log ratio", f"logp {logp.shape}, ref_logp {ref_logp.shape} and mask "
                     f"{real.shape} must have the same [batch, tokens] shape")
  return np.where(real, logp - ref_logp, 0.0).sum(-1)


# ------------------------------------------------------------------------------------------------
# Summaries of the per-prompt results.


# Who judges a response, in the order that picks a report's headline: the synthetic task's gold
# scorer when the prompts are the task's; otherwise the held-out judge RM (trained on comparisons
# the proxy RM never saw, as the paper's held-out labelers) when the run has one; otherwise the
# proxy RM PPO optimised, whose win rate a policy can earn by gaming it.
JUDGES = {"gold": "the gold scorer",
          "judge": "the held-out judge reward model",
          "rm": "the reward model PPO optimised (a proxy)"}


def summarise_model(outputs: Mapping[str, Any], baseline: Mapping[str, Any] | None,
                    confidence: float = 0.95) -> dict[str, Any]:
  """One model's row of the report from its per-prompt arrays.

  outputs: per judge of `JUDGES` it has, [n] scores ("gold" gold scores, "judge" and "rm"
  normalised reward-model scores); optionally "kl" [n] sequence log-ratios against SFT,
  "pretraining_loss" (a float), "ended" [n] and "lengths" [n]. baseline: the SFT model's outputs
  (what wins are counted against, judge by judge), or None without SFT.

  The row has `<judge>_score` (mean and interval) per judge, `win_rates_vs_sft` {judge: win
  rate} and the headline `win_rate_vs_sft`, the first judge's of `JUDGES` (`headline_judge`).
  """
  row: dict[str, Any] = {}
  for judge in JUDGES:
    if outputs.get(judge) is None:
      continue
    row[f"{judge}_score"] = mean_ci(outputs[judge], confidence, f"{judge} scores")
    if baseline is not None and baseline.get(judge) is not None:
      row.setdefault("win_rates_vs_sft", {})[judge] = win_rate(outputs[judge], baseline[judge],
                                                               confidence)
  if row.get("win_rates_vs_sft"):
    row["headline_judge"] = next(iter(row["win_rates_vs_sft"]))
    row["win_rate_vs_sft"] = row["win_rates_vs_sft"][row["headline_judge"]]
  if outputs.get("kl") is not None:
    row["kl_from_sft"] = mean_ci(outputs["kl"], confidence, "KL from SFT")
  if outputs.get("pretraining_loss") is not None:
    row["pretraining_loss"] = float(outputs["pretraining_loss"])
  for key, name in (("ended", "ended_fraction"), ("lengths", "response_length")):
    if outputs.get(key) is not None:
      row[name] = float(np.mean(outputs[key]))
  for key in ("prompts_truncated", "workdir", "checkpoint_step"):
    if outputs.get(key) is not None:
      row[key] = outputs[key]
  return row


def summarise(per_model: Mapping[str, Mapping[str, Any]],
              confidence: float = 0.95) -> dict[str, dict[str, Any]]:
  """Rows of every evaluated model, in the paper's order; win rates need an "sft" entry."""
  unknown = sorted(set(per_model) - set(MODELS))
  if unknown:
    raise InputError("models", f"unknown {unknown}; expected some of {list(MODELS)}")
  baseline = per_model.get(BASELINE)
  return {name: dict(label=LABELS[name], **summarise_model(per_model[name], baseline, confidence))
          for name in MODELS if name in per_model}


# ------------------------------------------------------------------------------------------------
# Metric records (read with `instructjax.metrics.read_metrics`).


def _first_present(record: Mapping[str, Any], names: Sequence[str]) -> float | None:
  for name in names:
    value = record.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  return None


def training_curves(records: Sequence[Mapping[str, Any]],
                    keys: Mapping[str, Sequence[str]] = CURVE_KEYS) -> dict[str, list[list[float]]]:
  """[[step, value], ...] per curve, from metric records; a key no record has is left out.

  A resumed run logs the steps after its last checkpoint twice; the later value wins.
  """
  curves = {}
  for curve, names in keys.items():
    by_step = {}
    for record in records:
      value = _first_present(record, names)
      if value is not None:
        by_step[int(record["step"])] = value
    if by_step:
      curves[curve] = [[step, by_step[step]] for step in sorted(by_step)]
  return curves


def paired(curves: Mapping[str, Sequence[Sequence[float]]], x: str, y: str) -> list[list[float]]:
  """[[x, y], ...] at the steps both curves have (e.g. RM score against KL)."""
  if x not in curves or y not in curves:
    return []
  ys = {step: value for step, value in curves[y]}
  return [[value, ys[step]] for step, value in curves[x] if step in ys]


def reward_model_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
  """The reward model's last held-out evaluation: accuracy against the labeler and the gold
  ordering, next to the labeler ceiling it was measured against; None if it has none."""
  names = ("eval_accuracy", "eval_gold_accuracy", "labeler_ceiling", "labeler_ceiling_reference",
           "eval_loss", "eval_pairs")
  for record in reversed(records):
    if "eval_accuracy" in record:
      summary = {name: float(record[name]) for name in names if name in record}
      summary["step"] = int(record["step"])
      return summary
  return None


def _ordered_right(reward_a: float, reward_b: float, a_is_better: bool) -> float:
  """1 if the rewards order the pair like the reference, 1/2 for equal rewards, else 0."""
  margin = (reward_a - reward_b) * (1.0 if a_is_better else -1.0)
  return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


def pair_accuracy_by_kind(pairs: Iterable[tuple[str, float, float, float, float, int, int]],
                          ceiling: Callable[[Sequence[float]], float]
                          ) -> dict[str, dict[str, float]]:
  """A reward model's held-out pair accuracy broken down by what differs between the responses.

  pairs: (kind, reward_a, reward_b, gold_a, gold_b, rank_a, rank_b) for pairs of held-out
  rankings (rank 0 = best). Pairs with equal gold scores are left out; the simulated labeler ties
  exactly those, so the rest are the labeler's pairs too. A pair is right when the rewards order
  it like the reference (the gold score, or the labeler's ranks); an equal reward counts half,
  as in the training metric. `ceiling(gaps)` is the labeler's expected agreement with the gold
  order on pairs with those gold gaps: the best labeler accuracy any model can expect on them.
  Returns {kind: {pairs, gold_accuracy, labeler_accuracy, labeler_ceiling}}, with an "all"
  entry; kinds without pairs are left out.
  """
  by_kind: dict[str, list[tuple[float, float, float]]] = {}
  for kind, reward_a, reward_b, gold_a, gold_b, rank_a, rank_b in pairs:
    if gold_a == gold_b:
      continue
    entry = (_ordered_right(reward_a, reward_b, gold_a > gold_b),
             _ordered_right(reward_a, reward_b, rank_a < rank_b), abs(gold_a - gold_b))
    for key in (kind, "all"):
      by_kind.setdefault(key, []).append(entry)
  out = {}
  for kind, entries in by_kind.items():
    gold_right, labeler_right, gaps = zip(*entries)
    out[kind] = dict(pairs=len(entries), gold_accuracy=float(np.mean(gold_right)),
                     labeler_accuracy=float(np.mean(labeler_right)),
                     labeler_ceiling=float(ceiling(gaps)))
  return out


def pair_accuracy_by_k(rankings: Iterable[tuple[Sequence[int], Sequence[float]]]
                       ) -> dict[str, dict[str, float]]:
  """A reward model's pair accuracy on held-out rankings, by K (the number of responses ranked).

  rankings: (ranks, rewards) per ranking (rank 0 = best; ties give no pair, `rankings.pairs`).
  A pair is right when the reward orders it like the ranks; an equal reward counts half, as in
  the training metric. Returns {str(K): {rankings, pairs, accuracy}} with an "all" entry;
  rankings without a pair count in `rankings` only.
  """
  from instructjax.data.rankings import pairs as ranked_pairs
  by_k: dict[str, list] = {}
  for ranks, rewards in rankings:
    right = [_ordered_right(rewards[w], rewards[l], True) for w, l in ranked_pairs(ranks)]
    for key in (str(len(ranks)), "all"):
      entry = by_k.setdefault(key, [0, []])
      entry[0] += 1
      entry[1].extend(right)
  return {key: dict(rankings=count, pairs=len(right),
                    accuracy=float(np.mean(right)) if right else math.nan)
          for key, (count, right) in sorted(by_k.items(),
                                            key=lambda item: (item[0] == "all", len(item[0]),
                                                              item[0]))}
