"""The reward-model stage: synthetic comparison collection, the ranking data path (TFDS build +
grain, K-way and pairwise), init from SFT, resume, normalisation and `load_reward_model`."""
import collections
import json
import os

import jax
import numpy as np
import pytest

import tiny
from instructjax import checkpoint, parallel
from instructjax.data import formatting, ranking_batches, rankings
from instructjax.data.builders import rankings as rankings_builder
from instructjax.data.tokenizers import make_tokenizer
from instructjax.errors import InputError
from instructjax.trainers import comparisons, common, reward, workdirs


@pytest.fixture(scope="module")
def sft_dir(tiny_sft_dir):
  """The session's tiny SFT checkpoint (conftest), shared by the tests that start from it."""
  return tiny_sft_dir


@pytest.fixture(scope="module")
def synthetic_run(sft_dir, tmp_path_factory):
  """An end-to-end run on synthetic comparisons collected from the SFT policy."""
  workdir = str(tmp_path_factory.mktemp("rm"))
  config = tiny.reward_config(init_from=sft_dir)
  final = reward.train(config, workdir)
  return workdir, config, final


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


def variable_k_rankings(n=12):
  """Rankings of K = 2, 3, 4 with a tie, and gold scores that agree with the ranks."""
  rows = []
  for i in range(n):
    k = 2 + i % 3
    ranks = list(range(k)) if i % 4 else [0] + [1] * (k - 1)
    rows.append({"prompt": f"Reverse: w{i}\nAnswer:", "responses": [f" r{i}-{j}" for j in range(k)],
                 "ranks": ranks, "gold_scores": [1.0 - r / k for r in ranks]})
  return rows


def params_at(workdir, config, step=None):
  """The ScalarModel params of a reward run's checkpoint, on one device, as numpy."""
  from flax import nnx
  from instructjax.models.decoder import ScalarModel
  model_cfg = common.model_config(config, common.tokenizer_from_config(config))
  _, abstract = common.split_model(lambda rngs: ScalarModel(model_cfg, rngs=rngs))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = checkpoint.abstract_like(nnx.to_pure_dict(abstract), one)
  return jax.device_get(checkpoint.restore_subtree(f"{workdir}/checkpoints", target, step=step))


def sft_params(sft_dir):
  from flax import nnx
  from instructjax.models.decoder import LanguageModel
  config = tiny.lm_config("sft")
  model_cfg = common.model_config(config, common.tokenizer_from_config(config))
  _, abstract = common.split_model(lambda rngs: LanguageModel(model_cfg, rngs=rngs))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = checkpoint.abstract_like(nnx.to_pure_dict(abstract), one)
  return jax.device_get(checkpoint.restore_subtree(f"{sft_dir}/checkpoints", target))


# ----------------------------------------------------------------------------- end to end


