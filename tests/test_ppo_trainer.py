"""The PPO-ptx stage end to end on tiny models: metrics, kill-and-resume exactness, value init,
plain PPO without the pretraining stream, frozen models in bfloat16, the prompt pipeline and the
config's sweep."""
import hashlib
import json
import os

import jax
import numpy as np
import pytest

import tiny
from experiments import sweep as sweep_lib
from experiments.configs import ppo as ppo_configs
from instructjax import checkpoint, parallel
from instructjax.data import pipeline, records, synthetic
from instructjax.data.tokenizers import make_tokenizer
from instructjax.errors import InputError
from instructjax.trainers import common, ppo, reward, workdirs


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache for this module: its runs compile the same phases again and again
  (every run, and every evaluation's sampler), which would otherwise dominate its time."""
  from jax._src import compilation_cache as cache
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  cache.reset_cache()


@pytest.fixture(scope="module")
def stages(tiny_sft_dir, tmp_path_factory):
  """The session's tiny SFT run and a tiny reward model on it, shared by every test here."""
  rm_dir = str(tmp_path_factory.mktemp("rm"))
  reward.train(tiny.reward_config(init_from=tiny_sft_dir, steps=2), rm_dir)
  return dict(init_from=tiny_sft_dir, reward_from=rm_dir)


def metrics_of(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def restored_state(workdir, config, step=None):
  """The PPO train state of a checkpoint, restored on one device, as numpy."""
  cfg = ppo.ppo_config(config)
  layout = common.Layout(parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                            jax.devices()[:1]), parallel.DEFAULT_RULES)
  model_cfg = common.model_config(config, common.tokenizer_from_config(config))
  with layout.scope():
    models, _, _ = ppo.load_models(config, layout, model_cfg, fresh=False)
    optimizers, _ = ppo.make_optimizers(config, 1)
    abstract, _ = ppo.state_shardings(models, optimizers, layout, cfg, config.seed)
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", save_every=1, keep=10)
  state, extra = ckpt.restore(abstract, step=step)
  ckpt.close()
  return jax.device_get(state), extra


@pytest.fixture(scope="module")
def unbroken(stages, tmp_path_factory):
  """Four iterations in one go (checkpoints at 2 and 4), with an evaluation at step 0."""
  workdir = str(tmp_path_factory.mktemp("ppo_unbroken"))
  config = tiny.ppo_config(iterations=4, eval_at_start=True, **stages)
  final = ppo.train(config, workdir)
  return workdir, config, final


def test_end_to_end_writes_every_metric(unbroken):
  workdir, config, final = unbroken
  records = metrics_of(workdir)
  assert all(r["stage"] == "ppo" for r in records)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  expected = {
      "rm_score", "rm_score_raw", "kl", "beta", "entropy", "policy_clipfrac", "value_clipfrac",
      "approx_kl", "policy_loss", "value_loss", "ptx_loss", "explained_variance",
      "response_length", "eos_fraction", "policy_grad_norm", "value_grad_norm", "rollout_s",
      "score_s", "advantage_s", "update_s", "iteration_s", "rollouts_per_second", "gold_score"}
  for record in train:
    assert expected <= set(record), expected - set(record)
    assert all(np.isfinite(record[k]) for k in expected)
    assert 0.0 <= record["gold_score"] <= 1.0
    assert 0 < record["response_length"] <= config.sampling.max_new_tokens
    assert record["ptx_loss"] > 0  # the pretraining rows reached the update
    assert record["optimizer_steps"] == record["step"] * 2 * 2  # epochs x minibatches
  # The normalised score is the raw one through the reward model's gain and bias.
  gain, bias = workdirs.read_normalisation(config.reward_from)
  np.testing.assert_allclose(train[0]["rm_score"], gain * train[0]["rm_score_raw"] + bias,
                             rtol=1e-4, atol=1e-5)
  # Adaptive KL moves beta every iteration (the tiny config's controller).
  assert len({r["beta"] for r in train}) == 4
  evals = [r for r in records if "eval_ptx_loss" in r]
  assert [r["step"] for r in evals] == [0, 2, 4]
  assert all(0.0 <= r["eval_gold_score"] <= 1.0 for r in evals)
  assert final["eval_ptx_loss"] == evals[-1]["eval_ptx_loss"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_kill_and_resume_equals_an_unbroken_run(unbroken, stages, tmp_path):
  workdir, config, _ = unbroken
  resumed = str(tmp_path / "resumed")
  ppo.train(tiny.ppo_config(iterations=2, **stages), resumed)  # "killed" after iteration 2
  ppo.train(tiny.ppo_config(iterations=4, **stages), resumed)  # the same command resumes
  a, extra_a = restored_state(workdir, config)
  b, extra_b = restored_state(resumed, config)
  assert int(a["step"]) == int(b["step"]) == 4 * 2 * 2
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  jax.tree.map(np.testing.assert_array_equal, a["opt_state"], b["opt_state"])
  assert a["kl_coef"] == b["kl_coef"] != np.float32(config.ppo.kl_coef)
  assert extra_a["data"] == extra_b["data"]
  assert extra_a["data"]["ptx"] is not None
  # Training moved both models away from where they started.
  start, _ = restored_state(workdir, config, step=2)
  assert not np.array_equal(start["params"]["value"]["head_w"], a["params"]["value"]["head_w"])
  assert not np.array_equal(start["params"]["policy"]["backbone"]["embed"],
                            a["params"]["policy"]["backbone"]["embed"])
  # The logged curves of the resumed run continue the unbroken one's exactly.
  last = lambda w: [r for r in metrics_of(w) if r["step"] == 4 and "loss" in r][0]
  assert last(workdir)["rm_score"] == last(resumed)["rm_score"]


def _initial(config):
  """The models the trainer starts from: (state, frozen) on an 8-device (2, 2, 2) mesh."""
  cfg = ppo.ppo_config(config)
  layout = common.Layout(parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                         parallel.DEFAULT_RULES)
  model_cfg = common.model_config(config, common.tokenizer_from_config(config))
  with layout.scope():
    models, frozen, sources = ppo.load_models(config, layout, model_cfg, fresh=True)
    optimizers, _ = ppo.make_optimizers(config, 4)
    _, shardings = ppo.state_shardings(models, optimizers, layout, cfg, config.seed)
    state = ppo._create_state(config, models, sources, optimizers, cfg, shardings)
  assert state["params"]["policy"]["backbone"]["layers"]["wq"].sharding.spec == \
      parallel.PartitionSpec(None, "fsdp", "tensor", None)
  return jax.device_get(state), jax.device_get(frozen)


def test_value_init_reward_copies_the_rm_and_zero_puts_a_zero_head_on_sft(stages):
  from_reward, frozen = _initial(tiny.ppo_config(**stages))
  from_zero, _ = _initial(tiny.ppo_config(**{"ppo.value_init": "zero"}, **stages))
  unnormalised, _ = _initial(tiny.ppo_config(**{"ppo.normalise_reward": False}, **stages))
  jax.tree.map(np.testing.assert_array_equal, unnormalised["params"]["value"], frozen["reward"])
  # With normalised rewards the value head carries the normalisation: value = gain * RM + bias.
  value, reward = from_reward["params"]["value"], frozen["reward"]
  gain, bias = frozen["reward_gain"], frozen["reward_bias"]
  jax.tree.map(np.testing.assert_array_equal, value["backbone"], reward["backbone"])
  np.testing.assert_allclose(value["head_w"], gain * reward["head_w"], rtol=1e-6)
  np.testing.assert_allclose(value["head_b"], gain * reward["head_b"] + bias, rtol=1e-6, atol=1e-6)
  assert gain != 1.0
  value = from_zero["params"]["value"]
  assert not value["head_w"].any() and not value["head_b"].any()
  jax.tree.map(np.testing.assert_array_equal, value["backbone"],
               frozen["reference"]["backbone"])
  # The reward model's backbone was trained away from SFT's, so the two inits really differ.
  assert not np.array_equal(from_reward["params"]["value"]["backbone"]["embed"],
                            value["backbone"]["embed"])
  # The policy starts as the reference, and beta at its configured value.
  jax.tree.map(np.testing.assert_array_equal, from_reward["params"]["policy"],
               frozen["reference"])
  assert from_reward["kl_coef"] == np.float32(tiny.ppo_config().ppo.kl_coef)


def test_a_fresh_start_reads_each_checkpoint_once(stages, monkeypatch):
  """The SFT policy seeds the policy, the reference and (value_init=zero) the value; the reward
  model the frozen reward and the value: one read each, and no buffer shared between the state
  (which the update donates) and the frozen models."""
  reads = []
  original = checkpoint.restore_subtree
  monkeypatch.setattr(checkpoint, "restore_subtree",
                      lambda directory, *a, **k: reads.append(str(directory)) or
                      original(directory, *a, **k))
  for overrides in ({}, {"ppo.value_init": "zero"}):
    reads.clear()
    state, frozen = _initial(tiny.ppo_config(**overrides, **stages))
    assert sorted(reads) == sorted(common.checkpoint_dir(stages[name])
                                   for name in ("init_from", "reward_from")), reads
    jax.tree.map(np.testing.assert_array_equal, state["params"]["policy"], frozen["reference"])


def test_frozen_models_in_bfloat16(stages):
  state, frozen = _initial(tiny.ppo_config(frozen_dtype="bfloat16", **stages))
  dtypes = {x.dtype for x in jax.tree.leaves((frozen["reference"], frozen["reward"]))}
  assert dtypes == {np.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("float32")}
  np.testing.assert_allclose(frozen["reference"]["backbone"]["embed"].astype(np.float32),
                             state["params"]["policy"]["backbone"]["embed"], rtol=1e-2)


def test_plain_ppo_with_bf16_frozen_models_and_zero_value_skips_the_ptx_stream(stages, tmp_path):
  config = tiny.ppo_config(iterations=2, frozen_dtype="bfloat16", save_every=10,
                           **{"ppo.ptx_coef": 0.0, "ppo.value_init": "zero"}, **stages)
  ppo.train(config, str(tmp_path))
  train = [r for r in metrics_of(tmp_path) if "loss" in r]
  assert [r["step"] for r in train] == [1, 2]
  assert all(r["ptx_loss"] == 0.0 for r in train)
  assert all(np.isfinite(r["rm_score"]) and np.isfinite(r["kl"]) for r in train)
  # The held-out pretraining loss is still measured (PPO's alignment tax) ...
  assert any("eval_ptx_loss" in r for r in metrics_of(tmp_path))
  # ... but no training stream was built, and none is checkpointed.
  state, extra = restored_state(tmp_path, config)
  assert extra["data"]["ptx"] is None and extra["data"]["prompts"]


def varied_gold_score(self, prompt, response):
  """A stand-in for the synthetic task's gold scorer, which gives the barely trained tiny policy
  0.0 on every response (a reward that never varies would let any normalisation pass): a fixed
  pseudo-random score in [0, 1) per (prompt, response) text."""
  digest = hashlib.sha256(f"{prompt}\x00{response}".encode()).digest()
  return int.from_bytes(digest[:4], "little") / 2 ** 32


def test_gold_reward_needs_no_reward_model_and_resumes_with_its_normalisation(stages, tmp_path,
                                                                              monkeypatch):
  monkeypatch.setattr(synthetic.SyntheticTask, "score", varied_gold_score)
  gold = dict(init_from=stages["init_from"], reward_source="gold", save_every=1,
              **{"ppo.ptx_coef": 0.0, "ppo.value_init": "zero"})
  unbroken, resumed = str(tmp_path / "unbroken"), str(tmp_path / "resumed")
  ppo.train(tiny.ppo_config(iterations=2, **gold), unbroken)
  train = [r for r in metrics_of(unbroken) if "loss" in r]
  saved = json.load(open(os.path.join(unbroken, ppo.GOLD_NORMALISATION)))
  # The first rollout's scores had a spread, so the normalisation scales as well as centres, and
  # the second rollout scored differently: its normalised score is not 0.
  assert abs(saved["gain"] - 1.0) > 1e-3 and abs(saved["bias"]) > 1e-3, saved
  assert abs(train[1]["gold_score"] - train[0]["gold_score"]) > 1e-3, train
  for r in train:  # The reward is the rollouts' gold score, normalised as saved.
    assert r["rm_score_raw"] == pytest.approx(r["gold_score"], abs=1e-6)
    assert r["rm_score"] == pytest.approx(saved["gain"] * r["gold_score"] + saved["bias"],
                                          abs=1e-5)
  assert train[0]["rm_score"] == pytest.approx(0.0, abs=1e-5)  # fitted on the first rollout
  assert abs(train[1]["rm_score"]) > 1e-3
  # Killed after one iteration and re-run: the normalisation is read back (not fitted again on
  # the resumed run's first rollout, which would centre step 2 on 0), the curve continues.
  ppo.train(tiny.ppo_config(iterations=1, **gold), resumed)
  ppo.train(tiny.ppo_config(iterations=2, **gold), resumed)
  assert json.load(open(os.path.join(resumed, ppo.GOLD_NORMALISATION))) == saved
  last = lambda w: [r for r in metrics_of(w) if r["step"] == 2 and "loss" in r][0]
  assert last(resumed)["gold_score"] == last(unbroken)["gold_score"]
  assert last(resumed)["rm_score"] == last(unbroken)["rm_score"]
  with pytest.raises(InputError, match="value_init"):
    ppo.train(tiny.ppo_config(**dict(gold, **{"ppo.value_init": "reward"})), str(tmp_path / "a"))
  with pytest.raises(InputError, match="reward_source"):
    ppo.train(tiny.ppo_config(**dict(gold, **{"data.source": "files"})), str(tmp_path / "b"))


def test_value_head_fit_before_step_0_keeps_its_promise_and_a_resume_does_not_refit(
    stages, tmp_path, monkeypatch):
  """value_head_fit="first_rollout": the first update's value loss is the fit's residual (one
  epoch of one minibatch, so the logged loss is the one at the fitted head, before any step),
  the fit is kept in value_head_fit.json, and a killed run resumes from its checkpoint (the
  fitted and trained head) without fitting again, ending where an unbroken run ends."""
  fit_cfg = dict(save_every=1, **{"ppo.value_head_fit": "first_rollout", "ppo.ppo_epochs": 1,
                                  "ppo.num_minibatches": 1}, **stages)
  unbroken, resumed = str(tmp_path / "unbroken"), str(tmp_path / "resumed")
  ppo.train(tiny.ppo_config(iterations=2, **fit_cfg), unbroken)
  saved = json.load(open(os.path.join(unbroken, ppo.VALUE_HEAD_FIT)))
  first = [r for r in metrics_of(unbroken) if r["step"] == 1 and "loss" in r][0]
  assert first["value_fit_scale"] == pytest.approx(saved["scale"])
  assert saved["loss"] < saved["loss_before"]
  assert saved["explained_variance_after"] > saved["explained_variance_before"]
  # The rollout was scored again with the fitted head: its value loss is the promised one ...
  assert first["rollout_value_loss"] == pytest.approx(saved["loss"], rel=1e-3)
  # ... and so is the update's, computed at the fitted head (values = old values: no clipping).
  assert first["value_loss"] == pytest.approx(saved["loss"], rel=1e-3)
  assert first["value_clipfrac"] == 0.0
  # Without the fit the same first rollout's value loss is the one the fit started from.
  plain = str(tmp_path / "plain")
  ppo.train(tiny.ppo_config(iterations=1, **dict(fit_cfg, **{"ppo.value_head_fit": "none"})),
            plain)
  assert metrics_of(plain)[0]["value_loss"] == pytest.approx(saved["loss_before"], rel=1e-3)
  assert not os.path.exists(os.path.join(plain, ppo.VALUE_HEAD_FIT))

  ppo.train(tiny.ppo_config(iterations=1, **fit_cfg), resumed)  # "killed" after iteration 1
  assert json.load(open(os.path.join(resumed, ppo.VALUE_HEAD_FIT))) == saved

  def refit(*args, **kwargs):
    raise AssertionError("a resumed run fitted the value head again")
  monkeypatch.setattr(ppo.Iteration, "_fit_value_head", refit)
  ppo.train(tiny.ppo_config(iterations=2, **fit_cfg), resumed)
  a, _ = restored_state(unbroken, tiny.ppo_config(**stages))
  b, _ = restored_state(resumed, tiny.ppo_config(**stages))
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  assert json.load(open(os.path.join(resumed, ppo.VALUE_HEAD_FIT))) == saved
  second = [r for r in metrics_of(resumed) if r["step"] == 2 and "loss" in r][0]
  assert not any(k.startswith("value_fit_") for k in second)
  with pytest.raises(InputError, match="value_head_fit"):
    ppo.train(tiny.ppo_config(**{"ppo.value_head_fit": "always"}, **stages),
              str(tmp_path / "bad"))


def test_ptx_needs_pretraining_text_and_micro_batches_that_fit_the_mesh(stages, tmp_path):
  with pytest.raises(InputError, match="ptx.source"):
    ppo.train(tiny.ppo_config(**{"ptx.source": "none"}, **stages), str(tmp_path / "a"))
  with pytest.raises(InputError, match="rollout_batch_size"):
    ppo.train(tiny.ppo_config(rollout_batch_size=12, **stages), str(tmp_path / "b"))
  with pytest.raises(InputError, match="init_from"):
    ppo.train(tiny.ppo_config(reward_from=stages["reward_from"]), str(tmp_path / "c"))


def test_prompt_files_errors_name_file_and_line(tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_text('{"prompt": "Reverse: abc\\nAnswer:"}\n\n{"text": "no prompt"}\n')
  with pytest.raises(InputError, match=r"prompts.jsonl:3.*prompt"):
    records.read_prompts(path)
  path.write_text('{"prompt": "a"}\n{"prompt": "  "}\n')
  with pytest.raises(InputError, match=r"prompts.jsonl:2.*empty"):
    records.read_prompts(path)
  path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
  assert [r["source"] for r in records.read_prompts(path)] == [f"{path}:1", f"{path}:2"]
  text = tmp_path / "prompts.txt"
  text.write_text("first\\nline\n\nsecond\n")
  assert records.read_prompts(text) == [{"prompt": "first\nline", "source": f"{text}:1"},
                                        {"prompt": "second", "source": f"{text}:3"}]


def test_prompt_dataset_left_pads_cuts_and_resumes():
  tokenizer = make_tokenizer("byte", None)
  prompts = [{"prompt": "x" * n} for n in range(1, 8)]
  stats = pipeline.PipelineStats()
  ds = pipeline.prompt_dataset(prompts, tokenizer, prompt_len=4, batch_size=3, seed=0,
                               stats=stats)
  it = iter(ds)
  seen = [next(it) for _ in range(7)]  # 21 rows: three epochs of 7 prompts
  for batch in seen:
    for tokens, mask, index in zip(batch["tokens"], batch["mask"], batch["index"]):
      n = min(index + 1, 4)
      assert list(mask) == [0] * (4 - n) + [1] * n
      assert list(tokens) == [tokenizer.pad_id] * (4 - n) + [ord("x")] * n
  indices = np.concatenate([b["index"] for b in seen])
  epochs = indices.reshape(3, 7)
  assert all(sorted(e) == list(range(7)) for e in epochs)  # every prompt once per epoch
  assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
  assert stats.truncated == 3 * 3  # "xxxxx", "xxxxxx", "xxxxxxx" in each epoch
  # A fresh iterator set to a saved position continues exactly.
  it = iter(ds)
  next(it)
  state = it.get_state()
  again = iter(ds)
  again.set_state(state)
  np.testing.assert_array_equal(next(it)["index"], next(again)["index"])
  with pytest.raises(InputError, match="record 0"):
    next(iter(pipeline.prompt_dataset([{"prompt": ""}], tokenizer, prompt_len=4, batch_size=1,
                                      seed=0)))


def test_config_holds_every_ppo_field_and_the_sweep_parses(tmp_path):
  import dataclasses
  from instructjax.objectives.ppo import PPOConfig
  for variant in ("tiny", "small"):
    config = ppo_configs.get_config(variant)
    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    assert fields | set(ppo.TRAINER_ONLY_PPO_FIELDS) == set(config.ppo)
    ppo.ppo_config(config)  # builds
  assert ppo_configs.get_config("small").ppo.ptx_coef == 27.8
  runs = sweep_lib.plan(f"{ppo_configs.__file__}:tiny", str(tmp_path),
                        ["--config.init_from=/x", "--config.reward_from=/y"])
  assert {r.name for r in runs} == {"baseline", "no_ptx", "fixed_kl", "no_whitening",
                                    "value_zero", "value_fit", "tf_adam"}
  assert all(r.final_step == ppo_configs.get_config("tiny").iterations for r in runs)
