"""Checkpoints of sharded train states, on top of orbax-checkpoint.

A checkpoint step directory holds two items:

* `state`: an arbitrary pytree of `jax.Array`s (params, optimizer state, step,
  raw `uint32` PRNG key data, KL-controller scalars, ...), written shard by
  shard by every process.
* `extra`: a JSON document (data-iterator positions, a config snapshot, ...).

Restoring takes an *abstract* target, a pytree of `jax.ShapeDtypeStruct`s that
carry the shardings wanted now. The mesh may differ from the one at save time;
orbax reads each device's slice from the stored arrays. Before any bytes are
read the target is compared with the stored metadata, so a wrong structure or
shape is reported as an `InputError` that names the key, not as an error from
deep inside jax.

Nothing here saves on its own: there is no exit hook and orbax's own save
policy (which would also save on preemption) is bypassed; a step is written only
when the caller asks for it. A trainer that stops saving after a non-finite loss
therefore keeps its last good checkpoint as the latest one.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from instructjax.errors import InputError

_STATE = "state"
_EXTRA = "extra"
# How many stored keys an error message lists before it gives up.
_KEYS_SHOWN = 8

PyTree = Any


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  # PyTree (not Standard) handlers: only they can restore part of a tree, which
  # `restore_subtree` needs, and a directory must be read with the handler that
  # wrote it.
  return {_STATE: ocp.PyTreeCheckpointHandler(), _EXTRA: ocp.JsonCheckpointHandler()}


def _absolute(directory: str | os.PathLike) -> str:
  """Local paths become absolute (orbax wants that); URLs such as gs:// stay."""
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)


def _key_name(key: Any) -> str:
  """One step of a jax key path as the string orbax uses on disk."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _flat(tree: PyTree) -> dict[str, Any]:
  """Leaves by their '/'-joined path; `None` and empty nodes have no leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _listing(keys: Sequence[str]) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:_KEYS_SHOWN])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > _KEYS_SHOWN else "")


def _check_target(where: str, stored: PyTree, target: PyTree, *, prefix: str,
                  same_dtype: bool) -> None:
  """Raises InputError unless `target` has exactly the stored keys and shapes.

  Args:
    where: the checkpoint, for the error message.
    stored: orbax metadata tree (leaves have `.shape` and `.dtype`).
    target: abstract tree (leaves have `.shape`, `.dtype` and `.sharding`).
    prefix: path of `stored` inside the checkpoint's state, for messages.
    same_dtype: when False a dtype difference is allowed (orbax casts).
  """
  stored_flat, target_flat = _flat(stored), _flat(target)
  name = lambda key: "/".join(p for p in (prefix, key) if p) or "(root)"
  for key, leaf in target_flat.items():
    if key not in stored_flat:
      raise InputError(where, f"key {name(key)!r} of the target is not in the checkpoint; "
                       f"the checkpoint has: {_listing([name(k) for k in stored_flat])}")
    for attribute in ("shape", "dtype", "sharding"):
      if getattr(leaf, attribute, None) is None:
        raise InputError(where, f"target leaf {name(key)!r} is a {type(leaf).__name__} "
                         f"without a {attribute}; build the target with abstract_like()")
    saved = stored_flat[key]
    if tuple(saved.shape) != tuple(leaf.shape):
      raise InputError(where, f"key {name(key)!r} has shape {tuple(saved.shape)} in the "
                       f"checkpoint but {tuple(leaf.shape)} in the target")
    if same_dtype and saved.dtype != leaf.dtype:
      raise InputError(where, f"key {name(key)!r} has dtype {saved.dtype} in the "
                       f"checkpoint but {leaf.dtype} in the target")
  unexpected = [name(k) for k in stored_flat if k not in target_flat]
  if unexpected:
    raise InputError(where, "the checkpoint has keys the target lacks: "
                     f"{_listing(unexpected)}")


def _check_savable(state: PyTree) -> None:
  for key, leaf in _flat(state).items():
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      raise InputError(f"state/{key}", "is a typed PRNG key; store "
                       "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data")


def _check_json(where: str, value: Any) -> None:
  """Raises InputError naming the first part of `value` JSON cannot hold as is."""
  if value is None or isinstance(value, (bool, int, str)):
    return
  if isinstance(value, float):
    if not math.isfinite(value):
      raise InputError(where, f"{value} is not valid JSON")
    return
  if isinstance(value, Mapping):
    for key, item in value.items():
      if not isinstance(key, str):
        raise InputError(where, f"key {key!r} is a {type(key).__name__}; JSON keys are strings")
      _check_json(f"{where}[{key!r}]", item)
    return
  if isinstance(value, (list, tuple)):
    for index, item in enumerate(value):
      _check_json(f"{where}[{index}]", item)
    return
  if isinstance(value, bytes):
    raise InputError(where, "is bytes, which JSON cannot hold; grain's DataLoader iterator "
                     "state is JSON text, store json.loads(state.decode())")
  raise InputError(where, f"is a {type(value).__name__}, which JSON cannot hold; convert it "
                   "with int(), float() or .tolist()")


def _manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


def _pick_step(manager: ocp.CheckpointManager, directory: str, step: int | None) -> int:
  steps = sorted(manager.all_steps())
  if not steps:
    raise InputError(directory, "no checkpoint found (no finished step directory)")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise InputError(directory, f"no checkpoint for step {step}; it has steps {steps}")
  return step


