"""The real recipe end to end at toy size (`instructgpt.py:hf_tiny`): a random GPT-2-shaped
Hugging Face checkpoint the test writes (with its tiny GPT-2-style tokenizer), HH-RLHF-format
records and a text corpus of its own, `experiments.prepare_data`, then one pipeline run: SFT ->
reward model + held-out judge -> PPO and PPO-ptx -> evaluation -> report. Then: sampling from
every stage's checkpoint, a changed stage override refused and rerun, a sampling setting that
cannot fit refused before step 0.
"""
import json
import pathlib

import pytest

from experiments import prepare_data
from experiments.configs import instructgpt, sample as sample_configs
from instructjax.errors import InputError
from instructjax.trainers import pipeline, recipe, stages
from test_real_data_stages import configure, hh_records, write_checkpoint

RUNS = ("sft", "reward", "judge", "ppo", "ppo_ptx", "evaluate")
# Words only the synthetic task's prompts, scorer and report rows use.
SYNTHETIC_WORDS = ("Gold", "gold", "labeler ceiling", "Labeler ceiling", "Inter-labeler",
                   "synthetic", "Sort:", "Answer:")


def toy(config, **extra):
  """hf_tiny at toy sizes for the test's 1-layer, 128-position checkpoint."""
  overrides = {"sft.steps": 4, "sft.eval_every": 2, "sft.save_every": 2, "sft.batch_size": 8,
               "sft.data.seq_len": 96, "sft.data.max_prompt_len": 64, "sft.eval_batches": 1,
               "evaluate.num_prompts": 8, "evaluate.sampling.batch_size": 8,
               "evaluate.ptx_eval.seq_len": 64, "evaluate.ptx_eval.max_batches": 1}
  for name in ("reward", "judge"):
    overrides.update({f"{name}.steps": 2, f"{name}.eval_every": 2, f"{name}.save_every": 2,
                      f"{name}.normalisation_prompts": 8, f"{name}.sampling.batch_size": 8,
                      f"{name}.data.seq_len": 80, f"{name}.data.max_prompt_len": 64})
  for name in ("ppo", "ppo_ptx"):
    overrides.update({f"{name}.iterations": 2, f"{name}.eval_every": 2,
                      f"{name}.save_every": 2, f"{name}.log_every": 1,
                      f"{name}.rollout_batch_size": 16, f"{name}.sampling.batch_size": 8,
                      f"{name}.ptx.seq_len": 64, f"{name}.ptx.batch_size": 8,
                      f"{name}.ptx.eval_batches": 1})
  for name in ("reward", "judge", "ppo", "ppo_ptx", "evaluate"):
    overrides.update({f"{name}.sampling.prompt_len": 64, f"{name}.sampling.max_new_tokens": 16})
  overrides.update(extra)
  return configure(config, overrides)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("real")
  ckpt, _ = write_checkpoint(root / "ckpt")
  raw = root / "hh.jsonl"
  raw.write_text("".join(json.dumps(row) + "\n" for row in hh_records(120)), encoding="utf-8")
  assert prepare_data.main(["hh_rlhf", "--in", str(raw), "--out", str(root / "data"),
                            "--holdout", "0.2"]) == 0
  corpus = root / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": f"Thing {i} is nice. Hello thing {i}."}) + "\n"
                            for i in range(60)), encoding="utf-8")
  config = toy(instructgpt.get_config("hf_tiny"), init_from_hf=str(ckpt),
               data_dir=str(root / "data"), ptx_files=str(corpus))
  workdir = root / "run"
  pipeline.run(config, str(workdir))
  return dict(root=root, ckpt=ckpt, data=root / "data", corpus=corpus, workdir=workdir)


def fresh_config(run, **extra):
  return toy(instructgpt.get_config("hf_tiny"), init_from_hf=str(run["ckpt"]),
             data_dir=str(run["data"]), ptx_files=str(run["corpus"]), **extra)


def test_every_stage_runs_and_the_report_is_headlined_by_the_judge(real_run):
  workdir = real_run["workdir"]
  for name in RUNS:
    assert (workdir / name / "done.json").is_file(), name
  assert not (workdir / "pretrain").exists()
  results = json.loads((workdir / "report.json").read_text())
  models = results["models"]
  assert set(models) == {"gpt", "sft", "ppo", "ppo_ptx"}
  assert models["gpt"]["workdir"] == str(real_run["ckpt"])  # GPT is the checkpoint itself
  for name in ("ppo", "ppo_ptx"):
    headline = models[name]["win_rate_vs_sft"]
    assert models[name]["headline_judge"] == "judge"
    assert 0.0 <= headline["low"] <= headline["win_rate"] <= headline["high"] <= 1.0
    assert set(models[name]["win_rates_vs_sft"]) == {"judge", "rm"}
    assert "kl_from_sft" in models[name] and "response_length" in models[name]
  assert all("pretraining_loss" in row for row in models.values())
  assert "held-out part" in results["settings"]["pretraining_text"]
  for key in ("reward_model", "judge_model"):
    assert results[key]["by_k"]["2"]["pairs"] > 0, results[key]
  assert results["skipped"]["gpt_prompted"].startswith("no few-shot examples")
  markdown = (workdir / "report.md").read_text()
  assert "held-out judge reward model" in markdown and "Judge RM accuracy" in markdown
  for word in SYNTHETIC_WORDS:
    assert word not in markdown, word
  for word in ("gold", "labeler", "task_seed", "few_shot"):
    assert word not in json.dumps(results), word
  prompts = [json.loads(line)["prompt"]
             for line in (real_run["data"] / "eval" / "prompts.jsonl").read_text().splitlines()]
  assert results["examples"][0]["prompt"] == prompts[0]


