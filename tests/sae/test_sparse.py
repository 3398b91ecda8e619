"""The sparse SAE update (monojax/sae/sparse): equal to the dense reference for the 2023 and 2024
recipes on heavy-tailed rows and on densely firing SAEs (kernel and dense-formula branches), inside
core.update (vmapped members, 3 steps), on an 8-device mesh, and the dense fallback when the
kernels cannot be built."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from monojax.sae import core, recipes, sae_config, sparse
from monojax.kernels import build
from monojax.sae.sparse import update as sparse_update

D, M, B, T = 37, 302, 204, 100  # no multiple of a SIMD width (B, M divide the 4x2 test mesh)
HEAVY = (0, 57, 203)            # rows with most features active


@pytest.fixture(scope="module")
def kernels():
  if not sparse.available():
    pytest.skip("sparse SAE kernels unavailable (no C++ compiler?)")


def acts(seed=0, n=B):
  """Non-negative activations; the HEAVY rows are large and all-positive."""
  rng = np.random.RandomState(seed)
  x = np.maximum(rng.randn(n, D), 0.0)
  x[[r for r in HEAVY if r < n]] = 4.0 + rng.rand(len(HEAVY), D)
  return x.astype(np.float32)


def params(seed=0, target_l0=20.0):
  """One SAE whose ordinary rows fire ~target_l0 features: each b_e_i is minus the quantile of
  feature i's pre-activation on ordinary rows; W_e leans positive, so the heavy rows fire most."""
  rng = np.random.RandomState(seed)
  W_e = 0.3 * rng.randn(D, M) + 0.08
  x = np.delete(acts(seed + 100, 1000), HEAVY, axis=0)
  b_e = -np.quantile(x @ W_e, 1.0 - target_l0 / M, axis=0)
  W_d = rng.randn(M, D) * (0.05 + rng.rand(M, 1))  # uneven decoder norms (2024's L1 weights them)
  return {"W_e": W_e.astype(np.float32), "b_e": b_e.astype(np.float32), "W_d": W_d.astype(np.float32),
          "b_d": (0.1 * rng.randn(D)).astype(np.float32)}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# (state, MAX_DENSITY): the heavy-tailed state takes the kernel; a state with b_e = 0 fires about
# half of all features and takes the dense formulas; each is also forced down the other branch.
CASES = [("sparse", None), ("sparse", -1.0), ("dense", None), ("dense", 1.0)]


@pytest.mark.parametrize("name", ["2023", "2024"])
@pytest.mark.parametrize("state,max_density", CASES)
def test_matches_dense_value_and_grad(kernels, monkeypatch, name, state, max_density):
  if max_density is not None:
    monkeypatch.setattr(sparse_update, "MAX_DENSITY", max_density)
  rec, cfg, dead = recipes.get(name), sae_config(), jnp.zeros(M, bool)
  lam = {"2023": 0.004, "2024": 5.0}[name]
  dense = jax.value_and_grad(lambda p, x, l: rec.loss(cfg, p, x, l, dead), has_aux=True)
  ours = lambda p, x, l: sparse.value_and_grad(rec, cfg, p, x, l, dead)  # noqa: E731
  # Two stacked members with their own λ, vmapped as core does (x shared).
  ps = jax.tree.map(lambda a, b: np.stack([a, b]), params(0), params(1))
  if state == "dense":
    ps["b_e"] = np.zeros_like(ps["b_e"])
  lams = jnp.asarray([lam, 2 * lam], jnp.float32)
  x = acts(1)
  run = lambda fn: jax.jit(jax.vmap(fn, in_axes=(0, None, 0)))(ps, x, lams)  # noqa: E731
  (l_d, a_d), g_d = run(dense)
  (l_s, a_s), g_s = run(ours)
  l0 = np.asarray((a_d["f"] > 0).sum(-1))
  if state == "sparse":  # the state is what we meant
    assert np.median(l0) < 40 and l0[:, list(HEAVY)].min() > 0.6 * M and l0.mean() < 0.1 * M
  else:
    assert l0.mean() > 0.3 * M
  for k in g_d:
    assert rel_err(g_s[k], g_d[k]) <= 1e-5, (k, rel_err(g_s[k], g_d[k]))
  np.testing.assert_allclose(l_s, l_d, rtol=1e-5)
  for k in ("recon", "sparsity", "aux_k"):
    np.testing.assert_allclose(a_s[k], a_d[k], rtol=1e-5, atol=1e-12)
  np.testing.assert_array_equal(a_s["f"], a_d["f"])
  np.testing.assert_array_equal(a_s["fired_count"], (a_d["f"] > 0).sum(1))
  assert rel_err(a_s["f_colsum"], a_d["f"].sum(1)) <= 1e-5
  assert rel_err(a_s["x_hat"], a_d["x_hat"]) <= 1e-5


