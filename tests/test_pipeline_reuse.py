"""The pipeline reuses a finished stage (and resumes an interrupted one) only with the config it
ran with, `--rerun` runs a stage and everything built from it again, and every stage's settings —
sampling lengths and batches included — are checked before the first stage trains. Stage runners
are fakes here (nothing trains) except where a trainer's own early check is under test."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

import tiny
from experiments.configs import instructgpt
from instructjax.errors import InputError
from instructjax.trainers import common, lm, pipeline, ppo, reward, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = list(instructgpt.STAGES)


class Interrupted(Exception):
  pass


@pytest.fixture
def runs(monkeypatch):
  """Every stage's trainer replaced by a fake that leaves a checkpoint. `runs.calls`: the stages
  run, in order; `runs.fail[stage] = "late"` stops that stage after its first checkpoint (an
  interrupted run), "early" before it (a run that failed at its start)."""
  class Runs:
    calls: list = []
    fail: dict = {}

  def runner(stage):
    def run(config, workdir):
      name = os.path.basename(workdir)
      Runs.calls.append(name)
      if Runs.fail.get(name) == "early":
        raise Interrupted(name)
      os.makedirs(os.path.join(workdir, "checkpoints", "1"), exist_ok=True)
      if Runs.fail.get(name) == "late":
        raise Interrupted(name)
      return {"loss": 1.0}
    return run
  Runs.calls, Runs.fail = [], {}
  monkeypatch.setattr(stages, "stage_runner", runner)
  return Runs


def smoke(**overrides):
  """The `:smoke` pipeline config with `overrides` ({"sft.steps": 10}); the test's 8 devices are
  kept off the batch axes (the smoke batches are sized for one device; the mesh does not decide
  a stage, see pipeline.NOT_DECIDING)."""
  config = instructgpt.get_config("smoke")
  with config.unlocked():
    for name in ALL:
      config[name].mesh.update(dict(data=1, fsdp=1, tensor=-1))
    tiny.override(config, overrides)
  return config


def done(workdir, stage):
  with open(os.path.join(workdir, stage, "done.json")) as f:
    return json.load(f)


def test_an_unchanged_config_reuses_every_stage_and_bookkeeping_fields_do_not_count(tmp_path,
                                                                                    runs):
  pipeline.run(smoke(), str(tmp_path))
  assert runs.calls == ALL
  record = done(tmp_path, "reward")
  assert record["config"]["init_from"] == "<workdir>/sft" and record["config"]["steps"] == 4
  assert record["inputs"] == {"sft": done(tmp_path, "sft")["run"]}
  assert "log_every" not in record["config"] and "mesh.data" not in record["config"]

  runs.calls.clear()
  pipeline.run(smoke(**{"sft.log_every": 1, "sft.save_every": 2, "ppo.eval_every": 1,
                        "reward.async_checkpoints": True, "sft.model.remat": "full",
                        "stages": ",".join(reversed(ALL))}), str(tmp_path))
  assert runs.calls == []


def test_a_changed_stage_is_refused_naming_the_stage_the_fields_and_the_ways_out(tmp_path, runs):
  pipeline.run(smoke(), str(tmp_path))
  before = {stage: done(tmp_path, stage) for stage in ALL}
  runs.calls.clear()
  with pytest.raises(InputError) as refused:
    pipeline.run(smoke(**{"sft.steps": 10, "sft.optimizer.lr": 1e-3}), str(tmp_path))
  message = str(refused.value)
  assert "sft finished with other settings" in message
  assert "steps: 6 -> 10" in message and "optimizer.lr: 0.002 -> 0.001" in message
  assert "fresh --workdir" in message
  assert "--rerun=sft to delete sft, reward, ppo, ppo_ptx, evaluate" in message
  assert runs.calls == [] and {stage: done(tmp_path, stage) for stage in ALL} == before

  with pytest.raises(InputError, match="--rerun=ppo_ptx to delete ppo_ptx, evaluate") as refused:
    pipeline.run(smoke(**{"ppo_ptx.ppo.ptx_coef": 0.5}), str(tmp_path))
  assert "ppo.ptx_coef: " in str(refused.value) and " -> 0.5" in str(refused.value)
  # A subset of the stages checks the stages they are built from too.
  with pytest.raises(InputError, match="sft finished with other settings"):
    pipeline.run(smoke(**{"sft.steps": 10, "stages": "ppo"}), str(tmp_path))


def test_rerun_runs_the_stage_and_the_stages_built_from_it_again_and_keeps_the_rest(tmp_path,
                                                                                    runs):
  pipeline.run(smoke(), str(tmp_path))
  before = {stage: done(tmp_path, stage)["run"] for stage in ALL}
  runs.calls.clear()
  pipeline.run(smoke(**{"ppo.iterations": 3}), str(tmp_path), rerun=["ppo"])
  assert runs.calls == ["ppo", "evaluate"]
  after = {stage: done(tmp_path, stage)["run"] for stage in ALL}
  assert [s for s in ALL if after[s] != before[s]] == ["ppo", "evaluate"]
  assert done(tmp_path, "evaluate")["inputs"]["ppo"] == after["ppo"]
  assert done(tmp_path, "ppo")["config"]["iterations"] == 3

  # Stages built from a rerun stage that this run does not select are removed, not kept stale.
  runs.calls.clear()
  pipeline.run(smoke(**{"ppo.iterations": 3, "sft.steps": 9, "stages": "pretrain,sft"}),
               str(tmp_path), rerun=["sft"])
  assert runs.calls == ["sft"]
  assert sorted(os.listdir(tmp_path)) == ["pretrain", "sft"]


def test_rerun_names_known_stages_that_the_run_selects(tmp_path, runs):
  with pytest.raises(InputError, match="unknown stages \\['rm'\\]"):
    pipeline.run(smoke(), str(tmp_path), rerun=["rm"])
  with pytest.raises(InputError, match="names \\['ppo'\\], which config.stages"):
    pipeline.run(smoke(stages="pretrain,sft"), str(tmp_path), rerun=["ppo"])
  assert runs.calls == [] and not os.listdir(tmp_path)


def test_an_interrupted_stage_resumes_only_with_the_config_it_started_with(tmp_path, runs):
  runs.fail["reward"] = "late"
  with pytest.raises(Interrupted):
    pipeline.run(smoke(), str(tmp_path))
  assert runs.calls == ["pretrain", "sft", "reward"]
  assert not os.path.exists(tmp_path / "reward" / "done.json")

  runs.calls.clear()
  with pytest.raises(InputError) as refused:
    pipeline.run(smoke(**{"reward.normalisation_prompts": 16}), str(tmp_path))
  assert "reward was interrupted (it would resume) with other settings" in str(refused.value)
  assert "normalisation_prompts: 8 -> 16" in str(refused.value)
  assert "--rerun=reward" in str(refused.value) and runs.calls == []

  runs.fail.clear()
  pipeline.run(smoke(), str(tmp_path))  # the same config: it resumes (the trainer's own resume)
  assert runs.calls == ["reward", "ppo", "ppo_ptx", "evaluate"]


def test_a_stage_that_left_nothing_to_resume_starts_afresh_with_the_new_config(tmp_path, runs,
                                                                               capsys):
  runs.fail["sft"] = "early"
  (tmp_path / "sft").mkdir()
  (tmp_path / "sft" / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(Interrupted):
    pipeline.run(smoke(), str(tmp_path))
  runs.fail.clear()
  runs.calls.clear()
  pipeline.run(smoke(**{"sft.steps": 8}), str(tmp_path))
  assert runs.calls == ALL[1:]
  assert "left nothing to resume; starting it afresh" in capsys.readouterr().out
  assert not os.path.exists(tmp_path / "sft" / "metrics.jsonl")  # the old start's files are gone
  assert done(tmp_path, "sft")["config"]["steps"] == 8


def test_a_stage_built_from_another_run_of_its_source_is_refused(tmp_path, runs):
  pipeline.run(smoke(), str(tmp_path))
  record = done(tmp_path, "sft")
  record["run"] = "an earlier sft"
  (tmp_path / "sft" / "done.json").write_text(json.dumps(record))
  with pytest.raises(InputError, match="reward was built from an earlier run of sft") as refused:
    pipeline.run(smoke(), str(tmp_path))
  assert "--rerun=reward" in str(refused.value)

  shutil.rmtree(tmp_path / "sft")  # SFT would run again under a reward model built on the old one
  runs.calls.clear()
  with pytest.raises(InputError, match="reward was built from sft, which runs again now"):
    pipeline.run(smoke(), str(tmp_path))
  assert runs.calls == []


def test_a_stage_finished_before_records_existed_is_judged_by_its_config_json(tmp_path, runs):
  config = smoke()
  pipeline.run(config, str(tmp_path))
  section = pipeline.stage_config(config, "sft", str(tmp_path))
  # As an older pipeline left it: done.json without a config, the trainer's config.json.
  (tmp_path / "sft" / "done.json").write_text(json.dumps({"seconds": 1.0, "final": {}}))
  (tmp_path / "sft" / "pipeline.json").unlink()
  (tmp_path / "sft" / "config.json").write_text(json.dumps(
      {**section.to_dict(), common.RESOLVED_MODEL: {"d_model": 32}}))
  runs.calls.clear()
  pipeline.run(smoke(), str(tmp_path))
  assert runs.calls == []
  with pytest.raises(InputError, match="steps: 6 -> 7"):
    pipeline.run(smoke(**{"sft.steps": 7}), str(tmp_path))


# ----------------------------------------------------------------------------- checks before step 0


def learned(**overrides):
  """The smoke pipeline on learned positions (max_len 128), where sampling lengths matter;
  every later stage takes pretraining's architecture."""
  return smoke(**{"pretrain.model.position": "learned", **overrides})


