"""Reward model: the K-way ranking loss, its metrics, ranking batches and SFT initialisation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from instructjax import parallel
from instructjax.data import ranking_batches as rb
from instructjax.data.tokenizers import ByteTokenizer
from instructjax.errors import InputError
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel, ScalarModel, last_token
from instructjax.objectives import reward


def tiny(flavour="gpt2", **kw):
  base = dict(flavour=flavour, vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_len=64)
  if flavour == "llama":
    base["n_kv_heads"] = 2
  base.update(kw)
  return ModelConfig(**base)


def split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_loss(rewards, ranks, valid):
  """The InstructGPT loss written as an explicit double loop over each prompt's pairs."""
  prompt_losses, correct, n_pairs = [], 0.0, 0
  for r, rank, ok in zip(rewards, ranks, valid):
    terms = []
    for i in range(len(r)):
      for j in range(len(r)):
        if ok[i] and ok[j] and rank[i] < rank[j]:
          terms.append(-log_sigmoid(float(r[i]) - float(r[j])))
          correct += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    if terms:
      prompt_losses.append(sum(terms) / len(terms))
    n_pairs += len(terms)
  loss = sum(prompt_losses) / len(prompt_losses) if prompt_losses else 0.0
  return loss, len(prompt_losses), correct, n_pairs


# A batch with ties, K = 2..6, padding responses whose ranks WOULD make pairs if they counted,
# an all-tied prompt and an all-padding element (no pairs: they must not count as prompts).
RANKS = np.array([[0, 1, 2, 3, 4, 5],
                  [2, 0, 2, 1, 0, 0],
                  [1, 0, 9, 0, 0, 0],
                  [3, 3, 3, 0, 0, 0],
                  [0, 0, 0, 0, 0, 0],
                  [4, 1, 1, 0, 7, 0]])
VALID = np.array([[1, 1, 1, 1, 1, 1],
                  [1, 1, 1, 1, 0, 0],
                  [1, 1, 0, 0, 0, 0],
                  [1, 1, 1, 0, 0, 0],
                  [0, 0, 0, 0, 0, 0],
                  [1, 1, 1, 1, 1, 0]], bool)


def test_ranking_loss_equals_double_loop_over_pairs():
  rewards = np.random.default_rng(0).normal(size=RANKS.shape).astype(np.float32) * 3
  rewards[~VALID] = 1e4  # Garbage at padding must not leak into anything.
  loss, aux = jax.jit(reward.ranking_loss)(rewards, RANKS, VALID)
  want_loss, want_prompts, want_correct, want_pairs = reference_loss(rewards, RANKS, VALID)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert aux["prompts"] == want_prompts == 4
  assert aux["pairs"] == want_pairs == 15 + 5 + 1 + 0 + 0 + 9
  assert aux["correct"] == want_correct
  np.testing.assert_allclose(aux["loss_sum"], want_loss * want_prompts, rtol=1e-5)
  np.testing.assert_allclose(aux["reward_sum"], rewards[VALID].sum(), rtol=1e-5)
  assert aux["responses"] == VALID.sum()


def test_ranking_loss_without_pairs_is_zero_and_finite():
  loss, aux = reward.ranking_loss(jnp.ones((2, 3)), jnp.zeros((2, 3), jnp.int32),
                                  jnp.array([[1, 1, 1], [0, 0, 0]], bool))
  grad = jax.grad(lambda r: reward.ranking_loss(r, jnp.zeros((2, 3), jnp.int32),
                                                jnp.ones((2, 3), bool))[0])(jnp.ones((2, 3)))
  assert loss == 0 and aux["prompts"] == 0 and aux["pairs"] == 0
  assert np.all(np.asarray(grad) == 0)


