"""Sweeps: expansion and names, override validation, --print for each launcher, --summary on
hand-written metrics, and one tiny real --local sweep (with skip-when-finished and stop-on-failure).
"""
import csv
import json
import math
import os
import pathlib
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest

from experiments import sweep
from experiments.configs import sft
from instructjax.errors import InputError

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
SFT = "experiments/configs/sft.py:tiny"

# A config module of our own: the tiny pretraining config (fast: no sampling eval), swept over
# learning rates. `arg` picks the sweep: good runs, a typo, a bad type, or a run that fails.
CONFIG_MODULE = textwrap.dedent("""\
    import sys
    sys.path.insert(0, {tests!r})
    import tiny

    def get_config(arg=""):
      return tiny.lm_config("pretrain", steps=2, log_every=1, eval_every=2, save_every=2,
                            eval_batches=1)

    def sweep(arg=""):
      if arg == "typo":
        return [{{"name": "ok", "overrides": {{"steps": 3}}}},
                {{"name": "oops", "overrides": {{"optimizer.lrr": 0.1}}}}]
      if arg == "type":
        return [{{"name": "half", "overrides": {{"steps": 2.5}}}}]
      if arg == "fails":  # data.source is only checked when the run starts
        return [{{"name": "broken", "overrides": {{"data.source": "nowhere"}}}},
                {{"name": "never", "overrides": {{"optimizer.lr": 0.01}}}}]
      return [{{"name": "lr_small", "overrides": {{"optimizer.lr": 1e-4}}}},
              {{"overrides": {{"optimizer.lr": 3e-3, "optimizer.weight_decay": 0.1}}}}]
    """)


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "swept.py"
  path.write_text(CONFIG_MODULE.format(tests=str(TESTS)))
  return path


