"""The evaluation stage: win rates and intervals against hand-computed cases, KL and curves against
slow references, the report files, and the whole stage on tiny hand-made checkpoints."""
import itertools
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import tiny
from experiments.configs import evaluate as evaluate_config
from instructjax import checkpoint, evaluation, report
from instructjax.data.formatting import Format
from instructjax.errors import InputError
from instructjax.metrics import MetricWriter
from instructjax.models.decoder import LanguageModel, ScalarModel
from instructjax.sampling import SamplingConfig
from instructjax.trainers import common, evaluate, lm, reward, sft_eval
from instructjax.trainers import workdirs as workdirs_module

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- statistics


def test_win_rate_matches_a_hand_computed_wilson_interval():
  # 10 prompts: 6 wins, 2 ties, 2 losses -> p = (6 + 2 / 2) / 10 = 0.7.
  model = [0.9, 0.8, 0.7, 0.6, 0.5, 1.0, 0.3, 0.4, 0.1, 0.0]
  sft = [0.1, 0.2, 0.3, 0.4, 0.2, 0.5, 0.3, 0.4, 0.6, 0.2]
  result = evaluation.win_rate(model, sft)
  assert (result["wins"], result["ties"], result["losses"], result["n"]) == (6, 2, 2, 10)
  assert result["win_rate"] == pytest.approx(0.7)
  # By hand: z^2 / n = 0.38415; centre = (0.7 + 0.19207) / 1.38415 = 0.64449;
  # half = 1.95996 * sqrt(0.021 + 0.0096037) / 1.38415 = 0.24771.
  assert result["low"] == pytest.approx(0.39678, abs=2e-5)
  assert result["high"] == pytest.approx(0.89220, abs=2e-5)


def test_wilson_interval_keeps_a_width_when_every_prompt_is_a_win():
  low, high = evaluation.wilson_interval(4, 4)
  assert high == 1.0
  assert low == pytest.approx(4 / (4 + Z95**2))  # the Wilson lower bound at p = 1 is n/(n+z^2)
  low, high = evaluation.wilson_interval(0, 4)
  assert low == 0.0 and high == pytest.approx(1 - 4 / (4 + Z95**2))


def test_win_outcomes_count_ties_half_and_need_the_same_prompts():
  np.testing.assert_array_equal(evaluation.win_outcomes([1, 0.5, 0], [0, 0.5, 1]), [1, 0.5, 0])
  with pytest.raises(InputError, match="same prompts"):
    evaluation.win_rate([0.1, 0.2], [0.1])
  with pytest.raises(InputError, match="not finite"):
    evaluation.win_rate([math.nan], [0.1])


def test_mean_ci_is_the_normal_approximation():
  stat = evaluation.mean_ci([1.0, 2.0, 3.0, 4.0])
  stderr = math.sqrt(((1.5**2 + 0.5**2) * 2) / 3) / 2  # sample std (ddof 1) / sqrt(n)
  assert stat["mean"] == 2.5 and stat["stderr"] == pytest.approx(stderr)
  assert stat["low"] == pytest.approx(2.5 - Z95 * stderr)
  assert stat["high"] == pytest.approx(2.5 + Z95 * stderr)
  assert math.isnan(evaluation.mean_ci([3.0])["low"])  # one value: no width to estimate
  with pytest.raises(InputError, match="confidence"):
    evaluation.mean_ci([1.0, 2.0], confidence=1.5)


def test_sequence_log_ratio_sums_only_response_tokens():
  rng = np.random.default_rng(0)
  logp, ref = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
  want = [sum(logp[b, t] - ref[b, t] for t in range(5) if mask[b, t]) for b in range(3)]
  np.testing.assert_allclose(evaluation.sequence_log_ratio(logp, ref, mask), want)


def test_training_curves_tolerate_missing_keys_and_resumed_steps():
  records = [{"step": 1, "stage": "ppo", "score": 0.1, "kl_sequence": 0.0},
             {"step": 2, "stage": "ppo", "score": 0.2},  # no KL logged here
             {"step": 2, "stage": "ppo", "score": 0.3, "kl_sequence": 0.5},  # resumed: wins
             {"step": 4, "stage": "ppo", "eval_ptx_loss": 2.0, "gold_score": 0.7, "kl": 1.0}]
  curves = evaluation.training_curves(records)
  assert curves["rm_score"] == [[1, 0.1], [2, 0.3]]
  assert curves["kl"] == [[1, 0.0], [2, 0.5], [4, 1.0]]
  assert curves["eval_ptx_loss"] == [[4, 2.0]]
  assert "eval_gold_score" not in curves
  assert evaluation.paired(curves, "kl", "gold_score") == [[1.0, 0.7]]
  assert evaluation.paired(curves, "kl", "eval_gold_score") == []