def test_synthetic_end_to_end_collects_trains_evaluates_and_normalises(synthetic_run):
  workdir, config, final = synthetic_run
  summary = json.load(open(os.path.join(workdir, "comparisons", "summary.json")))
  train_records, _ = rankings.read_rankings(os.path.join(workdir, "comparisons", "train.jsonl"))
  counts = summary["train"]
  assert counts["prompts"] == config.data.num_train_prompts
  # Every prompt is accounted for: a ranking, or a counted skip; every sample is kept.
  assert counts["records"] + counts["all_tied_skipped"] == counts["prompts"]
  assert counts["records"] == len(train_records)
  for record in train_records:
    assert 2 <= len(record["responses"]) <= config.data.max_k
    assert len(record["gold_scores"]) == len(record["responses"]) == len(record["ended"])
    assert len(set(record["ranks"])) > 1
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [l for l in lines if "eval_accuracy" in l]
  assert [l["step"] for l in evals] == [2, 4]
  assert all(0 <= l["eval_accuracy"] <= 1 and 0.5 < l["labeler_ceiling"] < 1 for l in evals)
  assert {"loss", "accuracy", "pairs_per_second", "comparisons_train_all_tied_skipped"} <= \
      set(lines[0])
  assert lines[0]["comparisons_train_all_tied_skipped"] == counts["all_tied_skipped"]
  norm = json.load(open(os.path.join(workdir, "reward_normalisation.json")))
  assert np.isfinite(norm["gain"]) and norm["gain"] > 0 and np.isfinite(norm["bias"])
  assert final["normalisation_gain"] == pytest.approx(norm["gain"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_load_reward_model_returns_what_was_saved(synthetic_run):
  workdir, config, _ = synthetic_run
  layout = common.Layout(parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                         parallel.DEFAULT_RULES)
  graphdef, params, model_cfg, gain, bias = workdirs.load_reward_model(workdir, layout)
  saved = params_at(workdir, config)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved)
  norm = json.load(open(os.path.join(workdir, "reward_normalisation.json")))
  assert (gain, bias) == (norm["gain"], norm["bias"])
  assert model_cfg.d_model == tiny.TINY_MODEL["d_model"]
  # Fitted after the final checkpoint was safe on disk, as the final evaluation's record says.
  assert json.load(open(os.path.join(workdir, "final_eval.json")))["normalisation_gain"] == gain
  # The loaded model scores texts: normalised rewards of the reference set have mean ~0, std ~1.
  task_prompts = [json.loads(l)["prompt"] for l in open(f"{workdir}/comparisons/train.jsonl")]
  tok = make_tokenizer("byte")
  raw = reward.score_texts(params, graphdef, tok, task_prompts[:3], [" a", " b", " c"],
                           seq_len=config.data.seq_len, max_prompt_len=config.data.max_prompt_len,
                           batch_size=8, layout=layout, fmt=formatting.from_config(config))
  assert raw.shape == (3,) and np.isfinite(raw).all()


def test_rerun_reuses_comparisons_and_refuses_other_settings(synthetic_run):
  workdir, config, _ = synthetic_run
  summary = comparisons.read_summary(workdir, config)
  assert summary is not None and summary["settings"]["min_k"] == config.data.min_k
  other = tiny.reward_config(init_from=config.init_from, **{"data.max_k": 3})
  with pytest.raises(InputError, match="other settings"):
    comparisons.read_summary(workdir, other)


# ----------------------------------------------------------------------------- init and files


def test_files_source_with_variable_k_and_backbone_bit_identical_to_sft(sft_dir, tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", variable_k_rankings(12))
  evals = write_jsonl(tmp_path / "eval.jsonl", variable_k_rankings(6))
  config = tiny.reward_config(init_from=sft_dir, steps=1, normalise=False,
                              **{"data.source": "files", "data.train_files": train,
                                 "data.eval_files": evals, "optimizer.lr": 0.0})
  final = reward.train(config, str(tmp_path / "rm"))
  # lr = 0: the one step changes nothing, so this is the state right after init.
  rm, sft = params_at(tmp_path / "rm", config), sft_params(sft_dir)
  jax.tree.map(np.testing.assert_array_equal, rm["backbone"], sft["backbone"])
  assert set(rm) == {"backbone", "head_w", "head_b"} and np.std(rm["head_w"]) > 0
  # Every K of the held-out file is evaluated; gold scores give the gold accuracy.
  assert {"eval_accuracy_k2", "eval_accuracy_k3", "eval_accuracy_k4",
          "eval_gold_accuracy"} <= set(final)
  assert final["eval_pairs"] == sum(len(rankings.pairs(r["ranks"]))
                                    for r in variable_k_rankings(6))
  assert not os.path.exists(tmp_path / "rm" / "reward_normalisation.json")


BAD_RECORDS = [
    ({"prompt": "p", "responses": ["a"], "ranks": [0]}, "at least 2 responses"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0]}, "2 responses but 1 ranks"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}, "no preference pair"),
    ({"prompt": "p", "responses": ["a", "  "], "ranks": [0, 1]}, "empty"),
    ({"prompt": "p", "responses": list("abcde"), "ranks": [0, 1, 2, 3, 4]}, "exceeds"),
]


