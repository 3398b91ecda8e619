"""SAE core: state init, the pure batched update, resampling entry points, encode/decode for
analysis, and shardings. Recipe rules live in recipes.py; what SAEs exist and where each lives in
the state, in catalogue.py. § numbers: docs/paper-notes.md.

State (a plain pytree of arrays; the update is pure and jittable):
  {"groups": {group_key: {"params": {W_e [S,d,m], b_e [S,m], W_d [S,m,d], b_d [S,d]},
                          "opt": optax chain state (Adam moments shaped like params),
                          "last_fired": int32[S,m]   value of "step" after the last update in which
                                                     the feature fired (0 at init),
                          "fired_count": int32[S,m]  firings in the current density window,
                          "fired_count_last": int32[S,m]  firings in the last complete window}},
   "input_scale": f32      the constant with E‖c·x‖ = √n on the init sample (applied by the 2024
                           and topk groups only; 2023 groups see raw activations),
   "step": int32           SAE updates done,
   "density_tokens", "density_tokens_last": int32  tokens behind fired_count / fired_count_last}
`state["groups"]` is keyed by `Group.key`; an SAE is found through its `catalogue.SAE` record
(group key and member row), also inside jit (the record is static) and after an orbax restore.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from monojax import errors, sharding
from monojax.sae import metrics as metrics_lib, recipes, resample as resample_lib, sparse
from monojax.sae.catalogue import (SAE, Group, SAESpec, groups_from_config, make_groups,  # noqa: F401
                                   parse_specs)

F32 = jnp.float32
METRIC_NAMES = ("loss", "mse", "fvu", "l0", "l1", "recon", "sparsity", "aux_k", "grad_norm", "lr", "l1_coef",
                "dead_frac")


# ------------------------------------------------------------------------------------------- init

def init_state(sae_cfg, d_in: int, key, sample_acts, total_steps: int) -> dict:
  """Fresh state for every SAE in sae_cfg.saes. sample_acts [N, d_in] (any float dtype) sets the
  2023/topk pre-encoder bias (geometric median, §3.1) and the input scale (§4.2). Member i of the
  spec list is drawn by numpy from (key data, i), so a member's init does not depend on its group."""
  if int(total_steps) <= 0:
    raise errors.ConfigError(f"SAE total_steps must be positive, got {total_steps}")
  groups = tuple(groups_from_config(sae_cfg))
  x = jnp.asarray(sample_acts).astype(F32)
  if x.ndim != 2 or x.shape[1] != d_in:
    raise ValueError(f"sample_acts must be [N, {d_in}], got {x.shape}")
  scale = recipes.input_scale(x)
  needs_median = any(recipes.get(g.recipe).pre_bias for g in groups)
  median = np.asarray(recipes.geometric_median(x)) if needs_median else np.zeros((d_in,), np.float32)
  seed = [int(v) for v in np.asarray(jax.random.key_data(key)).ravel()]
  groups_state = {}
  for g in groups:
    recipe = recipes.get(g.recipe)
    # The median of c·x is c·median(x): scaled recipes get their b_d in the units they train in.
    b_d0 = median * (float(scale) if recipe.scales(sae_cfg) else 1.0)
    members = [recipe.init_params(sae_cfg, np.random.default_rng([*seed, i]), d_in, g.width, b_d0)
               for i in g.members]
    params = {name: jnp.asarray(np.stack([p[name] for p in members])) for name in members[0]}
    groups_state[g.key(sae_cfg)] = {
        "params": params,
        "opt": _opt_init(recipe.name, frozen(sae_cfg), params),
        # Separate buffers (not one zeros array thrice): the update donates the state.
        "last_fired": jnp.zeros((g.size, g.width), jnp.int32),
        "fired_count": jnp.zeros((g.size, g.width), jnp.int32),
        "fired_count_last": jnp.zeros((g.size, g.width), jnp.int32),
    }
  return {"groups": groups_state, "input_scale": scale, "step": jnp.zeros((), jnp.int32),
          "density_tokens": jnp.zeros((), jnp.int32), "density_tokens_last": jnp.zeros((), jnp.int32)}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _opt_init(recipe_name, sae_cfg, params):
  return jax.vmap(recipes.get(recipe_name).optimizer(sae_cfg).init)(params)