def test_the_judge_and_the_proxy_reward_model_train_on_disjoint_prompts(real_run):
  def prompts(name):
    [share] = (real_run["workdir"] / name / "data").glob("share-*.jsonl")
    return {json.loads(line)["prompt"] for line in share.read_text().splitlines()}
  proxy, judge = prompts("reward"), prompts("judge")
  everything = {json.loads(line)["prompt"] for line in
                (real_run["data"] / "rm" / "train.jsonl").read_text().splitlines()}
  assert proxy and judge and not proxy & judge and proxy | judge == everything


def test_every_stage_reads_the_prepared_files_and_nothing_synthetic(real_run):
  data, workdir = real_run["data"], real_run["workdir"]
  expected = {"sft": ("data.train_files", data / "sft" / "train.jsonl"),
              "reward": ("data.train_files", data / "rm" / "train.jsonl"),
              "judge": ("data.train_files", data / "rm" / "train.jsonl"),
              "ppo": ("data.files", data / "ppo" / "prompts.jsonl"),
              "ppo_ptx": ("data.files", data / "ppo" / "prompts.jsonl"),
              "evaluate": ("prompts_file", data / "eval" / "prompts.jsonl")}
  for name, (field, path) in expected.items():
    ran_with = json.loads((workdir / name / "done.json").read_text())["config"]
    assert ran_with[field] == str(path), name
    assert ran_with.get("data.source", "files") == "files", name
  assert not list(workdir.glob("*/data/synthetic")), "a stage wrote synthetic records"
  assert not list(workdir.glob("*/comparisons")), "a stage collected synthetic comparisons"


def test_every_stage_writes_the_checkpoint_s_architecture_and_tokenizer(real_run):
  for name in RUNS[:-1]:
    written = json.loads((real_run["workdir"] / name / "config.json").read_text())
    assert written["resolved_model"]["d_model"] == 40, name
    assert written["tokenizer"]["kind"] == "gpt2" and written["tokenizer"]["path"] == str(
        real_run["ckpt"])
    assert written["format"]["separator"] == " "


@pytest.mark.parametrize("stage", ["sft", "ppo", "ppo_ptx"])
def test_sampling_from_each_policy_checkpoint_of_the_run(real_run, stage, tmp_path):
  config = configure(sample_configs.get_config(), {
      "checkpoint": str(real_run["workdir"] / stage), "num_prompts": 2,
      "prompts_file": str(real_run["data"] / "eval" / "prompts.jsonl"),
      "sampling.prompt_len": 64, "sampling.max_new_tokens": 8, "sampling.batch_size": 8})
  assert stages.stage_runner("sample")(config, str(tmp_path))["num_samples"] == 2
  rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
  assert all("gold_score" not in row for row in rows)


def test_a_changed_stage_is_refused_and_rerun_redoes_it_and_the_later_stages_only(real_run):
  workdir = real_run["workdir"]
  runs = {name: json.loads((workdir / name / "done.json").read_text())["run"] for name in RUNS}
  changed = fresh_config(real_run, **{"judge.optimizer.lr": 1e-4})
  with pytest.raises(InputError, match=r"judge finished with other settings:\n.*optimizer.lr"):
    pipeline.run(changed, str(workdir))
  pipeline.run(fresh_config(real_run, **{"judge.optimizer.lr": 1e-4}), str(workdir),
               rerun=["judge"])
  now = {name: json.loads((workdir / name / "done.json").read_text())["run"] for name in RUNS}
  assert [name for name in RUNS if now[name] != runs[name]] == ["judge", "evaluate"]


def test_a_sampling_setting_that_cannot_fit_stops_before_any_stage_trains(real_run, tmp_path):
  config = fresh_config(real_run, **{f"{name}.sampling.prompt_len": 120 for name in
                                     ("reward", "judge", "ppo", "ppo_ptx")})
  with pytest.raises(InputError, match="max_len=128"):
    pipeline.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "sft").exists()


def test_the_recipe_names_what_it_needs(tmp_path, real_run):
  with pytest.raises(InputError, match="config.init_from_hf"):
    recipe.check(instructgpt.get_config("hf_tiny"))
  with pytest.raises(InputError, match="config.data_dir"):
    recipe.resolve(configure(instructgpt.get_config("hf_tiny"),
                             {"init_from_hf": str(real_run["ckpt"]), "data_dir": str(tmp_path),
                              "ptx_files": str(real_run["corpus"])}))
  with pytest.raises(InputError, match="config.ptx_files"):
    recipe.check(configure(instructgpt.get_config("hf_tiny"),
                           {"init_from_hf": str(real_run["ckpt"]),
                            "data_dir": str(real_run["data"])}))


def test_the_evaluation_refuses_a_checkpoint_read_with_another_tokenizer(real_run):
  from experiments.configs import evaluate as evaluate_configs
  from instructjax.trainers import common, evaluate
  config = evaluate_configs.get_config()  # the byte tokenizer, not the checkpoint's GPT-2 files
  with pytest.raises(InputError, match="config.models.gpt.*tokenizer"):
    evaluate.model_config_of("gpt", str(real_run["ckpt"]), config,
                             common.tokenizer_from_config(config))


@pytest.mark.parametrize("field", ["ppo_ptx.data.files", "judge.data.eval_files",
                                   "ppo_ptx.ptx.files"])
def test_a_missing_file_of_a_later_stage_stops_before_any_stage_trains(real_run, tmp_path, field):
  config = fresh_config(real_run, **{field: str(tmp_path / "missing.jsonl")})
  with pytest.raises(InputError, match=rf"config\.{field}: file not found: .*missing.jsonl"):
    pipeline.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "sft").exists()