def test_gradient_of_one_pair_is_that_of_minus_log_sigmoid():
  r_w, r_l = 0.3, 1.7
  # Winner at index 1 (rank 0), loser at index 0, a padding response at index 2.
  rewards = jnp.array([[r_l, r_w, 5.0]])
  ranks, valid = jnp.array([[1, 0, 0]]), jnp.array([[True, True, False]])
  grad = jax.grad(lambda r: reward.ranking_loss(r, ranks, valid)[0])(rewards)
  scalar = lambda w, l: -jax.nn.log_sigmoid(w - l)
  g_w, g_l = jax.grad(scalar, argnums=(0, 1))(r_w, r_l)
  np.testing.assert_allclose(grad, [[g_l, g_w, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(reward.ranking_loss(rewards, ranks, valid)[0], scalar(r_w, r_l),
                             rtol=1e-6)


def test_accuracy_with_ties_and_per_k():
  rewards = jnp.array([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  ranks = jnp.array([[0, 1, 2], [0, 1, 0], [0, 1, 2]])
  valid = jnp.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
  _, aux = reward.ranking_loss(rewards, ranks, valid)
  # Prompt 0: 3/3. Prompt 1 (K=2): 0/1. Prompt 2: tie (0,1) is a half, (0,2) and (1,2) right.
  assert aux["correct"] == 5.5 and aux["pairs"] == 7
  np.testing.assert_array_equal(aux["correct_by_k"], [0, 0, 0.0, 5.5])
  np.testing.assert_array_equal(aux["pairs_by_k"], [0, 0, 1, 6])
  metrics = reward.eval_metrics(jax.device_get(aux))
  assert metrics["eval_accuracy"] == pytest.approx(5.5 / 7)
  assert metrics["eval_accuracy_k2"] == 0.0 and metrics["eval_accuracy_k3"] == pytest.approx(5.5 / 6)
  values = np.array([3, 2, 1, 0, 1, 1, 1, 0], np.float64)
  assert metrics["eval_reward_mean"] == pytest.approx(values.mean())
  assert metrics["eval_reward_std"] == pytest.approx(values.std(), rel=1e-5)


def test_eval_sums_over_batches_are_exact():
  rewards = np.random.default_rng(1).normal(size=RANKS.shape).astype(np.float32)
  _, whole = reward.ranking_loss(rewards, RANKS, VALID)
  parts = [reward.ranking_loss(rewards[s], RANKS[s], VALID[s])[1]
           for s in (slice(0, 2), slice(2, 5), slice(5, 6))]
  summed = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs), *parts)
  got, want = reward.eval_metrics(summed), reward.eval_metrics(jax.device_get(whole))
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-5), key
  assert want["eval_loss"] == pytest.approx(reference_loss(rewards, RANKS, VALID)[0], rel=1e-5)


def test_normalisation_gives_mean_zero_std_one():
  rewards = np.random.default_rng(2).normal(3.0, 7.0, size=1000)
  gain, bias = reward.normalisation(rewards)
  normalised = np.asarray(reward.apply_normalisation(jnp.asarray(rewards), gain, bias), np.float64)
  assert abs(normalised.mean()) < 1e-5 and normalised.std() == pytest.approx(1.0, rel=1e-5)
  gain, bias = reward.normalisation(rewards, target_mean=2.0, target_std=0.5)
  shifted = reward.apply_normalisation(rewards, gain, bias)
  assert shifted.mean() == pytest.approx(2.0) and shifted.std() == pytest.approx(0.5)
  for bad in ([], [1.0, 1.0, 1.0], [0.0, np.nan]):
    with pytest.raises(InputError, match="reward normalisation"):
      reward.normalisation(np.array(bad))


# ----------------------------------------------------------------------------- batches

RECORDS = [
    {"prompt": "Tell me a joke.", "responses": ["a", "bb", "ccc", "dddd"], "ranks": [2, 0, 1, 2]},
    {"prompt": "Hi", "responses": ["yo", "hello there"], "ranks": [1, 0]},
    {"prompt": "Sum 2+2", "responses": ["4", "5", "four"], "ranks": [0, 2, 0], "id": 7},
]


def test_tokenize_ranking_layout():
  tok = ByteTokenizer()
  ex = rb.tokenize_ranking(RECORDS[1], tok, seq_len=16, max_prompt_len=8, max_k=3, where="r1")
  assert ex["tokens"].shape == (3, 16) and ex["tokens"].dtype == np.int32
  row0 = list(b"Hiyo") + [tok.eos_id]
  np.testing.assert_array_equal(ex["tokens"][0], row0 + [tok.pad_id] * (16 - len(row0)))
  np.testing.assert_array_equal(ex["mask"][0], [1] * len(row0) + [0] * (16 - len(row0)))
  assert ex["mask"][1].sum() == 2 + 11 + 1 and ex["mask"][2].sum() == 0
  np.testing.assert_array_equal(ex["ranks"], [1, 0, 0])
  np.testing.assert_array_equal(ex["valid"], [True, True, False])
  assert ex["valid"].dtype == bool and ex["ranks"].dtype == np.int32


def test_tokenize_ranking_truncation_and_errors():
  tok = ByteTokenizer()
  record = {"prompt": "abcdefgh", "responses": ["xyz", "0123456789"], "ranks": [0, 1]}
  ex = rb.tokenize_ranking(record, tok, seq_len=8, max_prompt_len=3, max_k=2, where="f:3")
  # The prompt keeps its last 3 tokens; responses fill the remaining 5 (EOS lost when cut).
  np.testing.assert_array_equal(ex["tokens"][0, :7], list(b"fghxyz") + [tok.eos_id])
  np.testing.assert_array_equal(ex["tokens"][1], list(b"fgh01234"))
  with pytest.raises(InputError, match="f:3.*no room"):
    rb.tokenize_ranking(record, tok, seq_len=8, max_prompt_len=8, max_k=2, where="f:3")
  with pytest.raises(InputError, match="f:4.*max_k"):
    rb.tokenize_ranking(RECORDS[0], tok, seq_len=32, max_prompt_len=8, max_k=3, where="f:4")
  with pytest.raises(InputError, match="f:5.*ranks"):
    rb.tokenize_ranking({**record, "ranks": [0]}, tok, seq_len=8, max_prompt_len=3, max_k=2,
                        where="f:5")
  with pytest.raises(InputError, match="example 1"):
    rb.collate([ex, rb.empty_ranking(seq_len=9, max_k=2, pad_id=tok.pad_id)])


def test_kway_and_pairwise_see_the_same_pairs():
  pairwise = rb.pairwise_records(RECORDS, seed=0)
  assert len(pairwise) == 5 + 1 + 2
  assert all(r["ranks"] == [0, 1] and len(r["responses"]) == 2 for r in pairwise)
  assert rb.pair_multiset(pairwise) == rb.pair_multiset(RECORDS)
  assert rb.pairwise_records(RECORDS, seed=0) == pairwise
  orders = {tuple(map(str, rb.pairwise_records(RECORDS, seed=s))) for s in range(5)}
  assert len(orders) > 1  # Shuffled, and by the seed.
  # What the model compares, token for token, is the same in both modes.
  tok = ByteTokenizer()
  kw = dict(seq_len=24, max_prompt_len=10, max_k=4)
  kway_batch = rb.collate([rb.tokenize_ranking(r, tok, **kw) for r in RECORDS])
  pair_batch = rb.collate([rb.tokenize_ranking(r, tok, **kw) for r in pairwise])
  assert kway_batch["tokens"].shape == (3, 4, 24) and pair_batch["valid"].sum() == 16
  assert rb.tokenized_pair_multiset(kway_batch) == rb.tokenized_pair_multiset(pair_batch)
  assert sum(rb.tokenized_pair_multiset(kway_batch).values()) == 8
  with pytest.raises(InputError, match="1 comparisons missing"):
    rb.check_same_pairs(RECORDS, pairwise[1:])


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_init_from_sft_keeps_backbone_and_reads_last_token(flavour):
  cfg = tiny(flavour)
  lm_graphdef, sft = split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  graphdef, fresh = split(ScalarModel(cfg, rngs=nnx.Rngs(1)))
  params = reward.init_from_sft(sft, fresh)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sft["backbone"])[0],
                          jax.tree.leaves(params["backbone"])):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path
  np.testing.assert_array_equal(params["head_w"], fresh["head_w"])
  assert params["head_b"] == 0 and "lm_head" not in params
  assert not np.array_equal(fresh["backbone"]["embed"], sft["backbone"]["embed"])

  # Right-padded rows (the batch layout) and left-padded rows give the same rewards, and
  # they are the head applied to the SFT backbone's hidden state at the last real token.
  ids = [[5, 6, 7, 8, 9], [10, 11, 12]]
  right = np.zeros((2, 1, 8), np.int32)
  right_mask = np.zeros_like(right)
  left, left_mask = np.zeros((2, 8), np.int32), np.zeros((2, 8), np.int32)
  for b, row in enumerate(ids):
    right[b, 0, :len(row)], right_mask[b, 0, :len(row)] = row, 1
    left[b, 8 - len(row):], left_mask[b, 8 - len(row):] = row, 1

  @jax.jit
  def rewards_three_ways(params, sft):
    right_rewards = reward.reward_forward(params, graphdef, right, right_mask)[:, 0]
    left_rewards = last_token(nnx.merge(graphdef, params)(left, left_mask), left_mask)
    hidden, _ = nnx.merge(lm_graphdef, sft).backbone(left, left_mask)
    sft_rewards = hidden[:, -1] @ params["head_w"] + params["head_b"]
    return right_rewards, left_rewards, sft_rewards

  right_rewards, left_rewards, sft_rewards = rewards_three_ways(params, sft)
  np.testing.assert_allclose(right_rewards, left_rewards, atol=1e-5)
  np.testing.assert_allclose(right_rewards, sft_rewards, atol=1e-5)
  assert abs(right_rewards[0] - right_rewards[1]) > 1e-4  # Different texts, different rewards.