def _core_setup(mode):
  c = sae_config()
  c.saes = f"{M}:0.004:2023,{M}:0.01:2023,{M}::2024"
  c.lr = c.lr_2024 = 1e-3
  c.sparse_update = mode
  groups = tuple(core.groups_from_config(c))
  state = core.init_state(c, D, jax.random.key(0), acts(2, 512), T)
  # Swap in the heavy-tailed parameters (the fresh init fires half of all features).
  for gi, (gkey, g) in enumerate(state["groups"].items()):
    scale = state["input_scale"] if gkey.split("_")[1] == "2024" else 1.0
    ps = [params(10 * gi + j) for j in range(len(g["params"]["W_e"]))]
    g["params"] = {k: jnp.asarray(np.stack([p[k] for p in ps])) for k in ps[0]}
    g["params"]["W_e"] = g["params"]["W_e"] / scale  # same pre-activations on the scaled input
  return c, groups, state


def _jaxpr(mode) -> str:
  """core.update traced afresh (jit caches the sparse/dense choice per config)."""
  c, groups, state = _core_setup(mode)
  return str(jax.make_jaxpr(functools.partial(core.update, c, groups, T))(state, acts(), jax.random.key(0)))


def _train(mode, n=3, mesh=None):
  c, groups, state = _core_setup(mode)
  step = core.make_update_fn(c, groups, T, donate=False)
  if mesh is not None:
    state = jax.device_put(state, core.shardings(state, mesh))
  ms = []
  for i in range(n):
    x = acts(3 + i)
    if mesh is not None:
      x = jax.device_put(x, NamedSharding(mesh, P("data")))
    state, m = step(state, x, jax.random.key(i))
    ms.append(m)
  return jax.device_get((state, ms))


def _assert_states_close(a, b):
  (sa, ma), (sb, mb) = a, b
  for k in ("loss", "mse", "fvu", "l0", "l1", "recon", "sparsity", "grad_norm"):
    np.testing.assert_allclose([m[k] for m in ma], [m[k] for m in mb], rtol=2e-5, err_msg=k)
  for gkey in sb["groups"]:
    ga, gb = sa["groups"][gkey], sb["groups"][gkey]
    for k in ("last_fired", "fired_count"):
      np.testing.assert_array_equal(ga[k], gb[k])
    for k in gb["params"]:
      # 3 Adam steps of lr 1e-3 from equal params. Adam divides by |grad|, so where a gradient is
      # rounding-sized its step may differ by O(lr): all entries within 0.2 lr (a different
      # algorithm moves many by ~lr), and all but a handful equal to rounding.
      a, b = ga["params"][k], gb["params"][k]
      np.testing.assert_allclose(a, b, rtol=0, atol=2e-4, err_msg=f"{gkey} {k}")
      assert (np.abs(a - b) > 1e-6 + 1e-5 * np.abs(b)).mean() < 1e-3, (gkey, k)


@pytest.fixture(scope="module")
def dense_run():
  return _train("off")


def test_core_update_sparse_equals_dense(kernels, dense_run):
  assert "ffi_call" in _jaxpr("auto") and "ffi_call" not in _jaxpr("off")
  _assert_states_close(_train("on"), dense_run)
  l0 = np.array([m["l0"] for m in dense_run[1]])
  assert (l0 > 15).all() and (l0 < sparse_update.MAX_DENSITY * M).all()  # the kernel branch ran


def test_sharded_core_update(kernels, dense_run):
  """State sharded on features over "model", batch on "data", 8 CPU devices."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  assert core.shardings(_core_setup("on")[2], mesh)["groups"][f"g0_2023_w{M}_s0_1"]["params"]["W_e"].spec[-1] == "model"
  _assert_states_close(_train("on", mesh=mesh), dense_run)


def test_fallback_without_kernels(monkeypatch):
  # No compiler: available() says False with one warning, and nothing is built.
  warnings = []
  monkeypatch.setattr(build, "_compiler", lambda: None)
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  assert build.available.__wrapped__() is False and len(warnings) == 1
  # Kernels unavailable: "auto" traces and trains densely, "on" refuses clearly.
  monkeypatch.setattr(build, "available", lambda: False)
  assert "ffi_call" not in _jaxpr("auto")
  with pytest.raises(RuntimeError, match="sparse_update='on'"):
    _jaxpr("on")
  _, ms = _train("auto", n=2)
  assert all(np.isfinite(m["loss"]).all() for m in ms) and (ms[1]["loss"] < ms[0]["loss"]).any()
