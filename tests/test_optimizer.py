"""The optimizer against hand-written NumPy loops: both Adam styles (optax's PyTorch-style AdamW and
TF1's AdamOptimizer, which lm-human-preferences used), the weight-decay mask on the real models'
parameters, every learning-rate schedule at known steps, global-norm clipping, and the config
field that picks the style for every stage."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import base
from instructjax.errors import InputError
from instructjax.models.config import ModelConfig
from instructjax.models.decoder import LanguageModel, ScalarModel
from instructjax.objectives import sft
from instructjax.trainers import common

STYLES = ("torch", "tf")


# ------------------------------------------------------------------------------- the references


def small_tree():
  """Leaves named like the model's: two decayed (a projection and the embedding), a norm scale and
  a bias that are not."""
  rng = np.random.default_rng(0)
  return {"embed": rng.normal(size=(5, 3)).astype(np.float32),
          "layers": {"wq": rng.normal(size=(3, 2, 2)).astype(np.float32),
                     "attn_norm_scale": (1 + 0.1 * rng.normal(size=3)).astype(np.float32),
                     "bq": (0.1 * rng.normal(size=(2, 2))).astype(np.float32)}}


# Written out by hand, not taken from sft.DECAYED.
SMALL_TREE_DECAYED = {"embed", "layers/wq"}


def flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(str(k.key) for k in path): np.asarray(leaf, np.float64)
          for path, leaf in jax.tree.leaves_with_path(tree)}


def gradients(norms, *, tiny=False, seed=1):
  """One gradient pytree per entry of `norms`, each with exactly that global norm. With `tiny`,
  leaves differ in magnitude by 1e-2 (the norm scale's and bias's are 100x smaller), so that some
  sqrt(v) are near eps."""
  rng = np.random.default_rng(seed)
  out = []
  for norm in norms:
    g = jax.tree.map(lambda p: rng.normal(size=p.shape), small_tree())
    if tiny:
      g["layers"]["attn_norm_scale"] *= 1e-2
      g["layers"]["bq"] *= 1e-2
    total = math.sqrt(sum(float((x ** 2).sum()) for x in jax.tree.leaves(g)))
    out.append(jax.tree.map(lambda x: (x * norm / total).astype(np.float32), g))
  return out


def numpy_adam(params, grads, *, style, lr, b1, b2, eps, weight_decay=0.0, decayed=(), clip=None):
  """Adam in float64, one parameter at a time, as the two frameworks document it. `lr(t)` is the
  rate of the update that follows t earlier updates. Returns the parameters after each update."""
  p = flat(params)
  m = {k: np.zeros_like(x) for k, x in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  history = []
  for t, grad in enumerate(grads, start=1):
    g = flat(grad)
    if clip:
      norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
      if norm > clip:
        g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      if style == "torch":  # torch.optim.AdamW: eps added to the bias-corrected sqrt(v)
        m_hat = m[k] / (1 - b1 ** t)
        v_hat = v[k] / (1 - b2 ** t)
        step = m_hat / (np.sqrt(v_hat) + eps)
      else:  # tf.train.AdamOptimizer: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t), eps on sqrt(v)
        step = math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m[k] / (np.sqrt(v[k]) + eps)
      if k in decayed:  # decoupled decay, scaled by the learning rate (AdamW)
        step = step + weight_decay * p[k]
      p[k] = p[k] - lr(t - 1) * step
    history.append(dict(p))
  return history


def run(optimizer, params, grads):
  """The parameters after each update of `optimizer`, flattened like numpy_adam's."""
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  history = []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    history.append(flat(params))
  return history


def assert_same_trajectory(got, want, start, rtol=1e-4):
  """Compares the displacement from the start, leaf by leaf: float32 parameters of size ~1 against
  a float64 loop, so the absolute tolerance is a few float32 roundings of the parameter."""
  p0 = flat(start)
  for t, (g, w) in enumerate(zip(got, want, strict=True)):
    for k in w:
      np.testing.assert_allclose(g[k] - p0[k], w[k] - p0[k], rtol=rtol, atol=1e-6,
                                 err_msg=f"update {t + 1}, leaf {k}")


def varying_lr(count):  # a different rate at every update, so an off-by-one count shows
  return 0.1 * (1.0 + 0.5 * count)


def numpy_varying_lr(t):
  return 0.1 * (1.0 + 0.5 * t)