def test_pair_accuracy_by_kind_against_a_hand_count():
  pairs = [  # kind, reward a, reward b, gold a, gold b, rank a, rank b
      ("answer", 1.0, 0.0, 0.9, 0.1, 0, 1),   # right by gold and by the labeler
      ("answer", 1.0, 0.0, 0.1, 0.9, 0, 1),   # wrong by gold, right by the (noisy) labeler
      ("remark", 0.5, 0.5, 0.8, 0.4, 1, 0),   # equal rewards: half, both ways
      ("remark", 2.0, 3.0, 0.5, 0.5, 0, 0),   # equal gold: no pair
  ]
  gaps_seen = []
  ceiling = lambda gaps: gaps_seen.append(sorted(gaps)) or 0.75
  out = evaluation.pair_accuracy_by_kind(pairs, ceiling)
  assert out["answer"] == dict(pairs=2, gold_accuracy=0.5, labeler_accuracy=1.0,
                               labeler_ceiling=0.75)
  assert out["remark"] == dict(pairs=1, gold_accuracy=0.5, labeler_accuracy=0.5,
                               labeler_ceiling=0.75)
  assert out["all"]["pairs"] == 3 and out["all"]["gold_accuracy"] == pytest.approx(1.5 / 3)
  assert [0.4] in gaps_seen and [0.4, 0.8, 0.8] in [[round(g, 6) for g in x] for x in gaps_seen]


def test_reward_model_summary_reads_the_last_evaluation():
  records = [{"step": 2, "eval_accuracy": 0.6, "labeler_ceiling": 0.8},
             {"step": 4, "loss": 0.5},
             {"step": 4, "eval_accuracy": 0.65, "eval_gold_accuracy": 0.7, "labeler_ceiling": 0.8}]
  assert evaluation.reward_model_summary(records) == dict(
      eval_accuracy=0.65, eval_gold_accuracy=0.7, labeler_ceiling=0.8, step=4)
  assert evaluation.reward_model_summary([{"step": 1, "loss": 1.0}]) is None


# ----------------------------------------------------------------------------- report


def hand_made_results():
  rng = np.random.default_rng(1)
  sft_gold = rng.uniform(size=20)
  outputs = {
      "gpt": dict(gold=sft_gold * 0.3, kl=rng.normal(5, 1, 20), pretraining_loss=1.5),
      "sft": dict(gold=sft_gold, kl=np.zeros(20), pretraining_loss=1.7, rm=rng.normal(size=20)),
      "ppo": dict(gold=np.minimum(sft_gold + 0.2, 1), kl=rng.normal(3, 1, 20),
                  pretraining_loss=2.1, rm=rng.normal(1, 1, 20)),
  }
  return dict(settings=dict(num_prompts=20, split="eval", decoding="greedy decoding",
                            confidence=0.95),
              models=evaluation.summarise(outputs),
              skipped={"ppo_ptx": "no workdir given"},
              reward_model=dict(eval_accuracy=0.66, labeler_ceiling=0.8, labeler_agreement=0.73,
                                step=10, by_difference={
                                    "all": dict(pairs=3, gold_accuracy=0.5, labeler_accuracy=0.5,
                                                labeler_ceiling=0.7),
                                    "answer": dict(pairs=2, gold_accuracy=0.25,
                                                   labeler_accuracy=0.5, labeler_ceiling=0.75)}),
              examples=[dict(prompt="Reverse: abc\nAnswer:", responses={"sft": " cba",
                                                                         "ppo": " cba\nmore"})])


