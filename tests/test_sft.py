"""SFT/pretraining: the masked loss against a loop reference, sharded == single-device, and the
trainer's resume, reshard, init_from and NaN behaviour."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny
from instructjax import checkpoint, parallel
from instructjax.metrics import NonFiniteLossError
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel
from instructjax.objectives import sft
from instructjax.trainers import lm, loop


def reference_cross_entropy(logits, tokens, loss_mask):
  total, count = 0.0, 0.0
  for b in range(tokens.shape[0]):
    for t in range(1, tokens.shape[1]):
      if loss_mask[b, t]:
        row = logits[b, t - 1].astype(np.float64)
        log_z = np.log(np.exp(row - row.max()).sum()) + row.max()
        total -= row[tokens[b, t]] - log_z
        count += 1
  return total, count


def test_cross_entropy_matches_a_python_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, size=(3, 7))
  loss_mask = (rng.random((3, 7)) < 0.6).astype(np.float32)
  total, count = sft.token_cross_entropy(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask))
  ref_total, ref_count = reference_cross_entropy(logits, tokens, loss_mask)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  assert count == ref_count


def tiny_model():
  cfg = ModelConfig(flavour="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=32)
  graphdef, state = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  return graphdef, nnx.to_pure_dict(state)


def sft_batch():
  # Two right-padded rows: prompt (loss 0) + completion (loss 1) + padding (mask 0).
  tokens = np.array([[5, 6, 7, 8, 9, 1, 0, 0], [10, 11, 12, 13, 14, 15, 16, 1]], np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8], np.int32)
  loss_mask = np.array([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], np.float32)
  return dict(tokens=tokens, mask=mask, loss_mask=loss_mask)


def test_loss_ignores_prompt_targets_and_padding():
  graphdef, params = tiny_model()
  batch = sft_batch()
  base, _ = sft.lm_loss(params, graphdef, batch)
  changed = dict(batch, tokens=batch["tokens"].copy())
  changed["tokens"][0, 6:] = 33  # different padding tokens
  again, _ = sft.lm_loss(params, graphdef, changed)
  np.testing.assert_allclose(base, again, rtol=1e-6)
  # Only completion targets count: the loss equals the reference restricted to loss_mask.
  logits, _ = nnx.merge(graphdef, params)(batch["tokens"], batch["mask"])
  total, count = reference_cross_entropy(np.asarray(logits), batch["tokens"], batch["loss_mask"])
  np.testing.assert_allclose(base, total / count, rtol=1e-5)


def test_sharded_step_matches_single_device():
  graphdef, params = tiny_model()
  schedule = sft.learning_rate_schedule(1e-2, 1, 10)
  optimizer = sft.make_optimizer(schedule, weight_decay=0.1)
  step = functools.partial(sft.train_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule)
  batch = {k: np.concatenate([v] * 4) for k, v in sft_batch().items()}  # global batch 8

  state = sft.init_state(params, optimizer, seed=0)
  single_state, single_metrics = jax.jit(step)(state, batch)
  single_state, _ = jax.jit(step)(single_state, batch)

  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(
      ModelConfig(flavour="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=32),
      rngs=nnx.Rngs(0))))
  p_specs = parallel.param_specs(abstract, parallel.DEFAULT_RULES, mesh)
  from instructjax.trainers.common import opt_state_specs
  P = jax.sharding.PartitionSpec
  specs = dict(params=p_specs, opt_state=opt_state_specs(optimizer, params, p_specs), step=P(),
               rng=P(), bad_steps=P())
  shardings = parallel.named(mesh, specs)
  with jax.set_mesh(mesh), parallel.axis_rules(parallel.DEFAULT_RULES):
    sharded_step = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                           out_shardings=(shardings, parallel.replicated(mesh)))
    sharded_state = jax.device_put(sft.init_state(params, optimizer, seed=0), shardings)
    sharded_state, sharded_metrics = sharded_step(sharded_state, parallel.global_batch(batch, mesh))
    sharded_state, _ = sharded_step(sharded_state, parallel.global_batch(batch, mesh))
  assert sharded_state["params"]["backbone"]["layers"]["wq"].sharding.spec == P(None, "fsdp", "tensor", None)
  np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-6)
  # Adam divides by sqrt(v): float-rounding differences of near-zero gradients are amplified up
  # to ~lr * 1e-3, far below what a wrong sharding would give (updates of size ~lr = 1e-2).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
               jax.device_get(sharded_state["params"]), jax.device_get(single_state["params"]))


def final_params(workdir, config):
  """The params of the latest checkpoint in `workdir`, as numpy."""
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", save_every=1, keep=10)
  step = ckpt.latest_step()
  restored = checkpoint.restore_subtree(f"{workdir}/checkpoints", _abstract_params(config), step=step)
  ckpt.close()
  return step, jax.device_get(restored)


def _abstract_params(config):
  from instructjax.trainers import common
  tok = common.tokenizer_from_config(config)
  cfg = common.model_config(config, tok)
  _, abstract = common.split_model(lambda rngs: LanguageModel(cfg, rngs=rngs))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      nnx.to_pure_dict(abstract))


def test_sft_learns_and_writes_metrics_events_and_checkpoints(tmp_path):
  config = tiny.lm_config("sft", steps=12, log_every=4, eval_every=6, save_every=6)
  final = lm.train(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_losses = [l["loss"] for l in lines if "loss" in l]
  eval_losses = [l["eval_loss"] for l in lines if "eval_loss" in l]
  assert train_losses[-1] < train_losses[0] and eval_losses[-1] < eval_losses[0]
  assert all(l["stage"] == "sft" and "step" in l for l in lines)
  assert {"learning_rate", "grad_norm", "tokens_per_second"} <= set(lines[0])
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "6"]
  assert final["eval_perplexity"] > 1


class Killed(Exception):
  """Stands in for the process dying."""


def test_kill_and_resume_equals_an_unbroken_run(tmp_path, monkeypatch):
  """The same command, killed after its step-3 checkpoint and run again, ends exactly where an
  unbroken run does. Warmup is 1 of 6 steps, so the learning rate differs at every step after it
  and the resumed steps must continue the schedule; nothing about the two runs is arranged to
  agree except that they run the same command."""
  config = tiny.lm_config("sft", steps=6, save_every=3, **{"optimizer.warmup_steps": 1})
  lm.train(config, str(tmp_path / "unbroken"))

  real_batch_steps = loop.batch_steps

  def dies_after_step_3(step_fn, data_iter, layout):
    step_fn = real_batch_steps(step_fn, data_iter, layout)

    def step(state, step):
      if step > 3:
        raise Killed(f"killed before step {step}")
      return step_fn(state, step)
    return step

  with monkeypatch.context() as patch:
    patch.setattr(loop, "batch_steps", dies_after_step_3)
    with pytest.raises(Killed):
      lm.train(config, str(tmp_path / "resumed"))
  # The kill left the step-3 checkpoint (a regular save, not a run's final one) and no later one.
  assert final_params(tmp_path / "resumed", config)[0] == 3
  lm.train(config, str(tmp_path / "resumed"))  # the same command again resumes at step 3
  step_a, a = final_params(tmp_path / "unbroken", config)
  step_b, b = final_params(tmp_path / "resumed", config)
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The resumed steps logged the unbroken run's losses and learning rates, and those rates moved.
  logged = lambda run: {r["step"]: r for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))
                        if "loss" in r}
  unbroken, resumed = logged("unbroken"), logged("resumed")
  for step in (4, 6):
    assert resumed[step]["loss"] == unbroken[step]["loss"]
    assert resumed[step]["learning_rate"] == unbroken[step]["learning_rate"]
  rates = [unbroken[step]["learning_rate"] for step in (2, 4, 6)]
  assert len(set(rates)) == 3, rates


def test_resume_onto_another_mesh(tmp_path):
  config = tiny.lm_config("pretrain", steps=6, save_every=3)
  lm.train(config, str(tmp_path / "unbroken"))
  lm.train(tiny.lm_config("pretrain", steps=3, save_every=3), str(tmp_path / "resumed"))
  resharded = tiny.lm_config("pretrain", steps=6, save_every=3,
                             **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  lm.train(resharded, str(tmp_path / "resumed"))
  _, a = final_params(tmp_path / "unbroken", config)
  _, b = final_params(tmp_path / "resumed", config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), a, b)


def test_sft_initialises_from_a_pretrain_checkpoint(tmp_path):
  lm.train(tiny.lm_config("pretrain", steps=3), str(tmp_path / "pretrain"))
  _, pretrained = final_params(tmp_path / "pretrain", tiny.lm_config("pretrain"))
  config = tiny.lm_config("sft", steps=1, init_from=str(tmp_path / "pretrain"),
                          **{"optimizer.lr": 0.0})
  lm.train(config, str(tmp_path / "sft"))
  _, tuned = final_params(tmp_path / "sft", config)
  jax.tree.map(np.testing.assert_array_equal, pretrained, tuned)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny.lm_config("pretrain", steps=8, save_every=1, log_every=1,
                          **{"optimizer.lr": 1e30, "optimizer.warmup_steps": 1,
                             "optimizer.clip_norm": 0.0})
  with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
    lm.train(config, str(tmp_path))
  step, params = final_params(tmp_path, config)
  assert step < 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_cadence_fields_are_refused_by_name_and_eval_every_zero_means_the_last_step_only():
  from ml_collections import config_dict
  from instructjax.errors import InputError
  from instructjax.trainers import loop
  good = dict(log_every=1, save_every=5, eval_every=0)
  loop.check_cadence(config_dict.ConfigDict(good))
  for name, bad in (("log_every", 0), ("save_every", -1), ("eval_every", -1), ("eval_every", 2.5)):
    with pytest.raises(InputError, match=f"config.{name}"):
      loop.check_cadence(config_dict.ConfigDict(dict(good, **{name: bad})))
  never = config_dict.ConfigDict(dict(good))
  assert not any(loop.is_eval_step(never, step) for step in range(1, 50))
  assert [s for s in range(1, 10) if loop.is_eval_step(config_dict.ConfigDict(
      dict(good, eval_every=4)), s)] == [4, 8]
