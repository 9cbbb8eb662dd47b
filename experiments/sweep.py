"""Ablation sweeps: a config module's `sweep(arg)` expanded into runs of `experiments.run`.

  python -m experiments.sweep --config experiments/configs/sft.py:tiny --workdir ROOT --print
  python -m experiments.sweep --config experiments/configs/sft.py:tiny --workdir ROOT --local
  python -m experiments.sweep --config experiments/configs/sft.py:tiny --workdir ROOT --summary

A config module that can be swept defines, next to `get_config(arg)`,

  def sweep(arg) -> list[dict]:
    return [{"name": "lr1e-3", "overrides": {"optimizer.lr": 1e-3}}, ...]

Each entry is one run: `overrides` maps a dotted config field to its value for that run, and the
optional `name` (letters, digits and `._=,+-`) names its workdir `ROOT/<name>`; without a name, one
is made from the overrides (`lr=0.001,weight_decay=0.1`). Every run is the ordinary command
`python -m experiments.run --config FILE[:arg] --workdir ROOT/<name> --config.<field>=<value> ...`,
so anything a sweep does can be repeated by hand. Overrides after `--` apply to every run:
`python -m experiments.sweep ... --local -- --config.steps=50`.

Before anything is launched or printed, every run's command line is parsed exactly as
`experiments.run` parses it (locked config): a mistyped field or a value of the wrong type is an
error naming the run and the field.

  --print   prints one command per run; `--launcher tpu` wraps it as `launch/tpu_pod.sh run -- ...`,
            `--launcher slurm` as `launch/slurm_submit.sh --job_name NAME -- ...`
            (`--launcher_args` adds flags of the launcher, e.g. "--nodes 2 --partition gpu").
  --local   runs them one after another here; a run whose metrics.jsonl already has the final step
            is skipped, so re-running the same command after a failure carries on where it stopped.
  --summary the last logged value of every metric of every run, one row per run: printed as a
            markdown table and written to ROOT/summary.md and ROOT/summary.csv.
`--only NAME[,NAME...]` restricts any of them to some runs.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib.util
import io
import math
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Mapping, Sequence

from absl import app, flags

from instructjax.errors import InputError
from instructjax.metrics import METRICS_FILENAME, read_metrics

_CONFIG = flags.DEFINE_string("config", None, "Config file[:arg] whose module defines sweep(arg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory: each run works in WORKDIR/<name>.")
_LOCAL = flags.DEFINE_bool("local", False, "Run the sweep's runs one after another on this machine.")
_PRINT = flags.DEFINE_bool("print", False, "Print each run's command instead of running it.")
_SUMMARY = flags.DEFINE_bool("summary", False, "Collect the final metrics of every run in a table.")
_LAUNCHER = flags.DEFINE_enum("launcher", "plain", ["plain", "tpu", "slurm"],
                              "With --print: wrap each command for launch/tpu_pod.sh or "
                              "launch/slurm_submit.sh.")
_LAUNCHER_ARGS = flags.DEFINE_string("launcher_args", "",
                                     "With --launcher: extra flags of the launcher script.")
_ONLY = flags.DEFINE_list("only", [], "Only these runs (comma-separated names).")
_PYTHON = flags.DEFINE_string("python", None, "Python that runs experiments.run; default: this "
                              "one for --local, `python` for --print.")

ENTRY_KEYS = ("name", "overrides")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")
_OVERRIDE_ARG = re.compile(r"^--config\.([A-Za-z0-9_.]+)=(.*)$", re.DOTALL)
LAUNCHERS = {"tpu": "launch/tpu_pod.sh", "slurm": "launch/slurm_submit.sh"}
SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its name, workdir, `experiments.run` arguments and final step."""
  name: str
  overrides: dict[str, Any]
  workdir: str
  args: tuple[str, ...]
  final_step: int | None

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, METRICS_FILENAME)


# ---------------------------------------------------------------------------------------------
# The sweep definition.


def split_config_arg(config_arg: str) -> tuple[str, str | None]:
  """`path.py:arg` -> (path, arg), splitting at the first colon as ml_collections does."""
  path, sep, arg = config_arg.partition(":")
  return path, (arg if sep else None)