def test_init_from_sft_refuses_a_different_backbone():
  abstract = lambda cls, cfg: nnx.to_pure_dict(
      nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))))
  fresh = abstract(ScalarModel, tiny())
  with pytest.raises(InputError, match="build both from the same model config"):
    reward.init_from_sft(abstract(LanguageModel, tiny(n_layers=3)), fresh)
  with pytest.raises(InputError, match="backbones differ"):
    reward.init_from_sft(abstract(LanguageModel, tiny("llama")), fresh)
  with pytest.raises(InputError, match="no 'backbone'"):
    reward.init_from_sft({"embed": 0}, fresh)


def test_train_steps_lower_the_loss_and_shard_over_a_mesh():
  tok = ByteTokenizer()
  batch = rb.collate([rb.tokenize_ranking(r, tok, seq_len=24, max_prompt_len=10, max_k=4)
                      for r in RECORDS]
                     + [rb.empty_ranking(seq_len=24, max_k=4, pad_id=tok.pad_id)])
  graphdef, state = nnx.split(ScalarModel(tiny(d_model=16, n_layers=1, n_heads=2),
                                          rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  schedule = reward.learning_rate_schedule(1e-2, 0, 100, decay="constant")
  optimizer = reward.make_optimizer(schedule, weight_decay=0.0)
  init = jax.jit(lambda p: reward.init_state(p, optimizer, seed=0))
  step = jax.jit(lambda s, b: reward.train_step(s, b, graphdef=graphdef, optimizer=optimizer,
                                                schedule=schedule))
  evaluate = jax.jit(lambda p, b: reward.eval_step(p, b, graphdef=graphdef))

  train_state = init(params)
  before = reward.eval_metrics(jax.device_get(evaluate(params, batch)))
  losses = []
  for i in range(4):
    train_state, metrics = step(train_state, batch)
    losses.append(float(metrics["loss"]))
    if i == 0:
      first_params, first_metrics = jax.device_get((train_state["params"], metrics))
  after = reward.eval_metrics(jax.device_get(evaluate(train_state["params"], batch)))
  assert set(metrics) >= {"loss", "accuracy", "grad_norm", "learning_rate", "reward_mean",
                          "reward_std"}
  assert metrics["pairs"] == 8 and metrics["prompts"] == 3
  assert losses[0] == pytest.approx(before["eval_loss"], rel=1e-4)
  assert after["eval_loss"] < 0.5 * before["eval_loss"]
  assert after["eval_accuracy"] == 1.0 and int(train_state["bad_steps"]) == 0

  # The same first step with parameters and the batch sharded over (data, fsdp, tensor).
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  specs = parallel.param_specs(state, parallel.DEFAULT_RULES, mesh)
  with jax.set_mesh(mesh), parallel.axis_rules(parallel.DEFAULT_RULES):
    sharded_state = init(jax.device_put(params, parallel.named(mesh, specs)))
    sharded_state, sharded_metrics = step(sharded_state, parallel.global_batch(batch, mesh))
  wq = sharded_state["params"]["backbone"]["layers"]["wq"]
  assert wq.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, specs["backbone"]["layers"]["wq"]), wq.ndim)
  for key in ("loss", "accuracy", "grad_norm", "reward_mean", "reward_std"):
    np.testing.assert_allclose(sharded_metrics[key], first_metrics[key], rtol=1e-4, err_msg=key)
  # The loss only sees reward differences and attention is invariant to a shift of every key,
  # so head_b, final_norm_bias and bk have a zero gradient: Adam's first step turns its
  # rounding noise into updates of either sign. Every other parameter must agree.
  shift_invariant = ("head_b", "final_norm_bias", "bk")

  def same_update(path, sharded, single):
    if jax.tree_util.keystr(path).split("'")[-2] not in shift_invariant:
      np.testing.assert_allclose(sharded, single, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  jax.tree.map_with_path(same_update, jax.device_get(sharded_state["params"]), first_params)