@pytest.mark.parametrize("bad,message", BAD_RECORDS)
def test_bad_rankings_name_file_and_line(tmp_path, bad, message):
  good = variable_k_rankings(3)
  path = write_jsonl(tmp_path / "bad.jsonl", good[:2] + ["", bad] + good[2:])
  config = tiny.reward_config(**{"data.source": "files", "data.train_files": path})
  with pytest.raises(InputError, match=message) as error:
    reward.train(config, str(tmp_path / "rm"))
  assert f"{path}:4" in str(error.value)  # line 3 is blank and passed over


def test_skip_policy_counts_bad_rankings_but_never_skips_k_over_max_k(tmp_path):
  good = variable_k_rankings(3)
  path = write_jsonl(tmp_path / "bad.jsonl", good + [BAD_RECORDS[0][0], BAD_RECORDS[2][0]])
  stats = reward.check_files([path], max_k=4, on_bad="skip")
  assert stats.written == 3 and stats.skipped == {"too_few_responses": 1, "all_tied": 1}
  too_long = write_jsonl(tmp_path / "long.jsonl", good + [BAD_RECORDS[4][0]])
  with pytest.raises(InputError, match=f"{too_long}:4.*exceeds"):
    reward.check_files([too_long], max_k=4, on_bad="skip")
  # The builder with on_bad="skip" leaves the skipped records out; "error" refuses the file.
  built = rankings_builder.build({"train": [path], "validation": [path]}, tmp_path / "tfds",
                                 on_bad="skip")
  assert len(built["train"]) == 3
  with pytest.raises(InputError, match=f"{path}:4"):
    rankings_builder.build({"train": [path], "validation": [path]}, tmp_path / "tfds")


# ----------------------------------------------------------------------------- pipelines


def test_kway_and_pairwise_modes_train_on_the_same_pairs(tmp_path):
  rows = variable_k_rankings(10)
  path = write_jsonl(tmp_path / "r.jsonl", rows)
  source = rankings_builder.build({"train": [path], "validation": [path]},
                                  tmp_path / "tfds")["train"]
  tok = make_tokenizer("byte")
  kw = dict(seq_len=32, max_prompt_len=24, max_k=4, batch_size=1, seed=3, repeat=False)
  kway, pairwise = collections.Counter(), collections.Counter()
  for batch in ranking_batches.ranking_dataset(source, tok, mode="kway", **kw):
    assert batch["tokens"].shape == (1, 4, 32)
    kway.update(ranking_batches.tokenized_pair_multiset(batch))
  prompts_in_order = []
  for batch in ranking_batches.ranking_dataset(source, tok, mode="pairwise", **kw):
    assert batch["tokens"].shape == (1, 2, 32) and batch["valid"].all()
    pairwise.update(ranking_batches.tokenized_pair_multiset(batch))
    prompts_in_order.append(tok.decode(batch["tokens"][0, 0][:20]))
  expected = sum(len(rankings.pairs(r["ranks"])) for r in rows)
  assert sum(kway.values()) == expected and kway == pairwise
  # Pairs of one prompt are spread out, not consecutive.
  assert any(a != b for a, b in zip(prompts_in_order, prompts_in_order[1:]))
  runs = sum(1 for a, b in zip(prompts_in_order, prompts_in_order[1:]) if a == b)
  assert runs < len(prompts_in_order) - len(rows)


def test_ranking_iterator_resumes_at_the_next_batch(tmp_path):
  source = variable_k_rankings(9)
  tok = make_tokenizer("byte")
  for mode in ("kway", "pairwise"):
    ds = ranking_batches.ranking_dataset(source, tok, seq_len=32, max_prompt_len=24, max_k=4,
                                  batch_size=2, seed=0, mode=mode)
    it = iter(ds)
    for _ in range(3):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
      got = next(resumed)
      for key in ranking_batches.FIELDS:
        np.testing.assert_array_equal(got[key], want[key])


