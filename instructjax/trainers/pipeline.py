"""The whole InstructGPT method in one run: pretrain -> SFT -> comparisons + RM -> PPO and PPO-ptx
-> evaluation and report.

Each stage runs in its own subdirectory of the workdir and is initialised from the previous stage's
checkpoint as in the paper (RM from SFT; PPO policy and reference from SFT, value from the RM).

Before any stage trains, the pipeline
  * checks every stage it will run (`stages.check_settings`: sampling lengths against the model's
    positions, batch sizes on the mesh, ...), with the model each stage will have once the stages
    before it have run, so a run never fails at stage 5 on a setting of stage 5;
  * compares every stage already in the workdir with the config: a stage is reused (finished) or
    resumed (interrupted, from its latest checkpoint) only if what decides its result — its
    config section without `NOT_DECIDING` — is the one it ran with, and only if the stages it
    was built from are the runs it was built from. Otherwise it stops and names the stages, the
    fields (old -> new) and the two ways out: a fresh --workdir, or `--rerun=STAGE[,STAGE]`,
    which deletes those stages and every stage built from them and runs them again.

A stage records what decided it in `<stage>/pipeline.json` when it starts and in `done.json` when
it finishes (with a run id, which the stages built from it record as their input).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
import uuid
from typing import Any, Sequence

import jax
import ml_collections

from instructjax.errors import InputError

# The stages a pipeline may have, in order: (name = config section = subdirectory, its links: a
# field of its section -> the earlier stage whose workdir the pipeline puts there). A pipeline has
# the stages its config has a section for (the default: all but the judge; the real recipe: no
# pretrain), and a link to a stage it does not have is left as the config sets it (the real
# recipe's SFT starts from `model.init_from_hf`, its evaluation's GPT is that checkpoint). Each
# section's own `stage` field says which trainer runs it (`stages.STAGES`). A stage is built from
# the stages it links to: rerunning one reruns every stage built from it.
STAGES = (
    ("pretrain", {}),
    ("sft", {"init_from": "pretrain"}),
    ("reward", {"init_from": "sft"}),
    # A held-out judge: a second reward model, on a disjoint share of the comparisons.
    ("judge", {"init_from": "sft"}),
    ("ppo", {"init_from": "sft", "reward_from": "reward"}),
    ("ppo_ptx", {"init_from": "sft", "reward_from": "reward"}),
    ("evaluate", {"models.gpt": "pretrain", "models.sft": "sft", "models.ppo": "ppo",
                  "models.ppo_ptx": "ppo_ptx", "reward_from": "reward", "judge_from": "judge"}),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)
STAGE_LINKS = dict(STAGES)

# Fields of a stage's section that do not change what it produces (its checkpoint and the numbers
# it reports at its end), so a change to them keeps a finished stage and lets an interrupted one
# resume: how often it logs, evaluates during training (the last step is always evaluated) and
# saves, how checkpoints are kept and written, how the work is laid out on devices, and how the
# model runs rather than what it computes (rematerialisation, scan unrolling, the attention
# kernel). Everything else decides the stage, e.g. the model's dtype, eval_batches, seeds.
NOT_DECIDING = ("log_every", "eval_every", "eval_at_start", "save_every", "keep_checkpoints",
                "async_checkpoints", "distributed", "mesh", "sharding_rules", "model.remat",
                "model.scan_unroll", "model.attention_impl")
# Fields added to the stage configs after stages had recorded what decided them, each with the
# value that does what those stages did before the field existed. A record without such a field
# reads as having that value, so upgrading InstructJAX does not make a finished stage stale; a
# config that sets the field otherwise still differs from it. Adding a field with another
# default (one that changes what a stage computes) belongs nowhere here.
ADDED_FIELDS = {
    "ppo.value_head_fit": "none",        # PPO, PPO-ptx: no refit of the value head
    "data.prompt_share": [0.0, 1.0],     # reward models: every training ranking
    "normalisation_files": "",           # reward models: the prompts they were normalised on
    "judge_from": "",                    # evaluation: no held-out judge
    "prompts_file": "",                  # evaluation: the synthetic task's prompts
    "rankings_file": "",                 # evaluation: the comparisons the RM collected
}
RECORD_FILE = "pipeline.json"  # what decided the stage, written when it starts
DONE_FILE = "done.json"        # the same and a run id, written when it finishes


@dataclasses.dataclass(frozen=True)
class Graph:
  """The stages one pipeline config has, and which of them each is built from."""
  names: tuple[str, ...]

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "Graph":
    return cls(tuple(name for name in STAGE_NAMES if name in config))

  def links(self, name: str) -> dict[str, str]:
    """The stage's links to stages this pipeline has."""
    return {field: source for field, source in STAGE_LINKS[name].items() if source in self.names}

  def built_from(self, name: str) -> set[str]:
    """The stages whose workdirs `name` reads."""
    return set(self.links(name).values())

  def built_on(self, names) -> set[str]:
    """`names` and every stage built from them, directly or not."""
    out = set(names)
    for name in self.names:  # in order: a stage's sources come before it
      if self.built_from(name) & out:
        out.add(name)
    return out

  def sources_of(self, names) -> set[str]:
    """`names` and every stage they are built from, directly or not."""
    out = set(names)
    for name in reversed(self.names):
      if name in out:
        out |= self.built_from(name)
    return out

  def ordered(self, names) -> list[str]:
    return [name for name in self.names if name in names]


