"""The evaluation report: report.json (everything), report.md (tables) and PNG plots.

`write_report(workdir, results, curves)` takes what `instructjax/trainers/evaluate.py` computes:

  results  {"settings": {...}, "models": {name: row of `evaluation.summarise`},
            "skipped": {name: why}, "reward_model": {...} (optional),
            "examples": [{"prompt", "responses": {name: text}}] (optional)}
  curves   {run name ("ppo", "ppo_ptx"): `evaluation.training_curves` of its metrics.jsonl}

Rendering is a pure function of those dicts (`render_markdown`); each plot is drawn only when
its data exists, and report.md links only the plots that were drawn. Matplotlib runs on the Agg
backend, so no display is needed.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from instructjax import evaluation

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
WIN_RATE_PNG = "win_rate_vs_sft.png"
SCORE_VS_KL_PNG = "score_vs_kl.png"
PTX_LOSS_PNG = "pretraining_loss_during_ppo.png"

_RUN_LABELS = {"ppo": "PPO", "ppo_ptx": "PPO-ptx"}


# ------------------------------------------------------------------------------------------------
# Numbers and tables.


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, digits: int = 3) -> str:
  return f"{value:.{digits}f}" if _finite(value) else "–"


def _interval(stat: Mapping[str, Any] | None, key: str = "mean", digits: int = 3) -> str:
  """`0.512 [0.431, 0.593]`, or the value alone when the interval is undefined."""
  if not stat:
    return "–"
  text = _number(stat.get(key), digits)
  if _finite(stat.get("low")) and _finite(stat.get("high")):
    text += f" [{_number(stat['low'], digits)}, {_number(stat['high'], digits)}]"
  return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines


def _json_safe(value: Any) -> Any:
  """NaN and infinities become null: report.json is strict JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if hasattr(value, "item") and callable(value.item):  # numpy scalars
    return _json_safe(value.item())
  return value


def _settings_text(settings: Mapping[str, Any]) -> list[str]:
  if not settings:
    return []
  decoding = settings.get("decoding", "")
  confidence = settings.get("confidence", 0.95)
  prompts = settings.get("prompts") or (f"held-out prompts of the synthetic task's "
                                        f"\"{settings.get('split', 'eval')}\" split")
  lines = [f"{settings.get('num_prompts', '?')} {prompts}; responses by {decoding}. Intervals "
           f"are {confidence:.0%} confidence intervals: normal approximation for means, Wilson "
           "score interval for win rates (a tie counts as half a win)."]
  if settings.get("kl_decoding"):
    lines.append(f"KL from SFT: {settings['kl_decoding']}.")
  if settings.get("pretraining_text"):
    lines.append(f"Pretraining loss: {settings['pretraining_text']}.")
  return [" ".join(lines), ""]


# Column titles of each judge's win rate and score (`evaluation.JUDGES`).
_JUDGE_COLUMNS = {"gold": ("gold scorer", "Gold score"),
                  "judge": ("held-out judge RM", "Judge RM score (normalised)"),
                  "rm": ("proxy RM (PPO's reward)", "RM score (proxy, normalised)")}
_HEADLINE_TEXT = {
    "gold": "the gold scorer (the paper's Figure 1, with the gold labeler in place of human "
            "labelers)",
    "judge": "the held-out judge reward model (the paper's Figure 1, with a reward model trained "
             "on comparisons the proxy reward model never saw in place of held-out labelers)",
    "rm": "the reward model PPO optimised: a proxy, which a policy can game without getting "
          "better (no held-out judge in this run)"}


def _judges(models: Mapping[str, Any]) -> list[str]:
  """The judges any model was scored by, in `evaluation.JUDGES` order (the first: headline)."""
  return [judge for judge in evaluation.JUDGES
          if any(f"{judge}_score" in row for row in models.values())]


