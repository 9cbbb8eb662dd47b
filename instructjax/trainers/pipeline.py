"""The whole InstructGPT method in one run: pretrain -> SFT -> comparisons + RM -> PPO and PPO-ptx
-> evaluation and report.

Each stage runs in its own subdirectory of the workdir and is initialised from the previous stage's
checkpoint as in the paper (RM from SFT; PPO policy and reference from SFT, value from the RM).
A stage that finished writes `done.json`; re-running the command skips finished stages and resumes
an interrupted one from its latest checkpoint.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections

from instructjax.errors import InputError

# The pipeline's stages in order: (name = config section = subdirectory, what its init paths
# point at). Each section's own `stage` field says which trainer runs it (`stages.STAGES`).
STAGES = (
    ("pretrain", {}),
    ("sft", {"init_from": "pretrain"}),
    ("reward", {"init_from": "sft"}),
    ("ppo", {"init_from": "sft", "reward_from": "reward"}),
    ("ppo_ptx", {"init_from": "sft", "reward_from": "reward"}),
    ("evaluate", {}),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)
STAGE_LINKS = dict(STAGES)


def stage_config(config: ml_collections.ConfigDict, name: str, workdir: str):
  """The stage's own config with its init paths pointed at the earlier stages' workdirs."""
  section = config[name]
  links = STAGE_LINKS[name]
  with section.unlocked():
    for field, source in links.items():
      section[field] = os.path.join(workdir, source)
    if name == "evaluate":
      section.models.gpt = os.path.join(workdir, "pretrain")
      section.models.sft = os.path.join(workdir, "sft")
      section.models.ppo = os.path.join(workdir, "ppo")
      section.models.ppo_ptx = os.path.join(workdir, "ppo_ptx")
      section.reward_from = os.path.join(workdir, "reward")
  return section


def is_done(stage_dir: str) -> bool:
  return os.path.exists(os.path.join(stage_dir, "done.json"))


def mark_done(stage_dir: str, seconds: float, final: dict[str, Any] | None) -> None:
  if jax.process_index() != 0:
    return
  metrics = {k: v for k, v in (final or {}).items() if isinstance(v, (int, float, str))}
  with open(os.path.join(stage_dir, "done.json"), "w") as f:
    json.dump({"seconds": round(seconds, 1), "final": metrics}, f, indent=2)


def publish_report(evaluate_dir: str, workdir: str) -> None:
  """Copies the evaluation's report.json, report.md and plots to the top of the workdir."""
  if jax.process_index() != 0:
    return
  for path in glob.glob(os.path.join(evaluate_dir, "report*")) + glob.glob(
      os.path.join(evaluate_dir, "*.png")):
    shutil.copy2(path, workdir)


def selected_stages(stages: str) -> list[str]:
  """The stages named in `config.stages` (comma-separated), in pipeline order."""
  known = STAGE_NAMES
  asked = [name.strip() for name in stages.split(",") if name.strip()]
  unknown = sorted(set(asked) - set(known))
  if unknown or not asked:
    problem = f"unknown stages {unknown}" if unknown else "names no stage"
    raise InputError("config.stages", f"{stages!r}: {problem}; choose from {','.join(known)}")
  return [name for name in known if name in asked]


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  from instructjax.trainers import stages
  names = selected_stages(config.stages)
  started = time.perf_counter()
  for i, name in enumerate(names, 1):
    stage_dir = os.path.join(workdir, name)
    if is_done(stage_dir):
      print(f"[pipeline] stage {i}/{len(names)} {name}: finished earlier, skipped", flush=True)
      continue
    print(f"[pipeline] stage {i}/{len(names)} {name} -> {stage_dir}", flush=True)
    os.makedirs(stage_dir, exist_ok=True)
    section = stage_config(config, name, workdir)
    stage_started = time.perf_counter()
    final = stages.stage_runner(section.stage)(section, stage_dir)
    mark_done(stage_dir, time.perf_counter() - stage_started, final)
  publish_report(os.path.join(workdir, "evaluate"), workdir)
  print(f"[pipeline] all stages done in {time.perf_counter() - started:.0f}s; report: "
        f"{os.path.join(workdir, 'report.md')}", flush=True)