def load_sweep(config_arg: str) -> list[dict]:
  """Calls `sweep(arg)` of the config module (with no argument when `arg` is absent)."""
  path, arg = split_config_arg(config_arg)
  if not os.path.isfile(path):
    raise InputError(path, "config file not found")
  spec = importlib.util.spec_from_file_location("instructjax_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "sweep", None)):
    raise InputError(path, "defines no sweep(arg) function; see experiments/sweep.py for the format")
  entries = module.sweep() if arg is None else module.sweep(arg)
  if not isinstance(entries, (list, tuple)) or not entries:
    raise InputError(f"{path}: sweep({arg or ''})", "must return a non-empty list of "
                     "{'name': ..., 'overrides': {...}} dicts")
  return list(entries)


def format_value(value: Any, where: str) -> str:
  """A Python value as ml_collections reads it back from `--config.field=<text>`."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float, str)):
    return str(value) if not isinstance(value, float) else repr(value)
  if isinstance(value, tuple):
    return repr(value)
  if value is None:
    return "None"
  raise InputError(where, f"value {value!r} of type {type(value).__name__} cannot be given on the "
                   "command line; use a bool, int, float, str, tuple or None")


def override_args(overrides: Mapping[str, Any], where: str = "overrides") -> list[str]:
  """`{"optimizer.lr": 0.001}` -> `["--config.optimizer.lr=0.001"]`."""
  return [f"--config.{key}={format_value(value, f'{where}: {key}')}"
          for key, value in overrides.items()]


def default_name(overrides: Mapping[str, Any]) -> str:
  """`lr=0.001,weight_decay=0.1`: each field's last part, or its full path when two share it."""
  leaves = [key.rsplit(".", 1)[-1] for key in overrides]
  parts = []
  for key, leaf, value in zip(overrides, leaves, overrides.values()):
    label = leaf if leaves.count(leaf) == 1 else key
    parts.append(f"{label}={format_value(value, key)}")
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "base"
  return name if _NAME.match(name) else f"run_{name}"


def expand(entries: Sequence[Any], where: str = "sweep") -> list[tuple[str, dict[str, Any]]]:
  """Checks the sweep's format and names its runs: [(name, overrides), ...] in order."""
  runs, seen = [], {}
  for index, entry in enumerate(entries):
    here = f"{where}[{index}]"
    if not isinstance(entry, Mapping):
      raise InputError(here, f"expected a dict {{'name': ..., 'overrides': {{...}}}}, got "
                       f"{type(entry).__name__}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown or "overrides" not in entry:
      raise InputError(here, f"keys must be 'overrides' and optionally 'name', got {sorted(entry)}")
    overrides = entry["overrides"]
    if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
      raise InputError(here, "'overrides' must be a dict of 'field.path' -> value")
    overrides = dict(overrides)
    name = entry.get("name")
    if name is None:
      name = default_name(overrides)
    elif not isinstance(name, str) or not _NAME.match(name):
      raise InputError(here, f"name {name!r} must start with a letter or digit and use only "
                       "letters, digits and ._=,+-")
    if name in seen:
      raise InputError(here, f"name {name!r} is already the name of {where}[{seen[name]}]")
    seen[name] = index
    runs.append((name, overrides))
  return runs


# ---------------------------------------------------------------------------------------------
# Validation: each run's command line parsed as experiments.run parses it.


def parse_run_config(config_arg: str, args: Sequence[str]):
  """The locked config that `experiments.run <args>` would get (config flags only)."""
  from ml_collections import config_flags
  argv = ["experiments.run", f"--config={config_arg}",
          *[a for a in args if a.startswith("--config.")]]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def check_fields(config, keys: Sequence[str], where: str) -> None:
  """Every dotted key names an existing field; a typo gets the nearest names as a hint."""
  for key in keys:
    node, walked = config, []
    for part in key.split("."):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if part not in fields:
        parent = ".".join(walked) or "the config"
        hint = difflib.get_close_matches(part, fields, n=3)
        raise InputError(where, f"override {key!r}: {parent} has no field {part!r}"
                         + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else ""))
      node, walked = node[part], walked + [part]


def _same(parsed: Any, wanted: Any) -> bool:
  if isinstance(wanted, float) and isinstance(parsed, (int, float)):
    return parsed == wanted or (math.isnan(parsed) and math.isnan(wanted))
  return parsed == wanted


def plan(config_arg: str, root: str, extra_args: Sequence[str] = ()) -> list[Run]:
  """All runs of the sweep, each validated against the locked config before anything runs.

  Args:
    config_arg: `path/to/config.py[:arg]`, as given to experiments.run.
    root: the sweep's directory; run NAME works in `root/NAME`.
    extra_args: `--config.field=value` overrides for every run (after the run's own).
  """
  for arg in extra_args:
    if not _OVERRIDE_ARG.match(arg):
      raise InputError(f"argument {arg!r}", "only --config.field=value overrides may follow '--'")
  path, _ = split_config_arg(config_arg)
  where = f"{path}: sweep"
  extra_keys = [_OVERRIDE_ARG.match(a)[1] for a in extra_args]
  base = parse_run_config(config_arg, [])
  check_fields(base, extra_keys, "overrides after '--'")
  runs = []
  for name, overrides in expand(load_sweep(config_arg), where):
    here = f"sweep run {name!r}"
    args = [*override_args(overrides, here), *extra_args]
    check_fields(base, list(overrides), here)
    try:
      config = parse_run_config(config_arg, args)
    except (flags.Error, ValueError, TypeError, AttributeError, KeyError) as e:
      raise InputError(here, f"{e}".strip("'\"")) from None
    for key, value in overrides.items():
      parsed = config
      for part in key.split("."):
        parsed = parsed[part]
      if key not in extra_keys and not _same(parsed, value):
        raise InputError(here, f"override {key!r}: {value!r} would be read back as {parsed!r}")
    workdir = os.path.join(root, name)
    steps = config.get("steps") if hasattr(config, "get") else None
    runs.append(Run(name, overrides, workdir,
                    ("--config", config_arg, "--workdir", workdir, *args),
                    int(steps) if isinstance(steps, int) else None))
  return runs


def select(runs: Sequence[Run], only: Sequence[str]) -> list[Run]:
  """The runs named in `only` (all when empty); an unknown name is an error listing the names."""
  if not only:
    return list(runs)
  names = [r.name for r in runs]
  unknown = [n for n in only if n not in names]
  if unknown:
    raise InputError("--only", f"no run named {', '.join(map(repr, unknown))}; the sweep has "
                     f"{', '.join(names)}")
  return [r for r in runs if r.name in only]


# ---------------------------------------------------------------------------------------------
# Printing and running.


def command(run: Run, launcher: str = "plain", python: str = "python",
            launcher_args: Sequence[str] = ()) -> list[str]:
  """The command line that starts `run`, directly or through a launch script."""
  if launcher == "plain":
    return [python, "-m", "experiments.run", *run.args]
  if launcher == "tpu":
    return [LAUNCHERS["tpu"], "run", *launcher_args, "--", *run.args]
  if launcher == "slurm":
    return [LAUNCHERS["slurm"], "--job_name", run.name, *launcher_args, "--", *run.args]
  raise InputError("--launcher", f"{launcher!r} is not plain, tpu or slurm")


def is_finished(run: Run) -> bool:
  """Whether the run's metrics.jsonl has its final step (a run cut mid-line is not finished)."""
  if run.final_step is None or not os.path.exists(run.metrics_path):
    return False
  try:
    return any(r["step"] == run.final_step for r in read_metrics(run.metrics_path))
  except InputError:
    return False


class RunFailed(RuntimeError):
  """A run of a local sweep exited with an error; the later runs were not started."""

  def __init__(self, run: Run, returncode: int, cmd: Sequence[str]):
    self.run, self.returncode = run, returncode
    super().__init__(
        f"run {run.name!r} failed with exit code {returncode}; the later runs were not started.\n"
        f"  command: {shlex.join(cmd)}\n"
        "Fix the cause and re-run the same sweep command: finished runs are skipped and this one "
        "resumes from its last checkpoint.")


def run_local(runs: Sequence[Run], python: str = sys.executable, *, log=print) -> None:
  """Runs each unfinished run in turn; stops at the first failure (raises RunFailed)."""
  for i, run in enumerate(runs, 1):
    if is_finished(run):
      log(f"[sweep] {i}/{len(runs)} {run.name}: finished before, skipped")
      continue
    cmd = command(run, "plain", python)
    log(f"[sweep] {i}/{len(runs)} {run.name}: {shlex.join(cmd)}")
    returncode = subprocess.call(cmd)
    if returncode != 0:
      raise RunFailed(run, returncode, cmd)


# ---------------------------------------------------------------------------------------------
# Summary.


@dataclasses.dataclass
class Table:
  columns: list[str]
  rows: list[dict[str, Any]]


def final_metrics(path: str) -> tuple[int | None, dict[str, float]]:
  """The last step and the last logged value of each metric of one metrics.jsonl."""
  last_step, values = None, {}
  for record in read_metrics(path):
    last_step = record["step"] if last_step is None else max(last_step, record["step"])
    for key, value in record.items():
      if key not in ("step", "stage"):
        values[key] = value  # a dict keeps the first-logged order and takes the last value
  return last_step, values


def summarize(runs: Sequence[Run]) -> Table:
  """One row per run: its overrides, status, last step and the last value of each metric."""
  override_keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
  metric_keys: list[str] = []
  rows = []
  for run in runs:
    row = {"run": run.name, **run.overrides}
    if os.path.exists(run.metrics_path):
      step, values = final_metrics(run.metrics_path)
      row.update(values, step=step,
                 status="finished" if is_finished(run) else "unfinished")
      metric_keys += [k for k in values if k not in metric_keys]
    else:
      row["status"] = "not started"
    rows.append(row)
  return Table(["run", *override_keys, "status", "step", *metric_keys], rows)


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def markdown(table: Table) -> str:
  lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
  for row in table.rows:
    cells = [_cell(row.get(c)).replace("|", "\\|") for c in table.columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def csv_text(table: Table) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(table.columns)
  for row in table.rows:
    writer.writerow(["" if row.get(c) is None else row.get(c) for c in table.columns])
  return out.getvalue()


def write_summary(root: str, table: Table) -> str:
  """Writes ROOT/summary.md and ROOT/summary.csv; returns the markdown."""
  text = markdown(table)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, SUMMARY_MD), "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(root, SUMMARY_CSV), "w", encoding="utf-8", newline="") as f:
    f.write(csv_text(table))
  return text


# ---------------------------------------------------------------------------------------------
# Entry point.


def main(argv):
  extra_args = argv[1:]
  modes = [m for m, on in (("--local", _LOCAL.value), ("--print", _PRINT.value),
                           ("--summary", _SUMMARY.value)) if on]
  if not _CONFIG.value or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  if len(modes) != 1:
    raise app.UsageError("give exactly one of --local, --print and --summary")
  if _LAUNCHER.value != "plain" and not _PRINT.value:
    raise app.UsageError("--launcher goes with --print")
  try:
    runs = select(plan(_CONFIG.value, _WORKDIR.value, extra_args), _ONLY.value)
    if _PRINT.value:
      if _LAUNCHER.value == "tpu" and len(runs) > 1:
        print("# tpu_pod.sh refuses to start a run while one is going on the slice: start each "
              "after the previous one has finished.", file=sys.stderr)
      for run in runs:
        print(shlex.join(command(run, _LAUNCHER.value, _PYTHON.value or "python",
                                 shlex.split(_LAUNCHER_ARGS.value))))
    elif _LOCAL.value:
      run_local(runs, _PYTHON.value or sys.executable)
      print(f"[sweep] all {len(runs)} runs finished; "
            f"python -m experiments.sweep --config {_CONFIG.value} --workdir {_WORKDIR.value} "
            "--summary collects their metrics")
    else:
      print(write_summary(_WORKDIR.value, summarize(runs)), end="")
      print(f"wrote {os.path.join(_WORKDIR.value, SUMMARY_MD)} and "
            f"{os.path.join(_WORKDIR.value, SUMMARY_CSV)}", file=sys.stderr)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except RunFailed as e:
    print(f"sweep: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