def _win_rate_section(models: Mapping[str, Any], judges: Sequence[str],
                      figures: Mapping[str, str]) -> list[str]:
  out = ["## Win rate against SFT", ""]
  if judges:
    out += [f"How often each model's response beats SFT's on the same prompt, judged by "
            f"{_HEADLINE_TEXT[judges[0]]}."
            + (" The other columns judge the same responses by "
               + " and by ".join(evaluation.JUDGES[j] for j in judges[1:]) + "."
               if len(judges) > 1 else ""), ""]
  rows = []
  for name, row in models.items():
    rates = row.get("win_rates_vs_sft") or {}
    if not rates and row.get("win_rate_vs_sft"):  # a report.json written before judges
      rates = {judges[0] if judges else "gold": row["win_rate_vs_sft"]}
    win = rates.get(judges[0]) if judges else None
    counts = f"{win['wins']} / {win['ties']} / {win['losses']}" if win else "–"
    rows.append([row.get("label", name), _interval(win, "win_rate"), counts]
                + [_interval(rates.get(j), "win_rate") for j in judges[1:]])
  headline = _JUDGE_COLUMNS[judges[0]][0] if judges else "–"
  out += _table(["Model", f"Win rate vs SFT, {headline} [95% CI]", "Wins / ties / losses"]
                + [f"Win rate, {_JUDGE_COLUMNS[j][0]}" for j in judges[1:]], rows) + [""]
  if "win_rate" in figures:
    out += [f"![Win rate against SFT]({figures['win_rate']})", ""]
  return out


def _reward_model_table(rm: Mapping[str, Any]) -> list[str]:
  """One reward model's held-out accuracy; against the simulated labeler's ceiling on the
  synthetic task."""
  if "labeler_ceiling" in rm or "labeler_agreement" in rm:
    return _table(["Accuracy (labeler)", "Accuracy (gold order)", "Labeler ceiling",
                   "Inter-labeler agreement", "Step"],
                  [[_number(rm.get("eval_accuracy")), _number(rm.get("eval_gold_accuracy")),
                    _number(rm.get("labeler_ceiling")), _number(rm.get("labeler_agreement")),
                    str(rm.get("step", "–"))]]) + [""]
  return _table(["Held-out pair accuracy (its eval split)", "Held-out loss", "Step"],
                [[_number(rm.get("eval_accuracy")), _number(rm.get("eval_loss")),
                  str(rm.get("step", "–"))]]) + [""]


def _by_difference(by_difference: Mapping[str, Any]) -> list[str]:
  with_sft = all("sft_likelihood_gold_accuracy" in row for row in by_difference.values())
  with_train = all("train_gold_accuracy" in row for row in by_difference.values())
  out = ["The same held-out pairs by what differs between the two responses: only one "
         "carries a remark after its answer, the answers differ, or only the remark's text "
         "does. A gap to the ceiling shows what the reward model cannot judge."
         + (" \"On training pairs\" is the RM's gold-order accuracy on its own training "
            "rankings: as low there as held out, it never learned that kind of pair; much "
            "higher, it memorised." if with_train else "")
         + (" The last column orders the pairs by the SFT policy's own log-likelihood of "
            "each response (the reward model's initialisation): what the RM could have "
            "learned to read." if with_sft else ""), ""]
  out += _table(["Pairs that differ in", "Pairs", "Accuracy (labeler)",
                 "Accuracy (gold order)", "Labeler ceiling"]
                + (["On training pairs (gold order)"] if with_train else [])
                + (["SFT likelihood (gold order)"] if with_sft else []),
                [[kind, str(row["pairs"]), _number(row["labeler_accuracy"]),
                  _number(row["gold_accuracy"]), _number(row["labeler_ceiling"])]
                 + ([_number(row["train_gold_accuracy"])] if with_train else [])
                 + ([_number(row["sft_likelihood_gold_accuracy"])] if with_sft else [])
                 for kind, row in sorted(by_difference.items(),
                                         key=lambda item: (item[0] == "all", item[0]))]) + [""]
  return out


