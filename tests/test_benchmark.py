"""The benchmark: every subcommand runs at a toy shape, and its analytic FLOPs match a count of
the matmuls jax actually traces."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import benchmark
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import KVCache, LanguageModel, ScalarModel
from instructjax.objectives import sft

TOY = ["--layers", "1", "--d_model", "32", "--heads", "2", "--vocab", "64", "--seq", "16",
       "--batch", "4", "--runs", "1"]


def traced_matmul_flops(fn, *args) -> int:
  """2 * M * N * K of every dot_general in fn's jaxpr, loop bodies counted once per iteration:
  an independent count of what the analytic formula claims."""

  def count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        continue
      repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            total += repeats * count(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            total += repeats * count(sub)
    return total

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


CONFIGS = [
    dict(flavour="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=32),
    dict(flavour="llama", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
         d_ff=48, max_len=32),
]


@pytest.mark.parametrize("fields", CONFIGS, ids=["gpt2", "llama_gqa"])
def test_forward_and_training_flops_match_the_traced_matmuls(fields):
  cfg = ModelConfig(**fields)
  B, T = 3, 10
  tokens = jnp.ones((B, T), jnp.int32)
  graphdef, params = split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  forward = lambda p: nnx.merge(graphdef, p)(tokens, tokens)[0]
  want = benchmark.forward_flops(cfg, B * T, T, unembedded=B * T)
  assert traced_matmul_flops(forward, params) == want
  batch = dict(tokens=tokens, mask=tokens, loss_mask=tokens)
  grad = jax.grad(lambda p: sft.lm_loss(p, graphdef, batch)[0])
  assert traced_matmul_flops(grad, params) == 3 * want
  # The closed form of the docstring (6 P_matmul + 12 L d S per token) when N * h = d, no GQA.
  if cfg.n_kv_heads == cfg.n_heads:
    assert 3 * want == B * T * (6 * benchmark.matmul_params(cfg)
                                + 12 * cfg.n_layers * cfg.d_model * T)


def test_scalar_model_flops_count_the_head_at_every_position():
  cfg = ModelConfig(**CONFIGS[0])
  graphdef, params = split(ScalarModel(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.ones((2, 7), jnp.int32)
  forward = lambda p: nnx.merge(graphdef, p)(tokens, tokens)
  assert traced_matmul_flops(forward, params) == benchmark.forward_flops(
      cfg, 14, 7, scalar_positions=14)


def test_the_reference_shape_flops_are_the_documented_numbers():
  cfg = ModelConfig(flavour="gpt2", vocab_size=512, d_model=256, n_layers=4, n_heads=4,
                    d_ff=1024, max_len=128)
  assert benchmark.matmul_params(cfg) == 3_276_800
  per_token = 3 * benchmark.forward_flops(cfg, 1, 128, unembedded=1)
  assert per_token == 21_233_664
  assert round(2048 * per_token / 1e9, 1) == 43.5


@pytest.mark.parametrize("fields", CONFIGS, ids=["gpt2", "llama_gqa"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_step_bytes_are_the_weights_and_the_whole_cache(fields, dtype):
  """Every weight matrix the step multiplies by (w*, the untied LM head or the tied embedding;
  not biases, norms, the position table or a token embedding that is only gathered) and the
  cache the model builds, in the compute dtype."""
  cfg = ModelConfig(**fields, dtype=dtype)
  _, params = split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  multiplied = {"lm_head"} | ({"embed"} if cfg.tie_embeddings else set())
  weights = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                if path[-1].key.startswith("w") or path[-1].key in multiplied)
  cache = sum(x.size for x in KVCache.zeros(cfg, 3, 20))
  itemsize = 4 if dtype == "float32" else 2
  assert benchmark.decode_step_bytes(cfg, 3, 20) == (weights + cache) * itemsize


def test_read_probe_measures_a_rate():
  probe = benchmark.ReadProbe(nbytes=1 << 20)
  probe.sample()
  probe.sample()
  result = probe.result()
  assert result["bytes"] == 1 << 20 and 0 < result["gb_per_s_spread"][0] <= result["gb_per_s"]


def run(tmp_path, stage, *extra):
  path = tmp_path / f"{stage}.json"
  result = benchmark.main([stage, *TOY, *extra, "--json", str(path)])
  assert json.loads(path.read_text())["stage"] == stage
  return result


def check_rows(result, names):
  assert [row["stage"].strip() for row in result["rows"]] == names
  for row in result["rows"]:
    assert row["median_s"] > 0 and row["throughput"] > 0 and np.isfinite(row["model_gflop"])
  assert result["peak_memory"]["bytes"] > 0


def test_sft_stage_reports_mfu_and_compile_scaling(tmp_path, capsys):
  result = run(tmp_path, "sft", "--compile_depths", "1,2")
  check_rows(result, ["sft"])
  row = result["rows"][0]
  assert row["unit"] == "tokens/s" and row["compile_s"] > 0
  assert 0 < row["mfu"] and 0 < row["mfu_cpu"]
  fastest_probe = result["matmul"]["large"]["gflops_per_s_spread"][1]
  assert row["mfu_best"] == pytest.approx(row["model_gflop"] / row["min_s"] / fastest_probe)
  assert set(result["compile_s_by_layers"]) == {"1", "2"}
  assert result["matmul"]["large"]["gflops_per_s"] > 0
  out = capsys.readouterr().out
  assert "tokens/s" in out and "compile time" in out


def test_reward_stage_counts_pairs_of_k_way_batches(tmp_path):
  result = run(tmp_path, "reward", "--k", "4", "--no_probe")
  check_rows(result, ["reward"])
  assert result["pairs_per_step"] == 1 * math.comb(4, 2)  # batch 4 = 1 prompt x K=4
  assert "mfu" not in result["rows"][0]


def test_reward_stage_rejects_a_batch_that_is_not_whole_prompts(tmp_path):
  with pytest.raises(SystemExit):
    run(tmp_path, "reward", "--k", "3", "--no_probe")


def test_sampling_stage_keeps_its_report(tmp_path):
  result = run(tmp_path, "sampling", "--prompt_len", "4", "--new_tokens", "4", "--no_probe")
  check_rows(result, ["sampling", "prefill", "uncached"])
  assert result["cached"]["tokens_per_s"] > 0 and result["uncached"]["tokens_per_s"] > 0
  assert result["decode_step_mflops"] > 0
  assert result["decode_step_mbytes"] > 0 and "read" not in result  # no probe, no roofline


def test_sampling_stage_reports_the_decode_bandwidth_against_a_measured_read_rate(tmp_path):
  result = run(tmp_path, "sampling", "--prompt_len", "4", "--new_tokens", "4", "--skip_uncached")
  cfg = ModelConfig(flavour="gpt2", vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                    d_ff=128, max_len=8)
  assert result["decode_step_mbytes"] == pytest.approx(
      benchmark.decode_step_bytes(cfg, 4, 8) / 1e6)
  assert result["decode_gb_per_s"] == pytest.approx(
      result["decode_step_mbytes"] / result["decode_step_ms"])
  assert result["read"]["gb_per_s"] > 0
  assert result["decode_bandwidth_utilisation"] == pytest.approx(
      result["decode_gb_per_s"] / result["read"]["gb_per_s"])


def test_ppo_stage_splits_the_iteration(tmp_path):
  result = run(tmp_path, "ppo", "--ppo_rollouts", "4", "--ppo_prompt_len", "4",
               "--ppo_new_tokens", "4", "--ppo_epochs", "1", "--no_probe")
  check_rows(result, ["ppo", "rollout", "score", "update"])
  total, *phases = result["rows"]
  assert total["model_gflop"] == pytest.approx(sum(p["model_gflop"] for p in phases))
  assert result["ppo"]["ptx_rows_per_step"] == 4 and result["ppo"]["ptx_seq"] == 8


@pytest.mark.parametrize("stage,extra", [
    ("sft", ["--compile_depths", ""]),
    ("sampling", ["--prompt_len", "4", "--new_tokens", "4", "--skip_uncached"]),
    ("ppo", ["--ppo_rollouts", "4", "--ppo_prompt_len", "4", "--ppo_new_tokens", "4",
             "--ppo_epochs", "1"]),
])
def test_stages_run_data_parallel_over_devices(tmp_path, stage, extra):
  result = run(tmp_path, stage, "--devices", "2", "--no_probe", *extra)
  assert result["devices"] == 2
  assert result["rows"][0]["median_s"] > 0


def test_the_probe_runs_on_one_device_inside_a_multi_device_scope():
  args = benchmark.parse(["sft", "--devices", "4"])
  with benchmark.mesh_scope(args):
    probe = benchmark.MatmulProbe((8, 8, 8))
    probe.sample()
  assert probe.result()["large"]["gflops_per_s"] > 0


def test_too_many_devices_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="--devices 64"):
    run(tmp_path, "sft", "--devices", "64", "--no_probe", "--compile_depths", "")


def test_pytorch_peers_run_at_a_toy_shape(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from experiments import peers
  path = tmp_path / "peers.json"
  rows = peers.main(["all", "--layers", "1", "--d_model", "32", "--heads", "2", "--vocab", "64",
                     "--seq", "16", "--batch", "4", "--prompt_len", "4", "--new_tokens", "4",
                     "--runs", "1", "--json", str(path)])
  with_trl = ["ppo"] if peers._has_trl() else []  # `all` runs TRL's PPO only where trl is
  assert [r["stage"] for r in rows] == ["sft", "reward", "generate", *with_trl]
  assert all(r["throughput"] > 0 for r in rows)
  assert json.loads(path.read_text())["rows"][2]["unit"] == "new tokens/s"


def test_trl_ppo_peer_runs_at_a_toy_shape():
  pytest.importorskip("trl")
  from experiments import peers
  [row] = peers.main(["ppo", "--layers", "1", "--d_model", "32", "--heads", "2", "--vocab", "64",
                      "--ppo_rollouts", "4", "--ppo_prompt_len", "4", "--ppo_new_tokens", "4",
                      "--ppo_epochs", "1", "--runs", "1"])
  assert row["stage"] == "ppo" and row["unit"] == "rollouts/s" and row["throughput"] > 0


def test_peers_refuse_zero_runs(capsys):
  from experiments import peers
  with pytest.raises(SystemExit) as exit_info:
    peers.parse(["sft", "--runs", "0"])
  assert exit_info.value.code == 2 and "--runs 0" in capsys.readouterr().err


def test_trl_ppo_peer_without_trl_says_so(monkeypatch, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from experiments import peers
  monkeypatch.setattr(peers, "_has_trl", lambda: False)
  with pytest.raises(SystemExit) as exit_info:
    peers.main(["ppo"])
  assert exit_info.value.code == 1
  assert "trl==1.12.0" in capsys.readouterr().err
