"""Meshes, logical-axis rules and shardings: how every array is laid out over devices.

Parameters and large activations are named with *logical* axes ("embed", "heads", "batch", ...).
A rules table from the config maps each logical axis to a mesh axis ("data", "fsdp", "tensor") or to
None (replicated). Nothing is sharded implicitly: a parameter without logical names is an error.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instructjax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameters use the plain names; activations use "act_*" names so that e.g. the embedding
# dimension of a weight can be fsdp-sharded while that of an activation (whose batch dimension
# already uses fsdp) stays whole.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("position", None),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

Rules = Sequence[tuple[str, Any]]


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Normalises a config's rules (a list of [name, axis-or-list] pairs) into hashable tuples."""
  normal = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes) if axes else None
    normal.append((name, axes))
  return tuple(normal)


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------

def mesh_shape(requested: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Fills the one -1 in {data, fsdp, tensor} so that the product is the device count."""
  sizes = [int(requested.get(axis, 1)) for axis in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise InputError("config.mesh", f"at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if n_devices % known:
      raise InputError("config.mesh", f"{n_devices} devices do not divide into {dict(zip(MESH_AXES, sizes))}")
    sizes[unknown[0]] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise InputError("config.mesh", f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices but {n_devices} are available")
  return tuple(sizes)


def make_mesh(requested: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices, with Auto axis types (jit decides placement)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(requested, len(devices))
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # fake CPU devices or odd topologies: plain order is fine
    device_array = np.array(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def maybe_initialize_distributed(enabled: bool = False) -> None:
  """Starts jax's multi-controller runtime when asked (flag or INSTRUCTJAX_DISTRIBUTED=1).

  `jax.distributed.initialize()` reads the coordinator and process ids from the environment
  (TPU pods, SLURM), or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  """
  if not (enabled or os.environ.get("INSTRUCTJAX_DISTRIBUTED") == "1"):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


# ---------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# ---------------------------------------------------------------------------------------------

_context = threading.local()


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  """Makes `rules` the table that `logical_constraint` resolves activation names with."""
  previous = getattr(_context, "rules", None)
  _context.rules = tuple(rules)
  try:
    yield
  finally:
    _context.rules = previous


def current_rules() -> Rules | None:
  return getattr(_context, "rules", None)


def logical_to_spec(names: Sequence[str | None], rules: Rules, where: str = "") -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; an unknown name is an error."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise InputError(where or "sharding rules",
                       f"logical axis {name!r} has no rule; add it to config.sharding_rules")
    axes = table[name]
    axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
    # A mesh axis may appear once per spec: a later dimension asking for it again stays whole.
    axes_tuple = tuple(a for a in axes_tuple if a not in used)
    used.update(axes_tuple)
    spec.append(axes_tuple[0] if len(axes_tuple) == 1 else (axes_tuple or None))
  return PartitionSpec(*spec)


def logical_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout inside jit; a no-op outside `axis_rules` or without a mesh."""
  rules = current_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def _spec_fits(shape, spec: PartitionSpec, mesh: Mesh) -> bool:
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    if dim % math.prod(mesh.shape[a] for a in axes):
      return False
  return True


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_specs(abstract_state: nnx.State, rules: Rules, mesh: Mesh) -> Any:
  """PartitionSpecs (as a pure dict) for every parameter, from its `logical_axes` metadata.

  A parameter without names, names of the wrong rank, or a shape the mesh cannot split evenly is
  an error naming the parameter: silent replication of a large weight is how runs go out of memory.
  """
  def spec_of(path, variable):
    where = f"parameter {_path_name(path)}"
    names = variable.get_metadata().get("logical_axes")
    shape = variable.get_value().shape
    if names is None:
      raise InputError(where, "has no logical_axes metadata; every parameter must be named")
    if len(names) != len(shape):
      raise InputError(where, f"logical_axes {names} do not match its shape {shape}")
    spec = logical_to_spec(names, rules, where)
    if not _spec_fits(shape, spec, mesh):
      raise InputError(where, f"shape {shape} cannot be split by {spec} on mesh {dict(mesh.shape)}")
    return spec

  specs = jax.tree.map_with_path(spec_of, abstract_state,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def named(mesh: Mesh, specs: Any) -> Any:
  """NamedShardings for a pytree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_axes(rules: Rules | None = None) -> tuple[str, ...]:
  """The mesh axes the logical "batch" axis maps to under `rules` (default: the active rules,
  else DEFAULT_RULES): the one place jit shardings, activation constraints and batch checks
  learn how a batch is split."""
  rules = rules if rules is not None else current_rules() or DEFAULT_RULES
  axes = logical_to_spec(("batch",), rules)[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0,
                   rules: Rules | None = None) -> NamedSharding:
  """Dimension `leading` (the batch) split like the logical "batch" axis, the rest whole."""
  names = [None] * ndim
  names[leading] = batch_axes(rules) or None
  return NamedSharding(mesh, PartitionSpec(*names))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local.items()}


def to_host(tree) -> Any:
  """Every (possibly sharded, possibly multi-process) array of `tree` whole, as numpy arrays, on
  every process: a collective when the run spans processes, so every process must call it."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def batch_divisor(mesh, rules: Rules | None = None) -> int:
  """How many ways a batch is split on `mesh` (a Mesh or an abstract mesh): the global batch
  must be a multiple of this."""
  return math.prod(mesh.shape[axis] for axis in batch_axes(rules))


def check_global_batch(batch_size: int, mesh: Mesh, where: str = "config.batch_size",
                       rules: Rules | None = None) -> int:
  """Returns the per-process batch size, or explains why the batch cannot be laid out."""
  shards = batch_divisor(mesh, rules)
  if batch_size % shards or batch_size % jax.process_count():
    raise InputError(where, f"global batch {batch_size} must be divisible by the {shards} batch "
                     f"shards ({' x '.join(batch_axes(rules))}) and by the {jax.process_count()} "
                     "processes")
  return batch_size // jax.process_count()