def _by_k(rms: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """Pair accuracy by K of every reward model that has it, side by side."""
  with_k = {title: rm for title, rm in rms.items() if rm.get("by_k")}
  if not with_k:
    return []
  keys = sorted({k for rm in with_k.values() for k in rm["by_k"]},
                key=lambda k: (k == "all", len(k), k))
  first = next(iter(with_k.values()))
  out = [f"Pair accuracy on the held-out rankings of {first.get('by_k_rankings', '?')}, by the "
         "number of responses K ranked for a prompt (a ranking of K gives up to K(K-1)/2 pairs; "
         "tied responses give none).", ""]
  rows = []
  for k in keys:
    counts = next(rm["by_k"][k] for rm in with_k.values() if k in rm["by_k"])
    rows.append([k, str(counts["rankings"]), str(counts["pairs"])]
                + [_number(rm["by_k"].get(k, {}).get("accuracy")) for rm in with_k.values()])
  return out + _table(["K", "Rankings", "Pairs"] + [f"{title} accuracy" for title in with_k],
                      rows) + [""]


def render_markdown(results: Mapping[str, Any], curves: Mapping[str, Any],
                    figures: Mapping[str, str]) -> str:
  """report.md's text; `figures` maps a plot's kind ("win_rate", "score_vs_kl", "ptx_loss") to
  its file name next to report.md."""
  del curves  # shown through the figures; kept in the signature for symmetry with write_report
  models = results.get("models", {})
  judges = _judges(models)
  out = ["# InstructJAX evaluation", ""]
  out += _settings_text(results.get("settings", {}))
  out += _win_rate_section(models, judges, figures)

  out += ["## Scores, KL from SFT, length", ""]
  rows = [[row.get("label", name)] + [_interval(row.get(f"{j}_score")) for j in judges]
          + [_interval(row.get("kl_from_sft")), _number(row.get("ended_fraction"), 2),
             _number(row.get("response_length"), 1)]
          for name, row in models.items()]
  out += _table(["Model"] + [_JUDGE_COLUMNS[j][1] for j in judges]
                + ["KL from SFT (nats/response)", "Ended with EOS", "Length (tokens)"],
                rows) + [""]
  cut: dict[int, list[str]] = {}  # models that cut the same number of prompts, in one line
  for name, row in models.items():
    if row.get("prompts_truncated"):
      cut.setdefault(row["prompts_truncated"], []).append(row.get("label", name))
  for count, labels in cut.items():
    out += [f"{', '.join(labels)}: {count} prompts were longer than the prompt length and lost "
            "their beginning.", ""]

  out += ["## Alignment tax: held-out pretraining loss", "",
          "Next-token loss on held-out pretraining text; RLHF that raises it pays an alignment "
          "tax, which PPO-ptx's pretraining term is meant to avoid.", ""]
  sft_loss = models.get(evaluation.BASELINE, {}).get("pretraining_loss")
  rows = []
  for name, row in models.items():
    loss = row.get("pretraining_loss")
    change = (f"{loss - sft_loss:+.3f}" if _finite(loss) and _finite(sft_loss) else "–")
    rows.append([row.get("label", name), _number(loss), change])
  out += _table(["Model", "Pretraining loss (nats/token)", "Change vs SFT"], rows) + [""]

  rms = {title: results[key] for key, title in (("reward_model", "Proxy RM"),
                                                ("judge_model", "Judge RM")) if results.get(key)}
  if rms:
    out += ["## Reward models", ""]
    for title, rm in rms.items():
      synthetic = "labeler_ceiling" in rm or "labeler_agreement" in rm
      out += [f"{title} ({rm.get('workdir', '?')}): held-out pair accuracy"
              + (" against the simulated labeler's rankings, next to the best accuracy any "
                 "model can expect against that noisy labeler (the ceiling) and the agreement "
                 "of two independent labelers." if synthetic else
                 " on its own evaluation split."), ""]
      out += _reward_model_table(rm)
      if rm.get("by_difference"):
        out += _by_difference(rm["by_difference"])
    out += _by_k(rms)

  if "score_vs_kl" in figures or "ptx_loss" in figures:
    out += ["## During PPO training", ""]
    if "score_vs_kl" in figures:
      out += ["Scores of the rollouts against their KL from SFT, at each logged step.", "",
              f"![Score against KL]({figures['score_vs_kl']})", ""]
    if "ptx_loss" in figures:
      out += ["Held-out pretraining loss over PPO training (dashed: SFT).", "",
              f"![Pretraining loss during PPO]({figures['ptx_loss']})", ""]

  examples = results.get("examples") or []
  if examples:
    out += ["## Examples", ""]
    for example in examples:
      out += ["```", example["prompt"], "```", ""]
      for name, text in example["responses"].items():
        label = evaluation.LABELS.get(name, name)
        out.append(f"- **{label}**: {_response_text(text)}")
      out.append("")

  skipped = results.get("skipped") or {}
  if skipped:
    out += ["## Not evaluated", ""]
    out += [f"- {evaluation.LABELS.get(name, name)}: {why}" for name, why in skipped.items()]
    out.append("")
  return "\n".join(out)


def _response_text(text: str) -> str:
  """A response on one line, as code; one that is empty or only whitespace says so."""
  if not text:
    return "(empty)"
  if not text.strip():
    return f"(only whitespace: {len(text)} characters)"
  return "`" + text.strip().replace("\n", "\\n").replace("`", "'") + "`"


# ------------------------------------------------------------------------------------------------
# Plots.


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_win_rates(models: Mapping[str, Any], path: str) -> bool:
  """Bars of the win rate against SFT with their interval as error bars; False if none."""
  rows = [(row.get("label", name), row["win_rate_vs_sft"]) for name, row in models.items()
          if row.get("win_rate_vs_sft")]
  if not rows:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 3.2))
  labels = [label for label, _ in rows]
  rates = [w["win_rate"] for _, w in rows]
  errors = [[w["win_rate"] - w["low"] for _, w in rows], [w["high"] - w["win_rate"] for _, w in rows]]
  ax.bar(labels, rates, yerr=errors, capsize=4, color="#4c72b0")
  ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
  ax.set_ylim(0, 1)
  ax.set_ylabel("Win rate against SFT")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot_score_vs_kl(curves: Mapping[str, Mapping[str, Any]], path: str) -> bool:
  """RM score and gold score of the rollouts against KL, one line per PPO run; False if no run
  logged both a score and KL."""
  panels = [("rm_score", "RM score (normalised)"), ("gold_score", "Gold score")]
  data = {(run, y): evaluation.paired(run_curves, "kl", y) for run, run_curves in curves.items()
          for y, _ in panels}
  panels = [(y, label) for y, label in panels if any(data[(run, y)] for run in curves)]
  if not panels:
    return False
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
  for ax, (y, label) in zip(axes[0], panels):
    for run in curves:
      points = data[(run, y)]
      if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                label=_RUN_LABELS.get(run, run))
    ax.set_xlabel("KL from SFT (nats/response)")
    ax.set_ylabel(label)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot_ptx_loss(curves: Mapping[str, Mapping[str, Any]], path: str,
                  sft_loss: float | None = None) -> bool:
  """Held-out pretraining loss against PPO step per run (PPO vs PPO-ptx); False if none."""
  runs = {run: c["eval_ptx_loss"] for run, c in curves.items() if c.get("eval_ptx_loss")}
  if not runs:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.8, 3.2))
  for run, points in runs.items():
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
            label=_RUN_LABELS.get(run, run))
  if _finite(sft_loss):
    ax.axhline(sft_loss, color="grey", linestyle="--", linewidth=1, label="SFT")
  ax.set_xlabel("PPO step")
  ax.set_ylabel("Held-out pretraining loss")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write_report(workdir: str, results: Mapping[str, Any],
                 curves: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
  """Writes report.json, the plots that have data and report.md into `workdir`; returns
  {kind: path} of every file written."""
  os.makedirs(workdir, exist_ok=True)
  models = results.get("models", {})
  sft_loss = models.get(evaluation.BASELINE, {}).get("pretraining_loss")
  figures = {}
  for kind, name, draw in (
      ("win_rate", WIN_RATE_PNG, lambda p: plot_win_rates(models, p)),
      ("score_vs_kl", SCORE_VS_KL_PNG, lambda p: plot_score_vs_kl(curves, p)),
      ("ptx_loss", PTX_LOSS_PNG, lambda p: plot_ptx_loss(curves, p, sft_loss))):
    if draw(os.path.join(workdir, name)):
      figures[kind] = name
  written = {kind: os.path.join(workdir, name) for kind, name in figures.items()}
  written["json"] = os.path.join(workdir, REPORT_JSON)
  with open(written["json"], "w") as f:
    json.dump(_json_safe(dict(results, curves=curves, figures=figures)), f, indent=2,
              sort_keys=False, allow_nan=False)
  written["markdown"] = os.path.join(workdir, REPORT_MD)
  with open(written["markdown"], "w") as f:
    f.write(render_markdown(results, curves, figures))
  return written