# ------------------------------------------------------------------------------------- Adam styles


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_adam_matches_the_numpy_loop_of_its_style(style, eps):
  """Five updates of gradients whose leaves span two orders of magnitude, so eps matters."""
  params = small_tree()
  grads = gradients([3e-3, 1e-3, 5e-3, 2e-4, 1e-3], tiny=True)
  optimizer = sft.make_optimizer(varying_lr, b1=0.9, b2=0.999, eps=eps, clip_norm=None,
                                 adam_style=style)
  want = numpy_adam(params, grads, style=style, lr=numpy_varying_lr, b1=0.9, b2=0.999, eps=eps)
  assert_same_trajectory(run(optimizer, params, grads), want, params)
  other = numpy_adam(params, grads, style=({"torch", "tf"} - {style}).pop(),
                     lr=numpy_varying_lr, b1=0.9, b2=0.999, eps=eps)
  with pytest.raises(AssertionError):  # the reference tells the styles apart on these gradients
    assert_same_trajectory(run(optimizer, params, grads), other, params)


def test_the_styles_differ_where_v_is_small_and_agree_where_it_is_large():
  """First update, b2 = 0.999, eps = 1e-5, lr = 1 on one parameter: TF's effective eps is
  eps / sqrt(1 - b2) = 3.2e-4, so a gradient of 1e-4 moves it ~0.24 instead of ~0.91."""
  def first_step(style, g):
    opt = sft.make_optimizer(optax.constant_schedule(1.0), b1=0.9, b2=0.999, eps=1e-5,
                             clip_norm=None, adam_style=style)
    params = {"wq": jnp.zeros(())}
    updates, _ = opt.update({"wq": jnp.asarray(g, jnp.float32)}, opt.init(params), params)
    return -float(updates["wq"])

  g = 1e-4
  torch_closed_form = g / (g + 1e-5)                                       # m_hat = g, v_hat = g^2
  tf_closed_form = math.sqrt(1e-3) / 0.1 * (0.1 * g) / (math.sqrt(1e-3) * g + 1e-5)
  assert first_step("torch", g) == pytest.approx(torch_closed_form, rel=1e-5)
  assert first_step("tf", g) == pytest.approx(tf_closed_form, rel=1e-5)
  assert first_step("torch", g) / first_step("tf", g) > 3.5
  assert first_step("tf", 1.0) == pytest.approx(first_step("torch", 1.0), rel=1e-3)


def test_both_styles_keep_the_same_state_tree_and_layout():
  """A checkpoint can resume under the other style, and the state shards like the parameters."""
  cfg = ModelConfig(flavour="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=32)
  _, abstract = nnx.split(nnx.eval_shape(lambda: ScalarModel(cfg, rngs=nnx.Rngs(0))))
  params = nnx.to_pure_dict(abstract)
  from instructjax import parallel
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  specs = parallel.param_specs(abstract, parallel.DEFAULT_RULES, mesh)
  states, layouts = {}, {}
  for style in STYLES:
    opt = sft.make_optimizer(optax.constant_schedule(1e-3), weight_decay=0.1, adam_style=style)
    states[style] = jax.tree.structure(jax.eval_shape(opt.init, params))
    layouts[style] = common.opt_state_specs(opt, params, specs)
  assert states["tf"] == states["torch"]
  assert layouts["tf"] == layouts["torch"]


# --------------------------------------------------------------------------- weight decay and mask


@pytest.mark.parametrize("style", STYLES)
def test_adamw_with_decay_and_clipping_matches_the_numpy_loop(style):
  params = small_tree()
  grads = gradients([3.0, 0.5, 10.0, 0.2, 2.0])  # three above the clip norm, two below
  optimizer = sft.make_optimizer(varying_lr, weight_decay=0.3, b1=0.9, b2=0.95, eps=1e-8,
                                 clip_norm=1.0, adam_style=style)
  want = numpy_adam(params, grads, style=style, lr=numpy_varying_lr, b1=0.9, b2=0.95, eps=1e-8,
                    weight_decay=0.3, decayed=SMALL_TREE_DECAYED, clip=1.0)
  assert_same_trajectory(run(optimizer, params, grads), want, params)


def expected_decay(name: str) -> bool:
  """The rule docs/configs.md states: weight matrices and embeddings decay; norms (scale and bias),
  attention / MLP biases and the scalar head's bias do not."""
  if "norm" in name:
    return False
  if name in {"bq", "bk", "bv", "bo", "b_in", "b_out", "head_b"}:
    return False
  return True


@functools.cache
def model_params(flavour: str, cls):
  cfg = ModelConfig(flavour=flavour, vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=32)
  return nnx.to_pure_dict(nnx.split(cls(cfg, rngs=nnx.Rngs(0)))[1])


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("cls", [LanguageModel, ScalarModel])
def test_decay_mask_covers_matrices_and_embeddings_only(flavour, cls):
  params = model_params(flavour, cls)
  mask = sft.decay_mask(params)
  names = {}
  for (path, _), (_, decayed) in zip(jax.tree.leaves_with_path(params),
                                     jax.tree.leaves_with_path(mask), strict=True):
    name = path[-1].key
    names[name] = decayed
    assert decayed == expected_decay(name), f"{jax.tree_util.keystr(path)}: decayed={decayed}"
  assert {"embed", "wq", "wo"} <= {n for n, d in names.items() if d}
  assert any("norm" in n for n in names) and not any(d for n, d in names.items() if "norm" in n)
  if flavour == "gpt2":
    assert not names["bq"] and not names["b_in"]
  if cls is ScalarModel:
    assert names["head_w"] and not names["head_b"]


@pytest.mark.parametrize("style", STYLES)
def test_weight_decay_moves_only_the_masked_parameters(style):
  """Zero gradient, one update at lr 0.1 with weight_decay 0.5: a decayed parameter shrinks by
  exactly (1 - 0.05); a norm, bias or head bias does not move at all."""
  params = model_params("gpt2", ScalarModel)
  optimizer = sft.make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5,
                                 adam_style=style)
  zeros = jax.tree.map(jnp.zeros_like, params)

  @jax.jit
  def one_update(p):
    updates, _ = optimizer.update(zeros, optimizer.init(p), p)
    return optax.apply_updates(p, updates)

  after = one_update(params)
  moved = 0
  for (path, before), (_, now) in zip(jax.tree.leaves_with_path(params),
                                      jax.tree.leaves_with_path(after), strict=True):
    name = path[-1].key
    if expected_decay(name):
      np.testing.assert_allclose(now, np.asarray(before) * 0.95, rtol=1e-6, err_msg=name)
      moved += 1
    else:
      np.testing.assert_array_equal(now, before, err_msg=f"{name} is not decayed")
  assert moved >= 8


