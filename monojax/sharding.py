"""Device mesh from the config. The logical-axis rules table joins this file with the model."""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType
from monojax import errors


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """(data, model) mesh; one -1 entry takes the remaining devices. Auto axis types (see jax-stack)."""
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