def test_eval_pass_uses_every_ranking_once_over_processes():
  source = variable_k_rankings(7)
  tok = make_tokenizer("byte")
  seen, batches = [], []
  for index in range(2):
    ds = ranking_batches.ranking_eval_dataset(source, tok, seq_len=32, max_prompt_len=24, max_k=4,
                                       batch_size=3, process_index=index, process_count=2)
    out = list(ds)
    batches.append(len(out))
    for batch in out:
      for valid, gold_valid in zip(batch["valid"], batch["gold_valid"]):
        seen.append(int(valid.sum()))
        np.testing.assert_array_equal(valid, gold_valid)
  assert batches == [2, 2]
  # 7 real rankings (their K) and 5 padding elements with no response.
  real = sorted(k for k in seen if k)
  assert real == sorted(len(r["responses"]) for r in source) and seen.count(0) == 12 - 7


def test_gold_ranks_are_dense_and_best_first():
  record = {"responses": ["a", "b", "c", "d"], "gold_scores": [0.2, 0.9, 0.2, 0.0]}
  out = ranking_batches.gold_ranks(record, max_k=5)
  np.testing.assert_array_equal(out["gold_ranks"], [1, 0, 1, 2, 0])
  np.testing.assert_array_equal(out["gold_valid"], [True] * 4 + [False])
  with pytest.raises(InputError, match="gold_scores"):
    ranking_batches.gold_ranks({"responses": ["a", "b"], "gold_scores": [1.0], "source": "x:1"}, 2)


# ----------------------------------------------------------------------------- collection


def test_rankings_keep_every_sample_and_skip_and_count_all_ties():
  from instructjax.data.synthetic import SyntheticTask
  task = SyntheticTask()
  prompts = task.prompts(3, "rm")
  answers = [task.answer(p) for p in prompts]
  Sampled = comparisons.Sampled

  def respond(flat):
    # prompt 0: K identical answers (all tied); prompt 1: the answer, an empty sample (EOS at
    # once) and a blank one; prompt 2: right and wrong answers, the wrong ones cut short.
    seen, out = collections.Counter(), []
    for p in flat:
      j, n = prompts.index(p), seen[p]
      seen[p] += 1
      if j == 0:
        out.append(Sampled(answers[0], True))
      elif j == 1:
        out.append(Sampled([answers[1], "", " "][n], True))
      else:
        out.append(Sampled(answers[2], True) if n % 2 else Sampled(" zzz", False))
    return out

  records, counts = comparisons.make_rankings(task, prompts, [3, 3, 4], respond, labeler_seed=0)
  assert counts.all_tied_skipped == 1 and counts.records == 2 == len(records)
  assert counts.empty_responses == 1 and counts.truncated_responses == 2
  assert records[0]["responses"] == [answers[1], "", " "]
  assert records[0]["ranks"][0] == 0 and records[0]["ended"] == [True] * 3
  record = records[1]
  assert record["prompt"] == prompts[2] and len(record["responses"]) == 4
  assert record["ended"] == [False, True, False, True]
  assert record["gold_scores"] == [task.score(prompts[2], r) for r in record["responses"]]
  for record in records:  # what collection writes, the reward model's reader accepts
    assert rankings.validate_ranking(record, "collected") == record
  ks = comparisons.draw_ks(1000, 4, 6, seed=0)
  assert set(ks) == {4, 5, 6}


def test_resume_equals_an_unbroken_run(sft_dir, tmp_path, monkeypatch):
  train = write_jsonl(tmp_path / "train.jsonl", variable_k_rankings(24))
  evals = write_jsonl(tmp_path / "eval.jsonl", variable_k_rankings(4))
  config = tiny.reward_config(init_from=sft_dir, steps=4, eval_every=100, **{
      "data.source": "files", "data.train_files": train, "data.eval_files": evals,
      "normalise": False})
  reward.train(config, str(tmp_path / "unbroken"))

  class Killed(Exception):
    pass

  save = checkpoint.Checkpointer.save

  def save_then_die(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if step == 2:
      raise Killed
    return saved

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)
  with pytest.raises(Killed):
    reward.train(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["2"]
  reward.train(config, str(tmp_path / "resumed"))
  a, b = params_at(tmp_path / "unbroken", config), params_at(tmp_path / "resumed", config)
  jax.tree.map(np.testing.assert_array_equal, a, b)