# ---------------------------------------------------------------------------------------- schedules


LR, WARMUP, TOTAL = 2.0, 10, 110   # 100 decay steps after the warmup


def cosine(step, end):
  frac = min(step - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)
  return LR * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac)))


def linear(step, end):
  frac = min(step - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)
  return LR * (1 - (1 - end) * frac)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_from_zero(decay):
  schedule = sft.learning_rate_schedule(LR, WARMUP, TOTAL, decay, 0.1)
  for step, want in [(0, 0.0), (1, 0.2), (5, 1.0), (9, 1.8), (10, LR)]:
    assert float(schedule(step)) == pytest.approx(want, abs=1e-6), f"{decay} at step {step}"


@pytest.mark.parametrize("end", [0.0, 0.1, 0.5])
def test_cosine_and_linear_decay_reach_end_fraction(end):
  cos = sft.learning_rate_schedule(LR, WARMUP, TOTAL, "cosine", end)
  lin = sft.learning_rate_schedule(LR, WARMUP, TOTAL, "linear", end)
  for step in [10, 35, 60, 85, 109, 110, 200]:
    assert float(cos(step)) == pytest.approx(cosine(step, end), abs=1e-6), f"cosine {step}"
    assert float(lin(step)) == pytest.approx(linear(step, end), abs=1e-6), f"linear {step}"
  # By hand: the midpoint is halfway between lr and end * lr for both; the end is end * lr.
  assert float(cos(60)) == pytest.approx(LR * (1 + end) / 2, abs=1e-6)
  assert float(lin(60)) == pytest.approx(LR * (1 + end) / 2, abs=1e-6)
  assert float(cos(110)) == pytest.approx(LR * end, abs=1e-6)
  assert float(lin(110)) == pytest.approx(LR * end, abs=1e-6)
  quarter = LR * (end + (1 - end) * (1 + math.sqrt(0.5)) / 2)  # cos(pi / 4) = sqrt(1/2)
  assert float(cos(35)) == pytest.approx(quarter, abs=1e-6)
  assert float(lin(35)) == pytest.approx(LR * (1 - 0.25 * (1 - end)), abs=1e-6)


def test_constant_schedule_and_no_warmup():
  const = sft.learning_rate_schedule(LR, WARMUP, TOTAL, "constant", 0.1)
  for step in [10, 60, 110, 500]:
    assert float(const(step)) == pytest.approx(LR)
  for decay in ["cosine", "linear", "constant"]:  # warmup 0: the first update has the full rate
    assert float(sft.learning_rate_schedule(LR, 0, 100, decay, 0.1)(0)) == pytest.approx(LR)
  with pytest.raises(ValueError, match="cosine, linear or constant"):
    sft.learning_rate_schedule(LR, WARMUP, TOTAL, "exponential")