def _stored_state(manager: ocp.CheckpointManager, directory: str, step: int) -> PyTree:
  metadata = manager.item_metadata(step)[_STATE]
  if metadata is None:
    raise InputError(f"{directory}/{step}", "has no 'state' item; was it written by "
                     "instructjax.checkpoint?")
  return getattr(metadata, "tree", metadata)


def _restore_state(manager: ocp.CheckpointManager, step: int, target: PyTree,
                   partial: bool) -> PyTree:
  # Explicit restore_args make orbax place every leaf on the target's sharding;
  # without them it falls back to the shardings stored at save time.
  restore = ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=partial)
  return manager.restore(step, args=ocp.args.Composite(**{_STATE: restore}))[_STATE]


def abstract_like(tree: PyTree, shardings: PyTree | jax.sharding.Sharding) -> PyTree:
  """`jax.ShapeDtypeStruct`s with the shapes and dtypes of `tree` on `shardings`.

  Args:
    tree: pytree of arrays or of `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape`).
    shardings: one sharding for all leaves, or a pytree of them matching `tree`.

  Returns:
    A restore target for `Checkpointer.restore` or `restore_subtree`.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Saves every `save_every` steps, keeps the last `keep`, restores with resharding.

  Every process must call `save`, `restore`, `wait` and `close` (orbax
  coordinates the hosts; each writes its own shards).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int,
               async_save: bool = False):
    if save_every < 1:
      raise InputError("Checkpointer", f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise InputError("Checkpointer", f"keep must be >= 1, got {keep}")
    self.directory = _absolute(directory)
    self.save_every = save_every
    self._manager = _manager(self.directory, ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        # Leftovers of a save that a crash interrupted are never valid steps.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state: PyTree, extra: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Writes `state` and `extra` as `step` when due (or forced); True if it did.

    With `async_save` the arrays are copied to host before this returns, so the
    caller may donate or overwrite them; the files are finished in background
    (`wait` blocks until they are). A step that already exists is not rewritten.
    """
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      logging.info("checkpoint for step %d already exists in %s; not saving again",
                   step, self.directory)
      return False
    extra = {} if extra is None else extra
    if not isinstance(extra, Mapping):
      raise InputError("extra", f"must be a dict, got {type(extra).__name__}")
    _check_json("extra", extra)
    _check_savable(state)
    # force=True: the decision above is the only one. Orbax's own policy would
    # also save on its schedule or on a preemption signal, i.e. unasked.
    return self._manager.save(step, force=True, args=ocp.args.Composite(**{
        _STATE: ocp.args.PyTreeSave(state),
        _EXTRA: ocp.args.JsonSave(json.loads(json.dumps(extra))),
    }))

  def restore(self, abstract_state: PyTree,
              step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Returns `(state, extra)` of `step` (None: the latest).

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with the target
        shardings (see `abstract_like`); it must match the saved state in
        structure, shapes and dtypes. The mesh may differ from the saved one.
      step: the step to restore; None for the latest.
    """
    self.wait()
    step = _pick_step(self._manager, self.directory, step)
    where = f"{self.directory}/{step}"
    _check_target(where, _stored_state(self._manager, self.directory, step), abstract_state,
                  prefix="", same_dtype=True)
    state = _restore_state(self._manager, step, abstract_state, partial=False)
    extra = self._manager.restore(step, args=ocp.args.Composite(
        **{_EXTRA: ocp.args.JsonRestore()}))[_EXTRA]
    return state, extra

  def wait(self) -> None:
    """Blocks until a background save has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a background save, then releases orbax's threads. Saves nothing."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def restore_subtree(directory: str | os.PathLike, abstract_subtree: PyTree,
                    path: tuple[str, ...] = ("params",), step: int | None = None) -> PyTree:
  """Reads only `state[path[0]][path[1]]...` of a checkpoint, e.g. for `init_from`.

  The checkpoint may come from another stage whose state has another structure
  (another optimizer, an extra head); only the subtree at `path` must match
  `abstract_subtree` in structure and shapes. Dtypes may differ: the values are
  cast to the target's (e.g. float32 SFT weights into a bfloat16 policy).

  Args:
    directory: the other stage's checkpoint directory.
    abstract_subtree: pytree of `jax.ShapeDtypeStruct` with the target shardings.
    path: keys leading from the saved state to the subtree.
    step: the step to read; None for the latest.

  Returns:
    The subtree, with the structure of `abstract_subtree`, on its shardings.
  """
  directory = _absolute(directory)
  if "://" not in directory and not os.path.isdir(directory):
    raise InputError(directory, "no checkpoint found (the directory does not exist)")
  manager = _manager(directory, ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    step = _pick_step(manager, directory, step)
    stored = _stored_state(manager, directory, step)
    for depth, key in enumerate(path):
      if not isinstance(stored, Mapping) or key not in stored:
        here = "/".join(path[:depth]) or "(root)"
        keys = sorted(stored) if isinstance(stored, Mapping) else []
        raise InputError(f"{directory}/{step}", f"state has no key {'/'.join(path[:depth + 1])!r}; "
                         f"keys under {here}: {_listing(keys)}")
      stored = stored[key]
    _check_target(f"{directory}/{step}", stored, abstract_subtree, prefix="/".join(path),
                  same_dtype=False)
    target = abstract_subtree
    for key in reversed(path):
      target = {key: target}
    restored = _restore_state(manager, step, target, partial=True)
  finally:
    manager.close()
  for key in path:
    restored = restored[key]
  return restored