def test_write_report_writes_json_markdown_tables_and_png_plots(tmp_path):
  results = hand_made_results()
  curves = {"ppo": {"kl": [[1, 0.0], [2, 1.0]], "rm_score": [[1, 0.0], [2, 0.5]],
                    "eval_ptx_loss": [[2, 2.0]]},
            "ppo_ptx": {"kl": [[1, 0.0]], "gold_score": [[1, 0.4]]}}
  written = report.write_report(str(tmp_path), results, curves)
  assert set(written) == {"json", "markdown", "win_rate", "score_vs_kl", "ptx_loss"}
  for kind in ("win_rate", "score_vs_kl", "ptx_loss"):
    with open(written[kind], "rb") as f:
      assert f.read(8) == PNG_SIGNATURE
  with open(written["json"]) as f:
    stored = json.load(f)  # strict JSON: NaN would not parse back with allow_nan=False writers
  assert stored["models"]["ppo"]["win_rate_vs_sft"]["wins"] == results["models"]["ppo"][
      "win_rate_vs_sft"]["wins"]
  assert stored["curves"]["ppo"]["kl"] == [[1, 0.0], [2, 1.0]]
  md = open(written["markdown"]).read()
  for heading in ("## Win rate against SFT", "## Scores, KL from SFT, length",
                  "## Alignment tax: held-out pretraining loss", "## Reward models",
                  "## Not evaluated"):
    assert heading in md
  ppo = results["models"]["ppo"]["win_rate_vs_sft"]
  assert f"| PPO | {ppo['win_rate']:.3f} [{ppo['low']:.3f}, {ppo['high']:.3f}] |" in md
  assert "| PPO | 2.100 | +0.400 |" in md  # pretraining loss and its change against SFT
  assert "| 0.660 | – | 0.800 | 0.730 | 10 |" in md
  assert md.index("| answer | 2 | 0.500 | 0.250 | 0.750 |") < md.index("| all | 3 |")
  assert "SFT likelihood" not in md
  for likelihood, row in zip((0.8, 0.6), results["reward_model"]["by_difference"].values()):
    row["sft_likelihood_gold_accuracy"] = likelihood
  md = open(report.write_report(str(tmp_path / "with_sft"), results, curves)["markdown"]).read()
  assert "| Labeler ceiling | SFT likelihood (gold order) |" in md
  assert "| answer | 2 | 0.500 | 0.250 | 0.750 | 0.600 |" in md
  for train, row in zip((0.9, float("nan")), results["reward_model"]["by_difference"].values()):
    row["train_gold_accuracy"] = train
  written = report.write_report(str(tmp_path / "with_train"), results, curves)
  md = open(written["markdown"]).read()
  assert "| On training pairs (gold order) | SFT likelihood (gold order) |" in md
  assert "| answer | 2 | 0.500 | 0.250 | 0.750 | – | 0.600 |" in md  # no such training pair
  with open(written["json"]) as f:
    json.load(f)  # the NaN is written as strict JSON
  for name in (report.WIN_RATE_PNG, report.SCORE_VS_KL_PNG, report.PTX_LOSS_PNG):
    assert f"]({name})" in md
  assert "- PPO-ptx: no workdir given" in md


def test_report_without_curves_or_baseline_links_no_missing_plot(tmp_path):
  outputs = {"gpt": dict(gold=[0.1, 0.2])}
  results = dict(models=evaluation.summarise(outputs), skipped={"sft": "no workdir given"})
  written = report.write_report(str(tmp_path), results, {})
  assert set(written) == {"json", "markdown"}  # no win rates without SFT, no PPO curves
  md = open(written["markdown"]).read()
  assert ".png" not in md and "| GPT | – | – |" in md
  assert not any(name.endswith(".png") for name in os.listdir(tmp_path))


# ----------------------------------------------------------------------------- the stage


def save_params(directory, state, step=1, config=None):
  """A checkpoint of `state` at `step`, and the stage's config.json, as a trainer leaves them."""
  with checkpoint.Checkpointer(f"{directory}/checkpoints", save_every=1, keep=1) as ckpt:
    ckpt.save(step, state, force=True)
  if config is not None:
    with open(f"{directory}/config.json", "w") as f:
      json.dump(config.to_dict(), f)


def restored_lm_params(workdir, path=("params",)):
  config = tiny.lm_config("sft")
  model_cfg = common.model_config(config, common.tokenizer_from_config(config))
  _, abstract = common.split_model(lambda rngs: LanguageModel(model_cfg, rngs=rngs))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = checkpoint.abstract_like(nnx.to_pure_dict(abstract), one)
  return jax.device_get(checkpoint.restore_subtree(f"{workdir}/checkpoints", target, path=path))