def run_sweep(*args, env=None):
  return subprocess.run([sys.executable, "-m", "experiments.sweep", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=600, env=env)


# --------------------------------------------------------------------------------------- expansion


def test_sft_sweep_is_a_grid_of_named_runs_that_validate(tmp_path):
  entries = sft.sweep("tiny")
  names = [name for name, _ in sweep.expand(entries)]
  assert len(names) == len(set(names)) == 6
  grid = {(e["overrides"]["optimizer.lr"], e["overrides"]["optimizer.weight_decay"]) for e in entries}
  assert grid == {(lr, wd) for lr in (3e-4, 1e-3, 3e-3) for wd in (0.0, 0.1)}
  runs = sweep.plan(SFT, str(tmp_path))
  assert [r.name for r in runs] == names
  assert runs[0].workdir == str(tmp_path / names[0])
  assert runs[0].final_step == sft.get_config("tiny").steps
  assert runs[0].args == ("--config", SFT, "--workdir", str(tmp_path / "lr0.0003_wd0"),
                          "--config.optimizer.lr=0.0003", "--config.optimizer.weight_decay=0.0")


def test_expand_names_unnamed_runs_from_their_overrides():
  runs = sweep.expand([{"overrides": {"optimizer.lr": 0.001, "model.dropout": 0.1}},
                       {"overrides": {"model.dropout": 0.0, "data.dropout": 0.5}},
                       {"name": "base", "overrides": {}}])
  assert [name for name, _ in runs] == ["lr=0.001,dropout=0.1",
                                        "model.dropout=0.0,data.dropout=0.5", "base"]


@pytest.mark.parametrize("entries, problem", [
    ([{"name": "a", "overrides": {}}, {"name": "a", "overrides": {"steps": 2}}], "already the name"),
    ([{"name": "a b", "overrides": {}}], "must start with a letter"),
    ([{"name": "a", "override": {}}], "keys must be 'overrides'"),
    ([{"optimizer.lr": 0.1}], "keys must be 'overrides'"),
    (["optimizer.lr=0.1"], "expected a dict"),
    ([{"overrides": {"optimizer.lr": [1, 2]}}], "cannot be given on the command line"),
])
def test_expand_rejects_malformed_sweeps(entries, problem):
  with pytest.raises(InputError, match=problem):
    sweep.expand(entries)


# --------------------------------------------------------------------------------------- validation


def test_a_mistyped_field_is_an_error_naming_the_run_and_the_key(config_file, tmp_path):
  with pytest.raises(InputError, match=r"sweep run 'oops'.*'optimizer.lrr'.*did you mean 'lr'"):
    sweep.plan(f"{config_file}:typo", str(tmp_path))
  with pytest.raises(InputError, match=r"sweep run 'half'.*config.steps=2.5"):
    sweep.plan(f"{config_file}:type", str(tmp_path))
  with pytest.raises(InputError, match=r"overrides after '--'.*'stepz'"):
    sweep.plan(str(config_file), str(tmp_path), ["--config.stepz=3"])
  # The CLI says so in one line, exits 2 and starts nothing, not even the valid run "ok".
  result = run_sweep("--config", f"{config_file}:typo", "--workdir", tmp_path / "root", "--local")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: sweep run 'oops'")
  assert not (tmp_path / "root").exists()


def test_overrides_after_the_separator_apply_to_every_run(config_file, tmp_path):
  runs = sweep.plan(str(config_file), str(tmp_path), ["--config.steps=7"])
  assert all(r.args[-1] == "--config.steps=7" and r.final_step == 7 for r in runs)
  with pytest.raises(InputError, match="only --config.field=value"):
    sweep.plan(str(config_file), str(tmp_path), ["--workdir=/elsewhere"])


# --------------------------------------------------------------------------------------- printing


def fail_if_called_stubs(tmp_path):
  """A PATH whose gcloud, sbatch and srun fail loudly: a dry run must never reach them."""
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  for tool in ("gcloud", "sbatch", "srun"):
    path = stubs / tool
    path.write_text(f"#!/bin/sh\necho '{tool} was called' >&2\nexit 97\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}")


@pytest.mark.parametrize("launcher, launcher_args, prefix", [
    ("plain", "", ["python", "-m", "experiments.run"]),
    ("slurm", "--dry_run", ["launch/slurm_submit.sh", "--job_name", "{name}", "--dry_run", "--"]),
    ("tpu", "--dry_run --zone us-west4-a", ["launch/tpu_pod.sh", "run", "--dry_run", "--zone",
                                            "us-west4-a", "--"]),
])
def test_print_emits_one_command_per_run_for_each_launcher(config_file, tmp_path, launcher,
                                                           launcher_args, prefix):
  root = "gs://bucket/sweep 1"  # a space: every word must come out quoted
  result = run_sweep("--config", config_file, "--workdir", root, "--print", "--launcher", launcher,
                     f"--launcher_args={launcher_args}")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  names = ["lr_small", "lr=0.003,weight_decay=0.1"]
  overrides = [["--config.optimizer.lr=0.0001"],
               ["--config.optimizer.lr=0.003", "--config.optimizer.weight_decay=0.1"]]
  assert len(lines) == 2
  for line, name, extra in zip(lines, names, overrides):
    expected = [w.format(name=name) for w in prefix] + [
        "--config", str(config_file), "--workdir", f"{root}/{name}", *extra]
    assert shlex.split(line) == expected
  if launcher != "plain":
    # The launcher's own dry run accepts the printed line and passes the run's arguments on.
    env = fail_if_called_stubs(tmp_path)
    for line, name in zip(lines, names):
      done = subprocess.run(["bash", "-c", line], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env=env)
      assert done.returncode == 0, done.stderr
      assert "was called" not in done.stderr
      assert shlex.quote(f"{root}/{name}") in done.stdout or f"{root}/{name}" in done.stdout


# --------------------------------------------------------------------------------------- summary


def write_metrics(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_collects_the_last_value_of_every_metric(config_file, tmp_path):
  root = tmp_path / "root"
  runs = sweep.plan(str(config_file), str(root))
  finished, unfinished = runs
  # A resumed run logs steps after its last checkpoint twice: the last line wins.
  write_metrics(root / finished.name / "metrics.jsonl", [
      {"step": 1, "stage": "pretrain", "loss": 5.0, "grad_norm": 1.0},
      {"step": 2, "stage": "pretrain", "loss": 4.0, "grad_norm": 2.0},
      {"step": 1, "stage": "pretrain", "loss": 5.5, "grad_norm": 1.5},
      {"step": 2, "stage": "pretrain", "loss": 3.5, "grad_norm": "nan"},
      {"step": 2, "stage": "pretrain", "eval_loss": 3.25}])
  write_metrics(root / unfinished.name / "metrics.jsonl", [
      {"step": 1, "stage": "pretrain", "loss": 6.0, "grad_norm": 0.5, "extra": 7.0}])
  table = sweep.summarize(runs)
  assert table.columns == ["run", "optimizer.lr", "optimizer.weight_decay", "status", "step",
                           "loss", "grad_norm", "eval_loss", "extra"]
  first, second = table.rows
  assert first["status"] == "finished" and first["step"] == 2
  assert first["loss"] == 3.5 and math.isnan(first["grad_norm"]) and first["eval_loss"] == 3.25
  assert second["status"] == "unfinished" and second["loss"] == 6.0 and "eval_loss" not in second

  result = run_sweep("--config", config_file, "--workdir", root, "--summary")
  assert result.returncode == 0, result.stderr
  markdown = (root / "summary.md").read_text()
  assert result.stdout == markdown
  assert markdown.splitlines()[0] == ("| run | optimizer.lr | optimizer.weight_decay | status | step "
                                      "| loss | grad_norm | eval_loss | extra |")
  assert markdown.splitlines()[2] == "| lr_small | 0.0001 |  | finished | 2 | 3.5 | nan | 3.25 |  |"
  with open(root / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["lr_small", "lr=0.003,weight_decay=0.1"]
  assert float(rows[1]["optimizer.weight_decay"]) == 0.1 and float(rows[1]["extra"]) == 7.0
  assert rows[0]["extra"] == "" and rows[1]["eval_loss"] == ""

  (root / finished.name / "metrics.jsonl").unlink()
  assert sweep.summarize(runs).rows[0] == {"run": "lr_small", "optimizer.lr": 1e-4,
                                           "status": "not started"}


# --------------------------------------------------------------------------------------- --local


def test_local_sweep_runs_skips_finished_runs_and_stops_on_failure(config_file, tmp_path):
  root = tmp_path / "root"
  one_device = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")  # compiles faster
  result = run_sweep("--config", config_file, "--workdir", root, "--local", env=one_device)
  assert result.returncode == 0, result.stdout + result.stderr
  names = ["lr_small", "lr=0.003,weight_decay=0.1"]
  for name, lr in zip(names, (1e-4, 3e-3)):
    config = json.loads((root / name / "config.json").read_text())
    assert config["optimizer"]["lr"] == lr and config["steps"] == 2
    assert sorted(os.listdir(root / name / "checkpoints")) == ["2"]
  metrics = {n: (root / n / "metrics.jsonl").read_text() for n in names}

  # The same sweep again finds both runs finished and starts nothing.
  runs = sweep.plan(str(config_file), str(root))
  said = []
  sweep.run_local(runs, python="/nonexistent/python", log=said.append)
  assert said == [f"[sweep] {i}/2 {n}: finished before, skipped" for i, n in enumerate(names, 1)]
  assert {n: (root / n / "metrics.jsonl").read_text() for n in names} == metrics
  rows = sweep.summarize(runs).rows
  assert [(r["status"], r["step"]) for r in rows] == [("finished", 2)] * 2
  assert all(r["loss"] > 0 and r["eval_loss"] > 0 for r in rows)

  # A run that fails stops the sweep with its name and exit code; the next run never starts.
  failed = run_sweep("--config", f"{config_file}:fails", "--workdir", tmp_path / "bad", "--local",
                     env=one_device)
  assert failed.returncode == 1
  assert "run 'broken' failed with exit code 2" in failed.stderr
  assert "nowhere" in failed.stderr  # experiments.run's own one-line error comes through
  assert not (tmp_path / "bad" / "never").exists()