@pytest.mark.parametrize("style", STYLES)
def test_the_optimizer_steps_with_the_schedule_rate_of_its_update_count(style):
  """Warmup 2 from zero: the first update has rate 0 (nothing moves), the second lr / 2."""
  schedule = sft.learning_rate_schedule(1.0, 2, 10, "constant")
  optimizer = sft.make_optimizer(schedule, b1=0.9, b2=0.999, eps=1e-5, clip_norm=None,
                                 adam_style=style)
  params = small_tree()
  grads = gradients([1.0, 1.0, 1.0])
  want = numpy_adam(params, grads, style=style, lr=lambda t: min(t / 2, 1.0), b1=0.9, b2=0.999,
                    eps=1e-5)
  got = run(optimizer, params, grads)
  assert_same_trajectory(got, want, params)
  np.testing.assert_array_equal(got[0]["embed"], flat(params)["embed"])


# ----------------------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("style", STYLES)
def test_a_clipped_gradient_updates_as_the_gradient_of_norm_clip(style):
  """Gradients of norm 10, 0.5, 3 clipped at 1 give exactly the updates of the same gradients
  scaled to norm 1, 0.5, 1 without clipping. eps = 0.1 makes even one Adam step scale-dependent."""
  params = small_tree()
  big = gradients([10.0, 0.5, 3.0])
  scaled = [jax.tree.map(lambda x, n=n: x / n, g) for g, n in zip(big, [10.0, 1.0, 3.0])]

  def make(clip):
    return sft.make_optimizer(optax.constant_schedule(1e-2), eps=0.1, clip_norm=clip,
                              adam_style=style)

  clipped = run(make(1.0), params, big)
  as_norm_one = run(make(None), params, scaled)
  for c, s in zip(clipped, as_norm_one):
    for k in c:
      np.testing.assert_allclose(c[k], s[k], rtol=1e-6, atol=1e-7, err_msg=k)
  unclipped = run(make(None), params, big)
  assert not np.allclose(unclipped[0]["layers/wq"], clipped[0]["layers/wq"], rtol=1e-4, atol=1e-6)
  for off in (0.0, -1.0):  # <= 0 turns clipping off
    np.testing.assert_array_equal(run(make(off), params, big)[-1]["embed"], unclipped[-1]["embed"])
  want = numpy_adam(params, big, style=style, lr=lambda t: 1e-2, b1=0.9, b2=0.95, eps=0.1,
                    clip=1.0)
  assert_same_trajectory(clipped, want, params)


# -------------------------------------------------------------------------------------- the config


def optimizer_section(**fields):
  o = base.optimizer_config(lr=1e-2, warmup_steps=0)
  o.decay = "constant"
  o.update(fields)
  return o


def test_config_default_is_torch_and_tf_reaches_the_optimizer():
  assert base.optimizer_config().adam_style == "torch"
  params = small_tree()
  grads = gradients([3e-3, 1e-3, 5e-3], tiny=True)
  for style in STYLES:
    _, optimizer = common.make_optimizer(
        optimizer_section(adam_style=style, eps=1e-5, b2=0.999, clip_norm=0.0), total_steps=10)
    want = numpy_adam(params, grads, style=style, lr=lambda t: 1e-2, b1=0.9, b2=0.999, eps=1e-5)
    assert_same_trajectory(run(optimizer, params, grads), want, params)
  with pytest.raises(InputError, match="config.optimizer.adam_style"):
    common.make_optimizer(optimizer_section(adam_style="pytorch"), total_steps=10)


def test_every_stage_config_has_the_field_and_ppo_gives_it_to_both_models():
  from experiments.configs import ppo as ppo_config, pretrain, reward, sft as sft_config
  from instructjax.trainers import ppo
  for module in (pretrain, sft_config, reward, ppo_config):
    assert module.get_config("tiny").optimizer.adam_style == "torch", module.__name__
  config = ppo_config.get_config("tiny")
  with config.unlocked():
    config.optimizer.adam_style = "tf"
    config.optimizer.eps = 1e-5
    config.optimizer.warmup_steps = 0
  optimizers, _ = ppo.make_optimizers(config, 10)
  for name, lr in (("policy", config.optimizer.lr), ("value", config.value_lr)):
    opt = optimizers[name]
    params = {"wq": jnp.zeros(())}
    updates, _ = opt.update({"wq": jnp.asarray(1e-4)}, opt.init(params), params)
    tf_first = math.sqrt(1e-3) / 0.1 * 1e-5 / (math.sqrt(1e-3) * 1e-4 + 1e-5)
    assert -float(updates["wq"]) == pytest.approx(lr * tf_first, rel=1e-5), name


def test_the_ppo_sweep_ablates_the_adam_style(tmp_path):
  from experiments import sweep
  for arg in ("tiny", "small"):
    runs = {r.name: r for r in sweep.plan(f"experiments/configs/ppo.py:{arg}", str(tmp_path))}
    assert runs["tf_adam"].overrides == {"optimizer.adam_style": "tf", "optimizer.eps": 1e-5}
    assert "--config.optimizer.adam_style=tf" in runs["tf_adam"].args
    assert all("optimizer.adam_style" not in r.overrides for n, r in runs.items() if n != "tf_adam")