def test_every_stage_is_checked_before_the_first_stage_trains(tmp_path, runs):
  pipeline.run(learned(), str(tmp_path / "fits"))  # the smoke settings fit
  runs.calls.clear()
  for overrides, where in [
      ({"evaluate.sampling.max_new_tokens": 100},
       "config.evaluate.sampling: prompt_len 64 + max_new_tokens 100: 164 exceeds the model's "
       "learned positions (max_len=128)"),
      ({"evaluate.few_shot.prompt_len": 120}, "config.evaluate.few_shot.prompt_len 120"),
      ({"evaluate.ptx_eval.seq_len": 256}, "config.evaluate.ptx_eval.seq_len"),
      ({"reward.sampling.prompt_len": 120}, "config.reward.sampling: prompt_len 120"),
      ({"sft.sampling.max_new_tokens": 80}, "config.sft.sampling: prompt_len 64"),
      ({"ppo_ptx.sampling.max_new_tokens": 80}, "config.ppo_ptx.sampling.prompt_len + "),
      ({"evaluate.mesh.data": -1, "evaluate.mesh.tensor": 1, "evaluate.sampling.batch_size": 12},
       "config.evaluate.sampling.batch_size"),
  ]:
    workdir = tmp_path / "bad"
    with pytest.raises(InputError, match="checked before any stage trains") as refused:
      pipeline.run(learned(**overrides), str(workdir))
    assert str(refused.value).startswith(where), (overrides, str(refused.value))
    assert runs.calls == [] and not os.path.exists(workdir), overrides