@pytest.fixture(scope="module")
def workdirs(tiny_sft_dir, tmp_path_factory):
  """A tiny GPT run and the session's tiny SFT run; PPO and PPO-ptx in the PPO checkpoint layout
  with known policies (PPO = SFT's parameters, PPO-ptx = GPT's) and metrics; a reward model with
  a known normalisation."""
  root = tmp_path_factory.mktemp("stages")
  dirs = {name: str(root / name) for name in ("gpt", "ppo", "ppo_ptx", "rm")}
  dirs["sft"] = tiny_sft_dir
  lm.train(tiny.lm_config("pretrain", steps=2), dirs["gpt"])
  sft_config = tiny.lm_config("sft")
  model_cfg = common.model_config(sft_config, common.tokenizer_from_config(sft_config))
  value = nnx.to_pure_dict(nnx.split(ScalarModel(model_cfg, rngs=nnx.Rngs(3)))[1])
  for name, policy_from in (("ppo", "sft"), ("ppo_ptx", "gpt")):
    os.makedirs(dirs[name])
    state = {"params": {"policy": restored_lm_params(dirs[policy_from]), "value": value},
             "step": np.int32(4)}
    save_params(dirs[name], state, step=4, config=sft_config)
    with MetricWriter(dirs[name], "ppo") as writer:
      for step in (2, 4):
        writer.write(step, dict(score=0.1 * step, kl_sequence=0.5 * step, gold_score=0.2))
      writer.write(4, dict(eval_ptx_loss=3.0 if name == "ppo" else 2.5))
  os.makedirs(dirs["rm"])
  save_params(dirs["rm"], {"params": value}, config=tiny.reward_config())
  with open(f"{dirs['rm']}/{reward.NORMALISATION_FILE}", "w") as f:
    json.dump(dict(gain=2.0, bias=-1.0), f)
  with MetricWriter(dirs["rm"], "reward") as writer:
    writer.write(1, dict(eval_accuracy=0.625, eval_gold_accuracy=0.75, labeler_ceiling=0.81))
  return dirs


def eval_config(**fields):
  config = evaluate_config.get_config("tiny")
  with config.unlocked():
    config.model.update(tiny.TINY_MODEL)
    config.num_prompts = 8
    config.sampling.update(dict(prompt_len=40, max_new_tokens=8, batch_size=8))
    config.few_shot.prompt_len = 56
    config.ptx_eval.update(dict(num_documents=8, seq_len=48, batch_size=8))
    config.report_examples = 2
    for key, value in fields.items():
      parent, _, leaf = key.rpartition(".")
      (config[parent] if parent else config)[leaf] = value
  return config


@pytest.fixture(scope="module")
def full_run(workdirs, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("eval"))
  config = eval_config(**{f"models.{n}": workdirs[n] for n in ("gpt", "sft", "ppo", "ppo_ptx")},
                       reward_from=workdirs["rm"])
  return out, config, evaluate.run(config, out)


def test_all_five_models_are_evaluated_against_sft(full_run):
  _, _, results = full_run
  models = results["models"]
  assert list(models) == list(evaluation.MODELS)
  assert results["skipped"] == {}
  # SFT against itself, and PPO (= SFT's parameters): every prompt a tie, KL exactly 0.
  for name in ("sft", "ppo"):
    win = models[name]["win_rate_vs_sft"]
    assert (win["win_rate"], win["ties"], win["n"]) == (0.5, 8, 8)
    assert models[name]["kl_from_sft"]["mean"] == 0.0
    assert models[name]["kl_from_sft"]["high"] == 0.0
  # PPO-ptx holds GPT's parameters: same greedy answers, same pretraining loss.
  for key in ("gold_score", "win_rate_vs_sft"):
    assert models["ppo_ptx"][key] == models["gpt"][key]
  assert models["ppo_ptx"]["pretraining_loss"] == pytest.approx(models["gpt"]["pretraining_loss"])
  assert models["ppo"]["pretraining_loss"] == pytest.approx(models["sft"]["pretraining_loss"])
  for name in ("gpt", "gpt_prompted", "ppo_ptx"):
    assert math.isfinite(models[name]["kl_from_sft"]["mean"])
  assert models["gpt_prompted"]["prompts_truncated"] >= 0
  assert models["ppo"]["checkpoint_step"] == 4


