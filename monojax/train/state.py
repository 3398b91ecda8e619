"""Model construction, the optimizer and its schedule, and the sharded train state."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from monojax import errors, sharding
from monojax.models import transformer


def make_schedule(tc) -> optax.Schedule:
  """Linear warm-up to train.lr, then cosine or linear decay to lr * final_lr_ratio at train.steps."""
  warm = max(int(tc.warmup_steps), 0)
  end = tc.lr * tc.final_lr_ratio
  decay_steps = max(tc.steps - warm, 1)
  if tc.schedule == "cosine":
    decay = optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.final_lr_ratio)
  elif tc.schedule == "linear":
    decay = optax.linear_schedule(tc.lr, end, decay_steps)
  elif tc.schedule == "constant":
    decay = optax.constant_schedule(tc.lr)
  else:
    raise errors.ConfigError(f"train.schedule must be 'cosine', 'linear' or 'constant', got {tc.schedule!r}")
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warm), decay], [warm])


def make_optimizer(tc, schedule) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay only on matrices (not biases, LayerNorm)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  parts = []
  if tc.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def init_state(model_cfg, tx, seed: int, mesh):
  """Builds the sharded train state {"params", "opt", "step", "rng"} directly on the mesh (jit with
  out_shardings: no host copy of the full model is ever made). Returns (graphdef, state, shardings)."""
  graphdef, abstract_params = transformer.abstract_model(model_cfg)
  param_sh = sharding.tree_shardings(abstract_params, transformer.PARAM_AXES, mesh)

  def init_params():
    return transformer.build_model(model_cfg, seed)[1]

  params = jax.jit(init_params, out_shardings=param_sh)()
  opt_sh = jax.tree_util.tree_map_with_path(lambda p, x: _like_param(p, x, mesh), jax.eval_shape(tx.init, abstract_params))
  opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
  state = {"params": params, "opt": opt, "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(seed + 1_000_003))}
  rep = sharding.replicated(mesh)
  # Scalars (Adam's count, step, rng) come back on one device: replicate them over the mesh.
  shardings = jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh else rep,
      state)
  state = jax.device_put(state, shardings)
  return graphdef, state, shardings


def _like_param(path, x, mesh):
  """Optimizer moments are sharded like the parameter they belong to; counters are replicated."""
  axes = transformer.PARAM_AXES.get(sharding.leaf_name(path))
  if axes is None or len(axes) != x.ndim:
    return sharding.replicated(mesh)
  return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, mesh))


def count_params(params, exclude=("W_E", "W_pos")) -> int:
  """Parameters that cost FLOPs per token (embedding lookups excluded)."""
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if sharding.leaf_name(path) not in exclude:
      total += x.size
  return total