def test_the_command_stops_on_a_bad_evaluate_setting_before_pretraining(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "experiments.run", "--config",
             "experiments/configs/instructgpt.py:smoke", "--workdir", str(tmp_path)]
  bad = subprocess.run(command + ["--config.pretrain.model.position=learned",
                                  "--config.evaluate.sampling.max_new_tokens=100"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: config.evaluate.sampling: prompt_len 64 + max_new_tokens 100: 164 exceeds")
  assert not os.listdir(tmp_path)
  typo = subprocess.run(command + ["--rerun=rm"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert typo.returncode == 2 and "--rerun: 'rm': unknown stages ['rm']" in typo.stderr
  assert not os.listdir(tmp_path)


def write_rankings(path, n=12):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"prompt": f"Reverse: w{i}\nAnswer:", "responses": [f" a{i}", f" b{i}"],
                          "ranks": [0, 1]}) + "\n")
  return str(path)


def test_reward_normalisation_sampling_that_cannot_fit_fails_before_step_0(tmp_path):
  """The reward model samples the SFT policy for its normalisation after its last step; a
  prompt_len + max_new_tokens beyond the policy's learned positions must stop it before it
  trains, not after (the issue's RM lost to a late error). The policy's workdir needs only its
  config.json here: the check comes before its checkpoint is read and before the rankings are
  built (`data/`), which is where a run without the check would first have got to."""
  policy = str(tmp_path / "policy")
  trained = tiny.lm_config("pretrain", **{"model.position": "learned"})
  common.save_config(policy, trained,
                     common.model_config(trained, common.tokenizer_from_config(trained)))
  config = tiny.reward_config(init_from=policy, **{
      "data.source": "files", "data.train_files": write_rankings(tmp_path / "rankings.jsonl"),
      "sampling.max_new_tokens": 40})
  workdir = tmp_path / "rm"
  with pytest.raises(InputError, match="config.sampling: prompt_len 40 \\+ max_new_tokens 40: "
                     "80 exceeds the model's learned positions \\(max_len=64\\)"):
    reward.train(config, str(workdir))
  assert not os.path.exists(workdir / "checkpoints") and not os.path.exists(workdir / "data")

  # Without the normalisation nothing samples the policy on files: nothing to refuse.
  with config.unlocked():
    config.normalise = False
  layout = common.Layout.from_config(config)
  model_cfg = common.model_config(config, common.tokenizer_from_config(config))
  reward.check_settings(config, layout, model_cfg)


def test_sft_gold_evaluation_sampling_is_checked_before_step_0(tmp_path):
  config = tiny.lm_config("sft", **{"model.position": "learned", "sampling.max_new_tokens": 40})
  with pytest.raises(InputError, match="config.sampling: prompt_len 40 \\+ max_new_tokens 40"):
    lm.train(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_ppo_checks_rollouts_against_the_reward_model_that_scores_them():
  config = tiny.ppo_config(init_from="/nowhere/sft", reward_from="/nowhere/rm")
  layout = common.Layout.from_config(config)
  tokenizer = common.tokenizer_from_config(config)
  with config.unlocked():
    config.model.position = "learned"
  policy = common.model_config(config, tokenizer, inherit=False)
  short = dataclasses.replace(policy, max_len=32)
  ppo.check_settings(config, layout, policy, {"/nowhere/rm": policy})
  with pytest.raises(InputError, match="scored by the reward model"):
    ppo.check_settings(config, layout, policy, {"/nowhere/rm": short})


def test_the_stages_that_sample_for_training_must_draw_alike():
  from experiments.configs import instructgpt
  for variant in ("", "smoke", "small"):
    pipeline.check_one_sampling(instructgpt.get_config(variant))
  config = instructgpt.get_config("small")
  config.ppo.sampling.max_new_tokens = 64
  with pytest.raises(InputError, match=r"config.ppo.sampling.max_new_tokens.*is 64 but "
                     r"config.reward.sampling.max_new_tokens is 48"):
    pipeline.check_one_sampling(config)
  config = instructgpt.get_config("")
  config.reward.data.seq_len = 80
  with pytest.raises(InputError, match="config.reward.data.seq_len"):
    pipeline.check_one_sampling(config)


def test_a_stage_recorded_before_a_field_existed_reads_as_that_field_s_old_behaviour(tmp_path,
                                                                                     runs):
  pipeline.run(smoke(), str(tmp_path))
  for stage, key in (("ppo", "ppo.value_head_fit"), ("reward", "data.prompt_share"),
                     ("evaluate", "prompts_file")):
    path = os.path.join(tmp_path, stage, "done.json")
    record = done(tmp_path, stage)
    assert record["config"][key] == pipeline.ADDED_FIELDS[key]
    del record["config"][key]  # as a stage that ran before the field existed recorded it
    with open(path, "w") as f:
      json.dump(record, f)
  runs.calls.clear()
  pipeline.run(smoke(), str(tmp_path))
  assert runs.calls == []
  with pytest.raises(InputError, match='ppo.value_head_fit: "none" -> "first_rollout"'):
    pipeline.run(smoke(**{"ppo.ppo.value_head_fit": "first_rollout"}), str(tmp_path))