def test_gold_score_matches_the_sft_stage_evaluation(full_run, workdirs):
  """The SFT row's greedy gold score equals sft_eval's, computed by another path."""
  _, config, results = full_run
  layout = common.Layout.from_config(config)
  tokenizer = common.tokenizer_from_config(config)
  task = evaluate.synthetic_task(config)
  policy = evaluate.load_policy("sft", workdirs["sft"], config, layout, tokenizer)
  sft_config = tiny.lm_config("sft", eval_samples=8)
  want = sft_eval.gold_score_eval(sft_config, task, policy.params, policy.handle, tokenizer,
                                  layout)["eval_gold_score"]
  assert results["models"]["sft"]["gold_score"]["mean"] == pytest.approx(want)


def test_rm_scores_are_normalised_and_accuracy_is_read(full_run, workdirs):
  _, config, results = full_run
  layout = common.Layout.from_config(config)
  tokenizer = common.tokenizer_from_config(config)
  graphdef, params, _, gain, bias = workdirs_module.load_reward_model(workdirs["rm"], layout)
  assert (gain, bias) == (2.0, -1.0)
  prompts = [e["prompt"] for e in results["examples"]]
  responses = [e["responses"]["sft"] for e in results["examples"]]
  raw = reward.score_texts(params, graphdef, tokenizer, prompts, responses, seq_len=48,
                           max_prompt_len=40, batch_size=8, layout=layout, fmt=Format())
  assert math.isfinite(results["models"]["sft"]["rm_score"]["mean"])
  # The examples are the first prompts; recompute their normalised scores by hand.
  per_prompt = evaluate.RewardModel(graphdef, params, gain, bias, 48, 40, Format()).score(
      prompts, responses, batch_size=8, layout=layout, tokenizer=tokenizer)
  np.testing.assert_allclose(per_prompt, 2.0 * raw - 1.0, rtol=1e-6)
  rm = results["reward_model"]
  assert (rm["eval_accuracy"], rm["eval_gold_accuracy"], rm["labeler_ceiling"]) == (
      0.625, 0.75, 0.81)
  assert rm["labeler_agreement"] == pytest.approx(0.73, abs=0.01)


def test_report_files_of_the_stage(full_run):
  out, _, results = full_run
  md = open(f"{out}/{report.REPORT_MD}").read()
  for label in ("GPT", "GPT-prompted", "SFT", "PPO", "PPO-ptx"):
    assert f"| {label} |" in md
  for name in (report.WIN_RATE_PNG, report.SCORE_VS_KL_PNG, report.PTX_LOSS_PNG):
    assert f"]({name})" in md
    with open(f"{out}/{name}", "rb") as f:
      assert f.read(8) == PNG_SIGNATURE
  stored = json.load(open(f"{out}/{report.REPORT_JSON}"))
  assert stored["curves"]["ppo"]["rm_score"] == [[2, 0.2], [4, 0.4]]
  assert stored["curves"]["ppo_ptx"]["eval_ptx_loss"] == [[4, 2.5]]
  assert stored["models"]["sft"]["gold_score"]["mean"] == results["models"]["sft"]["gold_score"][
      "mean"]