def frozen(sae_cfg) -> ml_collections.FrozenConfigDict:
  """A hashable copy of the sae config: a static jit argument, so equal configs share programs."""
  return sae_cfg if isinstance(sae_cfg, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(sae_cfg)


# ----------------------------------------------------------------------------------------- update

def dead_mask(sae_cfg, total_steps: int, step, last_fired):
  """True where a feature has not fired in the last dead_window·T updates (§3.5 step 1)."""
  return (step - last_fired) >= recipes.window_steps(sae_cfg.dead_window, total_steps)


def update(sae_cfg, groups_static, total_steps, state, acts, key):
  """One optimizer step for every SAE on acts [B, d_in] (cast to fp32). Pure; jit it with
  `functools.partial(update, sae_cfg, groups, total_steps)` and donate the state (or use
  `make_update_fn`). `key` is accepted for recipes with noise; the three here are deterministic.
  Returns (state, metrics): each metric an fp32 array [n_saes] in spec order (METRIC_NAMES; mse,
  fvu, l0, l1 in the original activation units and reported feature activations)."""
  del key
  x = jnp.asarray(acts).astype(F32)
  step = state["step"]
  # int32 firing counts: a window may hold at most 2^31 - 1 tokens.
  window = min(recipes.window_steps(sae_cfg.density_window, total_steps), (2**31 - 1) // x.shape[0])
  new_window = (step > 0) & (step % window == 0)
  new_groups, per_group = {}, []
  for g in groups_static:
    gkey = g.key(sae_cfg)
    if gkey not in state["groups"]:
      raise KeyError(f"SAE group {gkey!r} is not in the state (have {sorted(state['groups'])}); "
                     "was the state made from a different sae.saes?")
    group_state = state["groups"][gkey]
    new_groups[gkey], values = _update_group(sae_cfg, g, total_steps, group_state, x, state["input_scale"], step,
                                             new_window)
    per_group.append((g.members, values))
  order = np.argsort(np.concatenate([np.asarray(m) for m, _ in per_group]))
  metrics = {name: jnp.concatenate([v[name] for _, v in per_group])[order] for name in METRIC_NAMES}
  tokens = jnp.int32(x.shape[0])
  new_state = dict(
      state, groups=new_groups, step=step + 1,
      density_tokens=jnp.where(new_window, 0, state["density_tokens"]) + tokens,
      density_tokens_last=jnp.where(new_window, state["density_tokens"], state["density_tokens_last"]))
  return new_state, metrics


def _update_group(sae_cfg, g: Group, total_steps, group_state, x, input_scale, step, new_window):
  recipe = recipes.get(g.recipe)
  scale = input_scale if recipe.scales(sae_cfg) else jnp.ones((), F32)
  x_in = x * scale
  tx = recipe.optimizer(sae_cfg)
  lr = recipe.lr(sae_cfg, step, total_steps)
  l1_coefs = jnp.asarray(g.l1s, F32) * recipe.l1_factor(sae_cfg, step, total_steps)
  dead_before = dead_mask(sae_cfg, total_steps, step, group_state["last_fired"])  # AuxK's dead latents
  if sparse.wanted(sae_cfg, recipe):  # exact, work ∝ active features (CPU kernels, sae/sparse)
    loss_and_grad = functools.partial(sparse.value_and_grad, recipe, sae_cfg,
                                      screen_bf16=sparse.screen_wanted(sae_cfg))
  else:
    loss_and_grad = jax.value_and_grad(functools.partial(recipe.loss, sae_cfg), argnums=0, has_aux=True)

  def member(params, opt, l1_coef, dead):
    (loss, aux), grads = loss_and_grad(params, x_in, l1_coef, dead)
    grad_norm = optax.tree.norm(grads)
    grads = recipe.constrain_grads(params, grads)
    updates, opt = tx.update(grads, opt, params)
    new_params = recipe.constrain_params(jax.tree.map(lambda p, u: p - lr * u, params, updates))
    f, x_hat, factor = aux["f"], aux["x_hat"], recipe.reported_factor(params, scale)
    values = metrics_lib.batch_metrics(x, x_hat / scale, f * factor)
    if "fired_count" in aux:  # the sparse update counted firings: no pass over f [B, m] (factor > 0)
      fired_sum = aux["fired_count"]
      values.update(l0=fired_sum.sum(dtype=F32) / x.shape[0], l1=(aux["f_colsum"] * factor).sum() / x.shape[0])
    else:
      fired_sum = (f > 0).sum(0, dtype=jnp.int32)
    values.update(loss=loss, recon=aux["recon"], sparsity=aux["sparsity"], aux_k=aux["aux_k"], grad_norm=grad_norm)
    return new_params, opt, fired_sum > 0, fired_sum, values

  params, opt, fired_any, fired_sum, values = jax.vmap(member)(group_state["params"], group_state["opt"], l1_coefs,
                                                               dead_before)
  last_fired = jnp.where(fired_any, step + 1, group_state["last_fired"])
  fired_count = group_state["fired_count"]
  new_group = {
      "params": params, "opt": opt, "last_fired": last_fired,
      "fired_count": jnp.where(new_window, 0, fired_count) + fired_sum,
      "fired_count_last": jnp.where(new_window, fired_count, group_state["fired_count_last"]),
  }
  values.update(lr=jnp.broadcast_to(lr, (g.size,)), l1_coef=l1_coefs,
                dead_frac=dead_mask(sae_cfg, total_steps, step + 1, last_fired).mean(-1, dtype=F32))
  return new_group, {k: jnp.asarray(v, F32) for k, v in values.items()}


_update_donating = jax.jit(update, static_argnums=(0, 1, 2), donate_argnums=(3,))
_update_keeping = jax.jit(update, static_argnums=(0, 1, 2))


def make_update_fn(sae_cfg, groups, total_steps: int, *, donate: bool = True):
  """(state, acts, key) -> (state, metrics): `update` jitted with the config, groups and run length
  static (equal configs share one compiled program) and the state donated. Shardings follow the
  inputs: device_put the state with `shardings(state, mesh)` and the batch on "data"."""
  fn = _update_donating if donate else _update_keeping
  return functools.partial(fn, frozen(sae_cfg), tuple(groups), int(total_steps))


# ------------------------------------------------------------------------------------- resampling

def resample_steps(sae_cfg, total_steps: int) -> list[int]:
  """Values of state["step"] after which the loop calls maybe_resample: resample_at fractions of
  the run (§3.5: 25k/50k/75k/100k of 1M), strictly inside it; [] when no SAE is a 2023 one."""
  if not any(recipes.get(s.recipe).resamples for s in parse_specs(sae_cfg.saes)):
    return []
  steps = {round(float(f) * int(total_steps)) for f in sae_cfg.resample_at}
  return sorted(s for s in steps if 0 < s < int(total_steps))


def maybe_resample(sae_cfg, groups_static, state, sample_acts, key, total_steps):
  """Resamples the dead features of every 2023 SAE (§3.5; details in resample.py); other groups
  and every entry of live features are left bit-for-bit unchanged. sample_acts [N, d_in]: the loss
  sample (the first resample_inputs rows are used). Jittable. Returns (state, info) with info
  {"dead", "resampled"}: int32 [n_saes] (0 for SAEs of other recipes)."""
  xs = jnp.asarray(sample_acts).astype(F32)[: int(sae_cfg.resample_inputs)]
  step = state["step"]
  new_groups = dict(state["groups"])
  per_group = []
  for g in groups_static:
    gkey = g.key(sae_cfg)
    recipe = recipes.get(g.recipe)
    if not recipe.resamples:
      per_group.append((g.members, jnp.zeros((g.size,), jnp.int32), jnp.zeros((g.size,), jnp.int32)))
      continue
    group_state = state["groups"][gkey]
    dead = dead_mask(sae_cfg, total_steps, step, group_state["last_fired"])
    xs_g = xs * state["input_scale"] if recipe.scales(sae_cfg) else xs  # the units the group trains in
    new_groups[gkey], n_resampled = resample_lib.resample_group(
        recipe, sae_cfg, group_state, dead, xs_g, step, jax.random.fold_in(key, g.index))
    per_group.append((g.members, dead.sum(-1, dtype=jnp.int32), n_resampled))
  order = np.argsort(np.concatenate([np.asarray(m) for m, _, _ in per_group]))
  info = {"dead": jnp.concatenate([d for _, d, _ in per_group])[order],
          "resampled": jnp.concatenate([r for _, _, r in per_group])[order]}
  return dict(state, groups=new_groups), info


_resample_donating = jax.jit(maybe_resample, static_argnums=(0, 1, 5), donate_argnums=(2,))


def make_resample_fn(sae_cfg, groups, total_steps: int):
  """(state, sample_acts, key) -> (state, info): `maybe_resample` jitted, the state donated."""
  fn = functools.partial(_resample_donating, frozen(sae_cfg), tuple(groups))
  return lambda state, sample_acts, key: fn(state, sample_acts, key, int(total_steps))


# --------------------------------------------------------------------------- analysis entry points

def member_params(state, sae: SAE) -> dict:
  """One SAE's unstacked parameters {W_e, b_e, W_d, b_d}."""
  group = state["groups"].get(sae.group)
  if group is None:
    raise KeyError(f"{sae.name}: its group {sae.group!r} is not in this state (have {sorted(state['groups'])})")
  return jax.tree.map(lambda a: a[sae.member], group["params"])


def _encode_parts(state, sae: SAE, acts):
  recipe = recipes.get(sae.recipe)
  params = member_params(state, sae)
  scale = state["input_scale"] if sae.scaled else jnp.ones((), F32)
  _, f, x_hat = recipe.forward(params, jnp.asarray(acts).astype(F32) * scale, sae.k)
  return recipe, params, scale, f, x_hat


def encode(state, sae: SAE, acts):
  """Feature activations [B, m] as the recipe reports them, in the original input units (2023:
  f_i; 2024: f_i·‖W_d,i‖ with the input scale folded back in, §4.2), so that
  reconstruct = encode @ decoder_directions + bias."""
  recipe, params, scale, f, _ = _encode_parts(state, sae, acts)
  return f * recipe.reported_factor(params, scale)


def reconstruct(state, sae: SAE, acts):
  """x̂ [B, d_in] in the ORIGINAL activation scale (what is spliced into the LM)."""
  _, _, scale, _, x_hat = _encode_parts(state, sae, acts)
  return x_hat / scale


def decoder_directions(state, sae: SAE):
  """[m, d_in] unit dictionary vectors (the paper's decoder columns)."""
  return recipes.unit_rows(member_params(state, sae)["W_d"])


def density(state, sae: SAE):
  """(fire_counts int32[m], n_tokens) over the last complete density window, or over the current
  one while no window has completed yet. Feed to metrics.density_stats / density_histogram."""
  group_state = state["groups"][sae.group]
  if int(state["density_tokens_last"]) > 0:
    return group_state["fired_count_last"][sae.member], int(state["density_tokens_last"])
  return group_state["fired_count"][sae.member], int(state["density_tokens"])


# ---------------------------------------------------------------------------------------- sharding

# Logical axes by leaf name (Adam moments are named like their parameters): the feature axis m on
# "feat" (mesh "model"), the member axis S and d_in replicated.
_AXES = {
    "W_e": (None, None, "feat"), "b_e": (None, "feat"), "W_d": (None, "feat", None), "b_d": (None, None),
    "last_fired": (None, "feat"), "fired_count": (None, "feat"), "fired_count_last": (None, "feat"),
}


def shardings(state, mesh):
  """NamedShardings matching `state`; anything not in the table (counters, scalars) replicated."""
  def one(path, x):
    axes = _AXES.get(sharding.leaf_name(path))
    if axes is None or len(axes) != np.ndim(x):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, sharding.logical_to_spec(axes, np.shape(x), mesh))
  return jax.tree_util.tree_map_with_path(one, state)
