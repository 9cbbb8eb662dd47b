"""The whole method in one command: the `:smoke` pipeline runs every stage, writes the report and
plots, and a second run skips every finished stage."""
import json
import os
import subprocess
import sys


import pytest

from experiments.configs import instructgpt
from instructjax.errors import InputError
from instructjax.trainers import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_pipeline(workdir, *flags):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device: faster to compile
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", "--config",
       "experiments/configs/instructgpt.py:smoke", "--workdir", str(workdir), *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_smoke_pipeline_runs_end_to_end_and_skips_finished_stages(tmp_path):
  first = run_pipeline(tmp_path)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  for stage in instructgpt.STAGES:
    assert os.path.exists(tmp_path / stage / "done.json"), stage
  report = json.loads((tmp_path / "report.json").read_text())
  assert report  # the evaluation's numbers
  markdown = (tmp_path / "report.md").read_text()
  assert "SFT" in markdown and "PPO-ptx" in markdown
  assert [p for p in os.listdir(tmp_path) if p.endswith(".png")]

  # The documented way to pick stages, in any order: they still run in pipeline order.
  second = run_pipeline(tmp_path, "--config.stages=" + ",".join(reversed(instructgpt.STAGES)))
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count("finished earlier, skipped") == len(instructgpt.STAGES)


def test_each_stage_is_initialised_from_the_previous_one(tmp_path):
  config = instructgpt.get_config("smoke")
  assert pipeline.stage_config(config, "sft", str(tmp_path)).init_from == str(tmp_path / "pretrain")
  assert pipeline.stage_config(config, "reward", str(tmp_path)).init_from == str(tmp_path / "sft")
  ppo = pipeline.stage_config(config, "ppo_ptx", str(tmp_path))
  assert (ppo.init_from, ppo.reward_from) == (str(tmp_path / "sft"), str(tmp_path / "reward"))
  evaluate = pipeline.stage_config(config, "evaluate", str(tmp_path))
  assert evaluate.models.ppo_ptx == str(tmp_path / "ppo_ptx")
  assert config.ppo.ppo.ptx_coef == 0.0 and config.ppo_ptx.ppo.ptx_coef > 0


def test_stages_are_picked_by_name_and_a_typo_is_an_error(tmp_path):
  assert pipeline.selected_stages("reward, sft") == ["sft", "reward"]
  with pytest.raises(InputError, match="unknown stages \\['rm'\\]"):
    pipeline.selected_stages("sft,rm")
  bad = run_pipeline(tmp_path, "--config.stages=sft,rm")
  assert bad.returncode == 2 and "unknown stages" in bad.stderr
  assert not os.path.exists(tmp_path / "sft")


def test_a_mistyped_override_is_one_line_naming_the_field(tmp_path):
  bad = run_pipeline(tmp_path, "--config.evaluate.rm_train_rankngs=5")
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == (
      'error: bad --config override: no field rm_train_rankngs; Did you mean "rm_train_rankings" '
      'instead of "rm_train_rankngs"?')
  assert not os.path.exists(tmp_path / "evaluate")


def test_the_small_variant_takes_every_stages_small_section():
  small, tiny = instructgpt.get_config("small"), instructgpt.get_config()
  for name in instructgpt.STAGES:
    assert small[name].model.d_model == 256 and tiny[name].model.d_model == 128, name
  assert small.ppo.ppo.ptx_coef == 0.0 and small.ppo_ptx.ppo.ptx_coef == 27.8
  with pytest.raises(ValueError, match="no such variant"):
    instructgpt.get_config("large")
