"""Where a stage's records come from: local files, or the synthetic task written out as files.

Both go through the same TFDS builders (array_record) and grain pipelines, so the default run
exercises exactly the path a user's own data takes.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from instructjax.data import builders, records
from instructjax.data.synthetic import SyntheticTask, TaskConfig
from instructjax.errors import InputError


def synthetic_task(config) -> SyntheticTask:
  """The synthetic task of `config.synthetic`; a field the config lacks (a workdir written before
  the field existed) or leaves empty keeps TaskConfig's default."""
  section = config.synthetic
  fields = {}
  for field in dataclasses.fields(TaskConfig):
    value = section.get(field.name)
    if value is None or value == "":
      continue
    if field.name == "instructions" and isinstance(value, str):
      value = [name.strip() for name in value.split(",") if name.strip()]
    fields[field.name] = _as_tuples(value)
  return SyntheticTask(TaskConfig(**fields))


def _as_tuples(value):
  """Lists (a config read back from JSON) as the tuples TaskConfig holds, nested ones too."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(v) for v in value)
  return value


def split_paths(value: str, where: str) -> list[str]:
  """The paths of a comma-separated config field; a missing file is an error naming the field."""
  paths = [p.strip() for p in value.split(",") if p.strip()]
  for path in paths:
    if not os.path.isfile(path):
      raise InputError(where, f"file not found: {path}")
  return paths


def check_files(config, required: str, *optional: str) -> None:
  """Before step 0: the comma-separated path fields of `config` (dotted names) name files that
  exist, and `required` names at least one; an error names the field and the missing file."""
  for field in (required, *optional):
    value = config
    for part in field.split("."):
      value = value[part]
    paths = split_paths(value, f"config.{field}")
    if field == required and not paths:
      raise InputError(f"config.{field}", "names no file (source=files needs at least one)")


def _synthetic_files(config, data_dir: str) -> dict[str, list[str]]:
  """Writes the synthetic records once (process 0) and returns their paths per split."""
  task = synthetic_task(config)
  kind = config.data.format
  plan = {"train": ("train", config.data.num_train), "validation": ("eval", config.data.num_eval)}
  paths = {}
  for split, (task_split, n) in plan.items():
    name = f"{kind}-{task_split}-seed{config.synthetic.seed}-n{n}.jsonl"
    path = os.path.join(data_dir, "synthetic", name)
    paths[split] = [path]
    if jax.process_index() == 0 and not os.path.exists(path):
      if kind == "demonstrations":
        rows = task.demonstrations(n, task_split)
      else:
        rows = [{"text": t} for t in task.pretraining_documents(n, task_split)]
      records.write_jsonl(path, rows)  # atomic: a killed run leaves no half-written file
  return paths


def lm_sources(config, workdir: str) -> dict:
  """Random-access train and validation sources for the pretraining / SFT stages."""
  data_dir = os.path.join(workdir, "data")
  if config.data.source == "synthetic":
    paths = _synthetic_files(config, data_dir)
  elif config.data.source == "files":
    paths = {"train": split_paths(config.data.train_files, "config.data.train_files")}
    if not paths["train"]:
      raise InputError("config.data.train_files", "source=files needs at least one file")
    if config.data.eval_files:
      paths["validation"] = split_paths(config.data.eval_files, "config.data.eval_files")
  else:
    raise InputError("config.data.source", f"{config.data.source!r} is not 'synthetic' or 'files'")
  sources = built(config.data.format, paths, os.path.join(data_dir, "tfds"))
  if "validation" not in sources:
    raise InputError("config.data.eval_files", "no held-out split could be made from the training "
                     "files (a single record); give --config.data.eval_files")
  return sources


def built(kind: str, paths: dict[str, list[str]], tfds_dir: str) -> dict:
  """The random-access sources of a TFDS build of `paths` (`builders.build`): one process
  builds; the others wait and then open the finished build."""
  tfds.disable_progress_bar()
  if jax.process_index() == 0:
    sources = builders.build(kind, paths, tfds_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("instructjax data built")
  if jax.process_index() != 0:
    sources = builders.build(kind, paths, tfds_dir)
  return sources