def test_response_log_probs_match_the_samplers():
  """The KL's log-probs (full forward over prompt + response) equal the sampler's own."""
  config = eval_config()
  layout = common.Layout.from_config(config)
  tokenizer = common.tokenizer_from_config(config)
  model_cfg = common.model_config(config, tokenizer)
  model = LanguageModel(model_cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  handle = common.ModelHandle(graphdef, model_cfg, None)
  policy = evaluate.Policy("sft", "", handle, nnx.to_pure_dict(state), None)
  prompts = evaluate.synthetic_task(config).prompts(5, "eval")
  compiled = evaluate.Compiled(layout, tokenizer)
  completions = evaluate.sample(policy, prompts, SamplingConfig(max_new_tokens=8), prompt_len=40,
                                batch_size=8, compiled=compiled, rng=jax.random.PRNGKey(1))
  logp, mask = evaluate.response_log_probs(policy, prompts, completions, prompt_len=40,
                                           max_new_tokens=8, batch_size=8, compiled=compiled)
  assert mask.sum(1).tolist() == [len(c.tokens) for c in completions]
  np.testing.assert_allclose(logp.sum(1), [c.log_prob for c in completions], atol=1e-4)


def test_missing_models_are_skipped_cleanly(workdirs, tmp_path):
  config = eval_config(**{"models.sft": workdirs["sft"], "ptx_eval.source": "none",
                          "kl_from_sft": False})
  results = evaluate.run(config, str(tmp_path))
  assert list(results["models"]) == ["sft"]
  assert set(results["skipped"]) == {"gpt", "gpt_prompted", "ppo", "ppo_ptx"}
  assert "pretraining_loss" not in results["models"]["sft"]
  assert "reward_model" not in results
  md = open(tmp_path / report.REPORT_MD).read()
  assert "## Not evaluated" in md and report.SCORE_VS_KL_PNG not in md


def test_bad_configs_name_the_field(workdirs, tmp_path):
  with pytest.raises(InputError, match="config.models"):
    evaluate.run(eval_config(), str(tmp_path))
  with pytest.raises(InputError, match="config.models.ppo"):
    evaluate.run(eval_config(**{"models.ppo": str(tmp_path / "typo")}), str(tmp_path))
  with pytest.raises(InputError, match="config.rm_train_rankings: must be >= 0"):
    evaluate.run(eval_config(**{"models.sft": workdirs["sft"], "rm_train_rankings": -1}),
                 str(tmp_path))
  # A PPO entry that points at an SFT run has no params/policy: the error says so.
  with pytest.raises(InputError, match="params/policy"):
    evaluate.run(eval_config(**{"models.ppo": workdirs["sft"], "kl_from_sft": False,
                                "ptx_eval.source": "none"}), str(tmp_path))
  other = tmp_path / "other_tokenizer"
  shutil.copytree(workdirs["sft"], other)
  stored = json.load(open(other / "config.json"))
  stored["tokenizer"]["kind"] = "gpt2"
  json.dump(stored, open(other / "config.json", "w"))
  with pytest.raises(InputError, match="tokenizer"):
    evaluate.run(eval_config(**{"models.sft": str(other)}), str(tmp_path))


def test_pretraining_text_from_files(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "one doc"}\n{"text": "two doc"}\n')
  (tmp_path / "b.txt").write_text("a whole file")
  config = eval_config(**{"ptx_eval.source": "files",
                          "ptx_eval.files": f"{tmp_path}/a.jsonl,{tmp_path}/b.txt"})
  texts, what = evaluate.pretraining_documents(config, None, str(tmp_path))
  assert texts == ["one doc", "two doc", "a whole file"] and "3 documents" in what
  with pytest.raises(InputError, match="missing.txt"):
    evaluate.pretraining_documents(eval_config(**{"ptx_eval.source": "files",
                                                  "ptx_eval.files": f"{tmp_path}/missing.txt"}),
                                   None, str(tmp_path))


def test_the_alignment_tax_reads_the_part_of_the_ptx_corpus_ppo_ptx_held_out(tmp_path):
  # 40 documents: the builders hold out 40 // 20 = 2, evenly spaced: the 20th and the 40th.
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(40)))
  config = eval_config(**{"ptx_eval.source": "heldout", "ptx_eval.files": str(corpus)})
  texts, what = evaluate.pretraining_documents(config, None, str(tmp_path / "eval"))
  assert texts == ["document 19", "document 39"] and "held-out part" in what
  # One long document: its tail, as the PPO stage's ptx stream holds it out.
  (tmp_path / "book.txt").write_text("\n\n".join(f"Paragraph {i} of the book." for i in range(60)))
  config = eval_config(**{"ptx_eval.source": "heldout", "ptx_eval.files": f"{tmp_path}/book.txt"})
  [tail], _ = evaluate.pretraining_documents(config, None, str(tmp_path / "eval2"))
  assert tail.strip().endswith("Paragraph 59 of the book.") and "Paragraph 0 " not in tail


def test_run_dispatches_the_evaluate_stage():
  from instructjax.trainers import stages
  assert stages.stage_runner(evaluate_config.get_config().stage) is evaluate.run


