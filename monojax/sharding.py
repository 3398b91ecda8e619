"""Device mesh from the config, and the one table mapping logical axis names to mesh axes (t5x
style): parameters name their axes (models/transformer.py: PARAM_AXES), this file decides where
each name lives on the mesh."""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

# logical axis -> mesh axis (None: replicated). Batch is data-parallel; the wide dims (vocab, MLP,
# heads, SAE features) split over "model"; the 128-wide residual stream is replicated.
RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("feat", "model"),
    ("embed", None),
    ("head_dim", None),
)
from monojax import errors


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """(data, model) mesh; one -1 entry takes the remaining devices. Auto axis types (docs/references.md §2)."""
  devices = devices if devices is not None else jax.devices()
  shape = list(mesh_cfg.shape)
  axes = tuple(mesh_cfg.axes)
  if len(shape) != len(axes):
    raise errors.ConfigError(f"mesh.shape {tuple(shape)} and mesh.axes {axes} must have the same length")
  if shape.count(-1) > 1:
    raise errors.ConfigError(f"mesh.shape {tuple(shape)}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise errors.ConfigError(f"mesh.shape {tuple(shape)}: {len(devices)} devices are not divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise errors.ConfigError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, found {len(devices)}")
  return jax.make_mesh(tuple(shape), axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def logical_to_spec(axes, shape, mesh, rules=RULES) -> P:
  """PartitionSpec for an array with these logical axes; a dim the mesh axis does not divide stays
  replicated (e.g. 4 heads on a model axis of 8)."""
  table = dict(rules)
  out = []
  for name, dim in zip(axes, shape):
    mesh_axis = table.get(name) if name else None
    if mesh_axis is not None and (mesh_axis not in mesh.shape or dim % mesh.shape[mesh_axis]):
      mesh_axis = None
    out.append(mesh_axis)
  return P(*out)


def path_names(path) -> list[str]:
  """The string keys/attribute names of a pytree path (dict keys, NNX attributes), without NNX's
  "value" leaf wrapper: [..., "mlp", "W_in"]."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return [n for n in names if isinstance(n, str) and n != "value"]


def leaf_name(path) -> str | None:
  """The last name on a pytree path (a parameter's or state entry's own name), or None."""
  names = path_names(path)
  return names[-1] if names else None


def tree_shardings(tree, axes_by_name: dict, mesh):
  """NamedShardings for a pytree of arrays whose leaves are named in `axes_by_name`."""
  def one(path, x):
    name = leaf_name(path)
    if name not in axes_by_name:
      raise KeyError(f"no logical axes declared for parameter {name!r} ({jax.tree_util.keystr(path)})")
    return NamedSharding(mesh, logical_to_spec(axes_by_name[name], x.shape, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(dict(RULES)["batch"]))
