"""The on-device mixing buffer that decorrelates the SAE's inputs (no activation ever touches disk).

The paper samples 250 positions per context and shuffles vectors from many contexts together, and
uses each vector once (sampled without replacement). Here every step samples P positions per
context from the tapped MLP activations and *exchanges* them with the buffer: it reads n random
distinct slots (the SAE's batch) and writes the n new vectors into exactly those slots. So every
vector is read exactly once, after a random stay in the buffer, and a batch mixes vectors from
~capacity/n different steps.

The buffer is sharded by rows on the mesh's data axis and the exchange runs per shard (shard_map):
each device mixes the activations of its own contexts with its own rows, so nothing crosses
devices (on a TPU pod a global random gather would be an all-to-all every step).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def data_size(mesh) -> int:
  return mesh.shape.get("data", 1)


def init(capacity: int, d_in: int, mesh) -> dict:
  n = data_size(mesh)
  if capacity % n:
    raise ValueError(f"sae.buffer_size={capacity} must be divisible by the data-parallel size {n}")
  acts = jax.device_put(jnp.zeros((capacity, d_in), jnp.float32), NamedSharding(mesh, P("data", None)))
  return {"acts": acts, "filled": jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))}


def shardings(mesh) -> dict:
  return {"acts": NamedSharding(mesh, P("data", None)), "filled": NamedSharding(mesh, P())}


def sample_positions(acts, positions: int, key):
  """acts [B, T, d] -> [B * positions, d]: `positions` distinct random positions of each context."""
  B, T, d = acts.shape
  if positions >= T:
    return acts.reshape(B * T, d)
  keys = jax.random.split(key, B)
  idx = jax.vmap(lambda k: jax.random.permutation(k, T)[:positions])(keys)          # [B, P]
  return jnp.take_along_axis(acts, idx[:, :, None], axis=1).reshape(B * positions, d)


def _local_fill(buf_acts, filled, new):
  n = new.shape[0]
  start = (filled * n) % buf_acts.shape[0]
  return jax.lax.dynamic_update_slice(buf_acts, new, (start, 0))


def _local_exchange(buf_acts, new, key):
  shard_key = jax.random.fold_in(key, jax.lax.axis_index("data"))
  slots = jax.random.choice(shard_key, buf_acts.shape[0], (new.shape[0],), replace=False)
  out = buf_acts[slots]
  return buf_acts.at[slots].set(new), out


def fill(buf: dict, new, mesh) -> dict:
  """Writes `new` [n, d] (sharded on data) into the next free rows of every shard; filled += 1."""
  f = jax.shard_map(_local_fill, mesh=mesh, in_specs=(P("data", None), P(), P("data", None)),
                    out_specs=P("data", None))
  return {"acts": f(buf["acts"], buf["filled"], new), "filled": buf["filled"] + 1}


def exchange(buf: dict, new, key, mesh) -> tuple[dict, jax.Array]:
  """Reads len(new) random distinct rows (per shard) and writes `new` there; returns (buffer, rows read)."""
  f = jax.shard_map(_local_exchange, mesh=mesh, in_specs=(P("data", None), P("data", None), P()),
                    out_specs=(P("data", None), P("data", None)))
  acts, out = f(buf["acts"], new, key)
  return {"acts": acts, "filled": buf["filled"]}, out


def fill_steps(capacity: int, per_step: int) -> int:
  """Steps of pure filling before the buffer is full (capacity must be a multiple of per_step)."""
  if capacity % per_step:
    raise ValueError(f"sae.buffer_size={capacity} must be a multiple of the vectors sampled per step ({per_step})")
  return capacity // per_step