def test_rm_accuracy_by_difference_on_its_held_out_comparisons(full_run, workdirs, tmp_path):
  _, config, _ = full_run
  layout = common.Layout.from_config(config)
  tokenizer = common.tokenizer_from_config(config)
  task = evaluate.synthetic_task(config)
  rm = evaluate.load_reward(workdirs["rm"], layout)
  prompt = task.prompts(1, "eval")[0]
  answer = task.answer(prompt)
  responses = [answer, answer + "\ndone.", " 9 9 9 9", answer + "\nhope it helps."]
  ranking = dict(prompt=prompt, responses=responses, ranks=[0, 1, 3, 2],
                 gold_scores=[task.score(prompt, r) for r in responses])
  rm_dir = tmp_path / "rm"
  shutil.copytree(workdirs["rm"], rm_dir)
  os.makedirs(rm_dir / "comparisons")
  (rm_dir / "comparisons" / "eval.jsonl").write_text(json.dumps(ranking) + "\n")
  out = evaluate.reward_model_breakdown(rm, str(rm_dir), task, batch_size=8, layout=layout,
                                        tokenizer=tokenizer)
  scores = rm.score([prompt] * 4, responses, batch_size=8, layout=layout, tokenizer=tokenizer)
  gold = ranking["gold_scores"]
  rm_right = [(scores[a] > scores[b]) == (gold[a] > gold[b]) for a, b in
              itertools.combinations(range(4), 2) if gold[a] != gold[b]]
  assert out["all"]["pairs"] == len(rm_right) == 6
  assert out["all"]["gold_accuracy"] == pytest.approx(np.mean(rm_right))
  # answer vs answer+remark and the two remarks of different length: what_differs' three kinds.
  assert set(out) == {"all", "remark", "answer", "remark text"}
  assert out["remark text"]["pairs"] == 1 and out["answer"]["pairs"] == 1
  assert all("sft_likelihood_gold_accuracy" not in row for row in out.values())

  # With the SFT policy: its log-likelihood of each response orders the pairs too, checked here
  # against a plain forward over the unpadded prompt + response + EOS.
  sft_policy = evaluate.load_policy("sft", workdirs["sft"], config, layout, tokenizer)
  with_sft = evaluate.reward_model_breakdown(
      rm, str(rm_dir), task, batch_size=8, layout=layout, tokenizer=tokenizer,
      sft_policy=sft_policy)
  model = nnx.merge(sft_policy.handle.graphdef, sft_policy.params)
  likelihood = []
  for response in responses:
    prompt_ids = tokenizer.encode(prompt)
    ids = np.array(prompt_ids + tokenizer.encode(response) + [tokenizer.eos_id])
    logits, _ = model(ids[None], np.ones((1, len(ids)), np.int32))
    log_probs = np.asarray(jax.nn.log_softmax(logits[0, :-1]))
    likelihood.append(sum(log_probs[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids))))
  right = [(likelihood[a] > likelihood[b]) == (gold[a] > gold[b]) for a, b in
           itertools.combinations(range(4), 2) if gold[a] != gold[b]]
  assert with_sft["all"]["sft_likelihood_gold_accuracy"] == pytest.approx(np.mean(right))
  assert with_sft["all"]["gold_accuracy"] == out["all"]["gold_accuracy"]

  # On its training rankings: the first `train_rankings` of them, scored by the same RM.
  flipped = dict(ranking, gold_scores=[1.0 - g for g in gold])
  (rm_dir / "comparisons" / "train.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in (flipped, ranking)))
  with_train = evaluate.reward_model_breakdown(rm, str(rm_dir), task, batch_size=8,
                                               layout=layout, tokenizer=tokenizer,
                                               train_rankings=1)
  assert with_train["all"]["train_gold_accuracy"] == pytest.approx(1 - np.mean(rm_right))
  assert "train_gold_accuracy" not in out["all"]
  assert evaluate.reward_model_breakdown(rm, workdirs["rm"], task, batch_size=8, layout=layout,
                                         tokenizer=tokenizer) is None  # no comparisons there
  (rm_dir / "comparisons" / "eval.jsonl").write_text(json.dumps(dict(ranking, ranks=[0])) + "\n")
  with pytest.raises(InputError, match="eval.jsonl:1"):
    evaluate.reward_model_breakdown(rm, str(rm_dir), task, batch_size=8, layout=layout,
                                    tokenizer=tokenizer)


def test_the_report_says_when_a_response_is_empty_or_only_whitespace():
  results = dict(models={}, examples=[dict(prompt="p", responses={
      "gpt": "\n\n \n", "sft": "", "ppo": " a `b`\nc"})])
  md = report.render_markdown(results, {}, {})
  assert "- **GPT**: (only whitespace: 4 characters)" in md
  assert "- **SFT**: (empty)" in md
  assert "- **PPO**: `a 'b'\\nc`" in md