def stage_config(config: ml_collections.ConfigDict, name: str, workdir: str):
  """The stage's own config with its links pointed at the earlier stages' workdirs."""
  section = config[name]
  with section.unlocked():
    for field, source in Graph.of(config).links(name).items():
      *parents, leaf = field.split(".")
      target = section
      for parent in parents:
        target = target[parent]
      target[leaf] = os.path.join(workdir, source)
  return section


# ----------------------------------------------------------------------------- records


def decisive(fields: dict[str, Any], workdir: str) -> dict[str, Any]:
  """What decides a stage: its config (as a dict, nested or from JSON) flattened to dotted keys,
  without `NOT_DECIDING` and with the workdir's stage directories written `<workdir>/STAGE`, so a
  moved workdir still matches."""
  stage_dirs = {os.path.abspath(os.path.join(workdir, s)): f"<workdir>/{s}" for s in STAGE_NAMES}
  out: dict[str, Any] = {}

  def walk(prefix: str, value):
    if prefix in NOT_DECIDING or prefix == "resolved_model":  # config.json's: derived from the rest
      return
    if isinstance(value, dict):
      for key, inner in value.items():
        walk(f"{prefix}.{key}" if prefix else key, inner)
    elif isinstance(value, str) and os.sep in value and os.path.abspath(value) in stage_dirs:
      out[prefix] = stage_dirs[os.path.abspath(value)]
    else:
      out[prefix] = value

  walk("", json.loads(json.dumps(fields, default=str)))  # tuples as lists, as stored
  return out


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def recorded(stage_dir: str, workdir: str) -> tuple[dict | None, dict]:
  """(what decided the stage when it ran, the run ids of the stages it was built from) from its
  done.json or pipeline.json; for a stage run before those recorded it, its config.json (every
  trainer writes one) and no inputs. (None, {}) when nothing says."""
  for file in (DONE_FILE, RECORD_FILE):
    data = _read_json(os.path.join(stage_dir, file))
    if data and "config" in data:
      return data["config"], data.get("inputs") or {}
  trained = _read_json(os.path.join(stage_dir, "config.json"))
  return (decisive(trained, workdir) if trained else None), {}


def run_id(stage_dir: str) -> str | None:
  """The run id a finished stage recorded (None: unfinished, or finished before ids existed)."""
  return (_read_json(os.path.join(stage_dir, DONE_FILE)) or {}).get("run")


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """`field: old -> new` for every field that differs (`<unset>` where one has none)."""
  unset = object()
  show = lambda value: "<unset>" if value is unset else json.dumps(value)
  return [f"{key}: {show(old.get(key, unset))} -> {show(new.get(key, unset))}"
          for key in sorted(set(old) | set(new)) if old.get(key, unset) != new.get(key, unset)]


