"""Checkpointer: bit-exact round trips, resharding, retention, subtrees, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructjax.checkpoint import Checkpointer, abstract_like, restore_subtree
from instructjax.errors import InputError

AXES = ("data", "fsdp", "tensor")


def make_mesh(shape):
  return Mesh(np.array(jax.devices()).reshape(shape), AXES)


def sharded(mesh, value, spec):
  return jax.device_put(value, NamedSharding(mesh, spec))


def train_state(mesh, seed=0):
  """A small state with every kind of leaf a trainer stores."""
  rng = np.random.default_rng(seed)
  return {
      "params": {
          "embed": sharded(mesh, rng.normal(size=(16, 8)).astype(np.float32), P("fsdp", "tensor")),
          "norm": sharded(mesh, jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16), P("tensor")),
      },
      "opt": {"mu": sharded(mesh, rng.normal(size=(16, 8)).astype(np.float32), P("data", None))},
      "step": sharded(mesh, jnp.int32(7 + seed), P()),
      "rng": sharded(mesh, jax.random.key_data(jax.random.key(seed)), P()),
      "kl_coef": sharded(mesh, jnp.float32(0.1 * (seed + 1)), P()),
  }


def specs_of(state):
  return jax.tree.map(lambda x: x.sharding.spec, state)


def target_on(mesh, state, specs):
  return abstract_like(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def assert_bit_exact(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype and got.shape == want.shape
    # Compare raw bytes so that bf16 and NaN payloads count too.
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


EXTRA = {"data": {"next_index": 123, "epoch": 1}, "config": {"lr": 1e-5, "name": "sft"},
         "tags": [1, "a", None]}


def test_round_trip_is_bit_exact_with_extra(tmp_path):
  mesh = make_mesh((2, 2, 2))
  state = train_state(mesh)
  with Checkpointer(tmp_path / "run", save_every=5, keep=3) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state, EXTRA)
    restored, extra = ckpt.restore(abstract_like(state, jax.tree.map(lambda x: x.sharding, state)))
  assert_bit_exact(restored, state)
  assert extra == EXTRA
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert got.sharding == want.sharding


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 4, 2)])
def test_restore_onto_another_mesh_and_specs(tmp_path, shape):
  state = train_state(make_mesh((2, 2, 2)))
  ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
  ckpt.save(3, state, {})
  new_mesh = make_mesh(shape)
  new_specs = {"params": {"embed": P("data", None), "norm": P()},
               "opt": {"mu": P(None, ("fsdp", "tensor"))},
               "step": P(), "rng": P(), "kl_coef": P()}
  restored, extra = ckpt.restore(target_on(new_mesh, state, new_specs))
  ckpt.close()
  assert_bit_exact(restored, state)
  assert extra == {}
  for got, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(
      new_specs, is_leaf=lambda x: isinstance(x, P))):
    assert got.sharding == NamedSharding(new_mesh, spec)
    assert got.sharding.mesh.devices.shape == shape


def test_schedule_force_and_keep_last(tmp_path):
  mesh = make_mesh((2, 2, 2))
  ckpt = Checkpointer(tmp_path, save_every=2, keep=2)
  assert [ckpt.should_save(s) for s in range(1, 5)] == [False, True, False, True]
  written = [s for s in range(1, 8) if ckpt.save(s, train_state(mesh, seed=s), {"s": s})]
  assert written == [2, 4, 6]
  assert ckpt.save(7, train_state(mesh, seed=7), {"s": 7}, force=True)
  # A forced final save of a step already written is a no-op, not an error.
  assert not ckpt.save(7, train_state(mesh, seed=7), {"s": 7}, force=True)
  assert ckpt.all_steps() == [6, 7]
  assert ckpt.latest_step() == 7
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


def test_reopen_sees_latest_and_restores_older_step(tmp_path):
  mesh = make_mesh((2, 2, 2))
  first = Checkpointer(tmp_path / "a" / "b", save_every=1, keep=5, async_save=True)
  for step in (1, 2):
    first.save(step, train_state(mesh, seed=step), {"step": step})
  first.close()
  # A fresh object is what a restarted process sees.
  again = Checkpointer(tmp_path / "a" / "b", save_every=1, keep=5)
  assert again.latest_step() == 2
  target = target_on(mesh, train_state(mesh), specs_of(train_state(mesh)))
  state, extra = again.restore(target)
  assert_bit_exact(state, train_state(mesh, seed=2))
  assert extra == {"step": 2}
  state, extra = again.restore(target, step=1)
  assert_bit_exact(state, train_state(mesh, seed=1))
  assert extra == {"step": 1}
  with pytest.raises(InputError, match="no checkpoint for step 5"):
    again.restore(target, step=5)
  again.close()


def test_nothing_is_saved_unasked(tmp_path):
  mesh = make_mesh((2, 2, 2))
  ckpt = Checkpointer(tmp_path, save_every=10, keep=3)
  ckpt.save(10, train_state(mesh), {})
  # Steps after 10 are never saved (say the loss went non-finite); closing must
  # not write them either.
  assert not ckpt.save(13, train_state(mesh, seed=1), {})
  ckpt.close()
  assert Checkpointer(tmp_path, save_every=10, keep=3).all_steps() == [10]


def test_restore_subtree_from_a_bigger_state(tmp_path):
  mesh = make_mesh((2, 2, 2))
  state = train_state(mesh)
  state["params"] = {"backbone": state["params"], "lm_head": state["opt"]["mu"]}
  ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
  ckpt.save(4, state, {})
  ckpt.close()
  backbone = state["params"]["backbone"]
  new_mesh = make_mesh((1, 4, 2))
  target = target_on(new_mesh, backbone, {"embed": P(None, "fsdp"), "norm": P("tensor")})
  got = restore_subtree(tmp_path, target, path=("params", "backbone"))
  assert_bit_exact(got, backbone)
  assert got["embed"].sharding == NamedSharding(new_mesh, P(None, "fsdp"))
  # The default path reads all params; dtypes may change (cast on read).
  params_target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=NamedSharding(new_mesh, P())),
      state["params"])
  got = restore_subtree(tmp_path, params_target)
  np.testing.assert_array_equal(
      got["backbone"]["norm"], np.asarray(backbone["norm"]).astype(np.float32))
  assert got["backbone"]["norm"].dtype == jnp.float32


def test_restore_subtree_mismatch_names_the_key(tmp_path):
  mesh = make_mesh((2, 2, 2))
  state = train_state(mesh)
  Checkpointer(tmp_path, save_every=1, keep=1).save(1, state, {})
  sharding = NamedSharding(mesh, P())
  params = abstract_like(state["params"], sharding)
  wrong_shape = dict(params, embed=jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding))
  with pytest.raises(InputError, match=r"'params/embed' has shape \(16, 8\).*\(16, 4\)"):
    restore_subtree(tmp_path, wrong_shape)
  with pytest.raises(InputError, match="'params/head' of the target is not in the checkpoint"):
    restore_subtree(tmp_path, dict(params, head=params["norm"]))
  with pytest.raises(InputError, match="keys the target lacks: params/norm"):
    restore_subtree(tmp_path, {"embed": params["embed"]})
  with pytest.raises(InputError, match="state has no key 'params/backbone'"):
    restore_subtree(tmp_path, params, path=("params", "backbone"))


def test_restore_with_wrong_target_names_the_key(tmp_path):
  mesh = make_mesh((2, 2, 2))
  state = train_state(mesh)
  ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
  ckpt.save(1, state, {})
  target = abstract_like(state, NamedSharding(mesh, P()))
  target["opt"]["nu"] = target["opt"]["mu"]
  with pytest.raises(InputError, match="'opt/nu' of the target is not in the checkpoint"):
    ckpt.restore(target)
  target = abstract_like(state, NamedSharding(mesh, P()))
  target["step"] = jax.ShapeDtypeStruct((), jnp.int64 if jax.config.x64_enabled else jnp.uint32,
                                        sharding=NamedSharding(mesh, P()))
  with pytest.raises(InputError, match="'step' has dtype int32"):
    ckpt.restore(target)
  ckpt.close()


def test_empty_or_missing_directory_is_a_clear_error(tmp_path):
  sharding = NamedSharding(make_mesh((2, 2, 2)), P())
  target = {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=sharding)}
  with pytest.raises(InputError, match="no checkpoint found"):
    restore_subtree(tmp_path / "nowhere", target)
  assert not (tmp_path / "nowhere").exists()
  with pytest.raises(InputError, match="no checkpoint found"):
    restore_subtree(tmp_path, target)
  ckpt = Checkpointer(tmp_path / "new", save_every=1, keep=1)
  assert (tmp_path / "new").is_dir()
  with pytest.raises(InputError, match="no checkpoint found"):
    ckpt.restore({"params": target})
  ckpt.close()


def test_bad_inputs_are_refused_before_writing(tmp_path):
  mesh = make_mesh((2, 2, 2))
  ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
  with pytest.raises(InputError, match=r"extra\['data'\]: is bytes"):
    ckpt.save(1, train_state(mesh), {"data": b"{}"})
  with pytest.raises(InputError, match=r"extra\['loss'\]: is a ndarray"):
    ckpt.save(1, train_state(mesh), {"loss": np.zeros(2)})
  with pytest.raises(InputError, match="typed PRNG key"):
    ckpt.save(1, {"rng": jax.random.key(0)}, {})
  assert ckpt.all_steps() == []
  ckpt.close()
  with pytest.raises(InputError, match="keep must be >= 1"):
    Checkpointer(tmp_path, save_every=1, keep=0)


def test_nnx_params_and_optax_state_round_trip(tmp_path):
  """The real structures: nnx.State with integer layer keys, optax namedtuples."""
  from flax import nnx
  import optax

  class Tiny(nnx.Module):

    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])

  mesh = make_mesh((2, 2, 2))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(nnx.state(Tiny(nnx.Rngs(0)), nnx.Param), replicated)
  opt_state = jax.device_put(optax.adamw(1e-3).init(params), replicated)
  opt_state = jax.tree.map(lambda x: x + 1, opt_state)
  state = {"params": params, "opt": opt_state, "step": jnp.int32(5)}
  with Checkpointer(tmp_path, save_every=5, keep=1) as ckpt:
    ckpt.save(5, state, {})
    restored, _ = ckpt.restore(abstract_like(state, replicated))
  assert_bit_exact(restored, state)
  assert isinstance(restored["opt"][0], optax.ScaleByAdamState)
  abstract_params = abstract_like(nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(1))), nnx.Param),
                                  NamedSharding(mesh, P("tensor")))
  got = restore_subtree(tmp_path, abstract_params)
  assert isinstance(got, nnx.State)
  assert got["layers"][1]["kernel"].sharding == NamedSharding(mesh, P("tensor"))
  assert_bit_exact(got, params)