def is_done(stage_dir: str) -> bool:
  return os.path.exists(os.path.join(stage_dir, DONE_FILE))


def has_progress(stage_dir: str) -> bool:
  """Whether an unfinished stage left something a re-run would continue from: a checkpoint, or
  a reward model's collected comparisons."""
  from instructjax.trainers.comparisons import COMPARISONS_DIR
  checkpoints = os.path.join(stage_dir, "checkpoints")
  return ((os.path.isdir(checkpoints) and bool(os.listdir(checkpoints)))
          or os.path.isdir(os.path.join(stage_dir, COMPARISONS_DIR)))


def write_record(stage_dir: str, record: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  with open(os.path.join(stage_dir, RECORD_FILE), "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)


def mark_done(stage_dir: str, seconds: float, final: dict[str, Any] | None,
              record: dict[str, Any] | None = None) -> None:
  """done.json: the time, the final scalar metrics, what decided the stage (`record`: config
  and inputs) and a new run id."""
  if jax.process_index() != 0:
    return
  metrics = {k: v for k, v in (final or {}).items() if isinstance(v, (int, float, str))}
  with open(os.path.join(stage_dir, DONE_FILE), "w") as f:
    json.dump({"seconds": round(seconds, 1), "final": metrics, **(record or {}),
               "run": uuid.uuid4().hex}, f, indent=2)


def publish_report(evaluate_dir: str, workdir: str) -> None:
  """Copies the evaluation's report.json, report.md and plots to the top of the workdir."""
  if jax.process_index() != 0:
    return
  for path in glob.glob(os.path.join(evaluate_dir, "report*")) + glob.glob(
      os.path.join(evaluate_dir, "*.png")):
    shutil.copy2(path, workdir)


def selected_stages(stages: str, known: Sequence[str] = STAGE_NAMES) -> list[str]:
  """The stages named in `config.stages` (comma-separated), in pipeline order."""
  return _stage_list(stages, "config.stages", known, allow_empty=False)


def _stage_list(stages: str | Sequence[str], where: str, known: Sequence[str],
                allow_empty: bool) -> list[str]:
  items = stages.split(",") if isinstance(stages, str) else stages
  asked = [name.strip() for name in items if name.strip()]
  unknown = sorted(set(asked) - set(known))
  if unknown or not (asked or allow_empty):
    problem = f"unknown stages {unknown}" if unknown else "names no stage"
    raise InputError(where, f"{','.join(asked)!r}: {problem}; this pipeline has "
                     f"{','.join(known)}")
  return [name for name in known if name in asked]


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
  """What a run of the pipeline will do, decided before anything trains."""
  state: dict[str, str]        # stage -> reuse | resume | fresh | partial | absent (see `plan`)
  remove: list[str]            # stage directories deleted before the first stage starts
  notes: list[str]             # what the removals are, printed

  def runs(self, name: str) -> bool:
    return self.state[name] in ("fresh", "resume")


def plan(config: ml_collections.ConfigDict, workdir: str, names: Sequence[str],
         rerun: Sequence[str] = ()) -> Plan:
  """Decides each stage's fate and refuses a workdir whose stages do not match the config.

  States: reuse (selected or needed, finished with this config), resume (selected, interrupted
  with this config), fresh (selected, runs from scratch), partial (not selected, interrupted),
  absent (not selected, not in the workdir, or removed). Checked are the selected stages and
  every stage they are built from (which they read from the workdir).
  """
  graph = Graph.of(config)
  rerun = _stage_list(rerun, "--rerun", graph.names, allow_empty=True)
  unselected = [name for name in rerun if name not in names]
  if unselected:
    raise InputError("--rerun", f"names {unselected}, which config.stages "
                     f"({','.join(names)}) does not run")
  removed = graph.built_on(rerun)
  needed = graph.sources_of(names)
  state: dict[str, str] = {}
  remove, notes, problems, causes = [], [], [], []
  if rerun:
    gone = [n for n in graph.ordered(removed) if os.path.isdir(os.path.join(workdir, n))]
    remove += gone
    if gone:
      notes.append(f"--rerun={','.join(rerun)}: removing {', '.join(gone)} (the stages asked "
                   "for and every stage built from them)")
  for name in graph.names:
    stage_dir = os.path.join(workdir, name)
    selected = name in names
    if name in removed or not os.path.isdir(stage_dir):
      state[name] = "fresh" if selected else "absent"
      continue
    now = decisive(stage_config(config, name, workdir).to_dict(), workdir)
    old, _ = recorded(stage_dir, workdir)
    if old is not None:
      old = {**{k: v for k, v in ADDED_FIELDS.items() if k in now}, **old}
    done = is_done(stage_dir)
    if done or has_progress(stage_dir):
      state[name] = "reuse" if done else ("resume" if selected else "partial")
      if name not in needed:
        continue
      what = "finished" if done else "was interrupted (it would resume)"
      if old is None:
        problems.append(f"{name} {what}, but no record says with which settings")
        causes.append(name)
      elif old != now:
        problems.append(f"{name} {what} with other settings:\n      "
                        + "\n      ".join(differences(old, now)))
        causes.append(name)
    else:  # a directory with nothing to continue from: start it afresh
      state[name] = "fresh" if selected else "absent"
      if selected and old is not None and old != now:
        remove.append(name)
        notes.append(f"{name}: started earlier with other settings but left nothing to resume; "
                     "starting it afresh")
  for name in graph.names:  # the stages it was built from must be the runs it was built from
    if state[name] not in ("reuse", "resume") or name not in needed:
      continue
    _, inputs = recorded(os.path.join(workdir, name), workdir)
    for source in graph.ordered(graph.built_from(name)):
      source_dir = os.path.join(workdir, source)
      if state[source] in ("fresh", "resume"):
        problems.append(f"{name} was built from {source}, which runs again now")
      elif (state[source] == "reuse" and inputs.get(source) and run_id(source_dir)
            and inputs[source] != run_id(source_dir)):  # both known and different
        problems.append(f"{name} was built from an earlier run of {source}")
      else:
        continue
      causes.append(name)
  for name in names:  # what a stage that runs reads must be there by then
    if state[name] not in ("fresh", "resume"):
      continue
    for source in graph.ordered(graph.built_from(name)):
      if state[source] not in ("reuse", "fresh", "resume"):
        problems.append(f"{name} starts from {source}, which is neither finished in the workdir "
                        f"nor selected in config.stages (add {source} to it)")
  if problems:
    roots = [n for n in graph.ordered(causes)
             if not any(n in graph.built_on([c]) - {c} for c in causes)]
    ways = ""
    if roots:
      also = [n for n in roots if n not in names]
      ways = (f"\nTo go on, use a fresh --workdir, or add --rerun={','.join(roots)} to delete "
              f"{', '.join(graph.ordered(graph.built_on(roots)))} and run them again "
              "with this config"
              + (f" (config.stages must include {','.join(also)})" if also else "") + ".")
    raise InputError(f"--workdir {workdir}", "its stages do not match this config:\n  - "
                     + "\n  - ".join(problems) + ways)
  return Plan(state, remove, notes)


def planned_models(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The ModelConfig each stage will run with, from the config alone: a stage started from
  another (`init_from`) takes that stage's architecture and keeps its own runtime fields, as
  `common.model_config` does once that stage's config.json exists."""
  from instructjax.trainers import common
  out: dict[str, Any] = {}
  graph = Graph.of(config)
  for name in graph.names:
    section = stage_config(config, name, workdir)
    out[name] = common.model_config(section, common.tokenizer_from_config(section), inherit=False,
                                    source=out.get(graph.links(name).get("init_from")))
  return out


def check_stages(config: ml_collections.ConfigDict, workdir: str, names: Sequence[str]) -> None:
  """Every stage's settings checks (`stages.check_settings`) on the model it will have, before
  the first stage trains; an error names the stage's section (`config.<stage>.field`)."""
  from instructjax.trainers import common, stages
  models = planned_models(config, workdir)
  trained = {os.path.join(workdir, name): cfg for name, cfg in models.items()}
  for name in names:
    section = stage_config(config, name, workdir)
    try:
      stages.check_settings(section, common.Layout.from_config(section), models[name], trained)
    except InputError as e:
      where = (f"config.{name}." + e.where[len("config."):] if e.where.startswith("config.")
               else e.where)
      raise InputError(where, f"{e.problem} (stage {name}, checked before any stage "
                       "trains)") from None


# The sampling fields that decide which responses a policy draws. The reward model's comparisons
# and normalisation and both PPO stages must draw alike: an RM normalised on samples PPO never
# draws scores PPO's rollouts off its scale. (batch_size is a memory setting; the evaluation may
# sample differently on purpose, e.g. greedily.)
SAMPLED_FIELDS = ("prompt_len", "max_new_tokens", "temperature", "top_k", "top_p")
SAMPLING_STAGES = ("reward", "judge", "ppo", "ppo_ptx")


def check_one_sampling(config: ml_collections.ConfigDict) -> None:
  """The run's stages that sample for training draw alike (`SAMPLED_FIELDS`), else an error
  naming the field and the two values."""
  present = [name for name in SAMPLING_STAGES if name in config]
  if not present:
    return
  first = present[0]
  for name in present[1:]:
    for field in SAMPLED_FIELDS:
      mine, theirs = config[name].sampling[field], config[first].sampling[field]
      if mine != theirs:
        raise InputError(f"config.{name}.sampling.{field}",
                         f"is {mine!r} but config.{first}.sampling.{field} is {theirs!r}: the "
                         "reward model would be trained and normalised on samples PPO never "
                         "draws; set them equal")
  d, sampling = config[first].data, config[first].sampling
  if d.seq_len - d.max_prompt_len < sampling.max_new_tokens:
    raise InputError(f"config.{first}.data.seq_len",
                     f"{d.seq_len} leaves {d.seq_len - d.max_prompt_len} tokens after a "
                     f"{d.max_prompt_len}-token prompt, fewer than the {sampling.max_new_tokens} "
                     "a sample may have: the reward model would train on cut responses that PPO "
                     "scores whole; make seq_len >= max_prompt_len + sampling.max_new_tokens")


def _remove(workdir: str, names: Sequence[str]) -> None:
  if jax.process_index() == 0:
    for name in names:
      shutil.rmtree(os.path.join(workdir, name))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("instructjax pipeline stages removed")


def run(config: ml_collections.ConfigDict, workdir: str, rerun: Sequence[str] = ()) -> None:
  """Runs the selected stages in order; `rerun`: stages to delete and run again, with every stage
  built from them (`--rerun` of experiments.run)."""
  from instructjax.trainers import recipe, stages
  if recipe.is_recipe(config):
    recipe.resolve(config)
  graph = Graph.of(config)
  names = selected_stages(config.stages, graph.names)
  the_plan = plan(config, workdir, names, rerun)
  check_stages(config, workdir, [name for name in names if the_plan.runs(name)])
  check_one_sampling(config)
  for note in the_plan.notes:
    print(f"[pipeline] {note}", flush=True)
  _remove(workdir, the_plan.remove)
  started = time.perf_counter()
  for i, name in enumerate(names, 1):
    stage_dir = os.path.join(workdir, name)
    if the_plan.state[name] == "reuse":
      print(f"[pipeline] stage {i}/{len(names)} {name}: finished earlier, skipped", flush=True)
      continue
    print(f"[pipeline] stage {i}/{len(names)} {name} -> {stage_dir}", flush=True)
    os.makedirs(stage_dir, exist_ok=True)
    section = stage_config(config, name, workdir)
    record = dict(config=decisive(section.to_dict(), workdir),
                  inputs={source: run_id(os.path.join(workdir, source))
                          for source in graph.ordered(graph.built_from(name))})
    write_record(stage_dir, record)
    stage_started = time.perf_counter()
    final = stages.stage_runner(section.stage)(section, stage_dir)
    mark_done(stage_dir, time.perf_counter() - stage_started, final, record)
  publish_report(os.path.join(workdir, "evaluate"), workdir)
  print(f"[pipeline] all stages done in {time.perf_counter() - started:.0f}s; report: "
        f"{os.path.join(workdir, 'report.md')}", flush=True)
