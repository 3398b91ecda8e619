"""The sparse SAE update (monojax/sae/sparse): equal to the dense reference for the 2023 and 2024
recipes on heavy-tailed rows and on densely firing SAEs (kernel and dense-formula branches), inside
core.update (vmapped members, 3 steps), on an 8-device mesh, and the dense fallback when the
kernels cannot be built. NaN/inf in x, W_e, b_e, W_d: the same outputs NaN (and ±inf) as the dense
reference, elementwise, on both branches and through core.update. The kernel tests run again in a
subprocess on a build without AVX-512 (MONOJAX_KERNEL_FLAGS=-mno-avx512f), so the scalar/AVX2
branch is tested on AVX-512 machines too; MONOJAX_REQUIRE_KERNELS turns a failed build into an error."""

import functools
import os
import platform
import subprocess
import sys

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


def assert_same(a, b, what, tol=1e-5):
  """NaN, +inf and -inf at the same positions of a and b (elementwise); the finite entries of a
  within tol of b's, relative to b's largest finite entry."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
    ta, tb = test(a), test(b)
    assert (ta == tb).all(), (f"{what}: {name} at {int(ta.sum())} vs {int(tb.sum())} entries, differing at "
                              f"{np.argwhere(ta != tb)[:4].tolist()}")
  fin = np.isfinite(b)
  if fin.any():
    assert rel_err(a[fin], b[fin]) <= tol, (what, rel_err(a[fin], b[fin]))


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


# Non-finite inputs: case -> edits (array, index, value). x rows 5 and 7 are ordinary rows, 57 a
# heavy one; W_e's entry (4, 10) makes feature 10's column non-finite; W_d's row 3 (member 1).
# "W_e_inf_all_rows": x[:, 4] > 0, so feature 10 is +inf on every row and ∂L/∂x̂ is ±inf with no
# NaN (where f·inf stays ±inf but 0·inf is NaN).
NONFINITE = {
    "x_nan": [("x", (5, 3), np.nan)],
    "x_heavy_nan": [("x", (57, 0), np.nan)],
    "x_inf": [("x", (7, 2), np.inf)],
    "x_neg_inf": [("x", (7, 2), -np.inf)],
    "W_e_nan": [("W_e", (0, 4, 10), np.nan)],
    "W_e_inf": [("W_e", (1, 4, 10), np.inf)],
    "W_e_inf_all_rows": [("x", (slice(None), 4), 1.0), ("W_e", (1, 4, 10), np.inf)],
    "b_e_nan": [("b_e", (0, 10), np.nan)],
    "W_d_nan": [("W_d", (1, 3, 0), np.nan)],
}


@pytest.mark.parametrize("name", ["2023", "2024"])
@pytest.mark.parametrize("max_density,screen", [(1.0, False), (-1.0, False), (1.0, True)],
                         ids=["kernel", "dense_formulas", "kernel_bf16_screen"])
def test_nonfinite_inputs_match_dense(kernels, monkeypatch, name, max_density, screen):
  """A NaN or inf in x, W_e, b_e or W_d: every output of sparse.value_and_grad (loss, recon,
  sparsity, x̂, f, fired counts, column sums, each gradient) is NaN, +inf, -inf exactly where
  autodiff of recipe.loss's is, and equal elsewhere; on the kernel branch (MAX_DENSITY 1: always)
  and on the dense-formula branch (MAX_DENSITY -1: never the kernel)."""
  monkeypatch.setattr(sparse_update, "MAX_DENSITY", max_density)
  rec, cfg, dead = recipes.get(name), sae_config(), jnp.zeros(M, bool)
  lam = {"2023": 0.004, "2024": 5.0}[name]
  run = lambda fn: jax.jit(jax.vmap(fn, in_axes=(0, None, 0)))  # noqa: E731
  dense = run(jax.value_and_grad(lambda p, x, l: rec.loss(cfg, p, x, l, dead), has_aux=True))
  ours = run(lambda p, x, l: sparse.value_and_grad(rec, cfg, p, x, l, dead, screen_bf16=screen))
  lams = jnp.asarray([lam, 2 * lam], jnp.float32)
  failures = []
  for case, edits in NONFINITE.items():
    ps = jax.tree.map(lambda a, b: np.stack([a, b]), params(0), params(1))
    x = acts(1)
    for where, index, value in edits:
      (x if where == "x" else ps[where])[index] = value
    (l_d, a_d), g_d = dense(ps, x, lams)
    (l_s, a_s), g_s = ours(ps, x, lams)
    assert not np.isfinite(l_d).all(), case  # the case is what we meant: the dense loss shows it
    try:
      assert_same(l_s, l_d, f"{case} loss")
      for k in ("recon", "sparsity", "aux_k", "x_hat", "f"):
        assert_same(a_s[k], a_d[k], f"{case} {k}")
      for k in g_d:
        assert_same(g_s[k], g_d[k], f"{case} grad {k}")
      # Fired means f > 0, as core's dense path counts it: a NaN activation did not fire.
      fired = (np.asarray(a_d["f"]) > 0).sum(1)
      assert (np.asarray(a_s["fired_count"]) == fired).all(), f"{case} fired_count"
      assert_same(a_s["f_colsum"], np.asarray(a_d["f"]).sum(1), f"{case} f_colsum")
    except AssertionError as e:
      failures.append(str(e).splitlines()[0])
  assert not failures, "\n".join(failures)


def _core_setup(mode, screen="off"):
  c = sae_config()
  c.saes = f"{M}:0.004:2023,{M}:0.01:2023,{M}::2024"
  c.normalize_inputs = False  # the 2023 members on raw activations: the heavy-tailed params below are built for them
  c.lr = c.lr_2024 = 1e-3
  c.sparse_update = mode
  c.screen_bf16 = screen
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


def _train(mode, n=3, mesh=None, edit=None, screen="off"):
  """n steps of core.update; edit(i, x, state) may change step i's batch and state in place."""
  c, groups, state = _core_setup(mode, screen)
  step = core.make_update_fn(c, groups, T, donate=False)
  if mesh is not None:
    state = jax.device_put(state, core.shardings(state, mesh))
  ms = []
  for i in range(n):
    x = acts(3 + i)
    if edit is not None:
      state = jax.tree.map(np.array, state)
      edit(i, x, state)
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


def _edit_x(value):
  def edit(i, x, state):
    if i == 1:
      x[5, 3] = value
  return edit


def _edit_w_e_nan(i, x, state):
  if i == 0:
    state["groups"][f"g0_2023_w{M}_s0_1"]["params"]["W_e"][0, 4, 10] = np.nan


@pytest.mark.parametrize("edit", [_edit_x(np.nan), _edit_x(np.inf), _edit_w_e_nan], ids=["x_nan", "x_inf", "W_e_nan"])
def test_core_update_nonfinite_sparse_equals_dense(kernels, edit):
  """3 steps of core.update, sparse_update on vs off, with a NaN or inf entering at a step: every
  metric and parameter is NaN (±inf) at the same places, firing statistics are equal (a NaN
  activation did not fire), the rest as close as test_core_update_sparse_equals_dense's."""
  (sa, ma), (sb, mb) = _train("on", edit=edit), _train("off", edit=edit)
  assert any(not np.isfinite(m["loss"]).all() for m in mb)  # the case is what we meant
  for i, (x, y) in enumerate(zip(ma, mb)):
    for k in y:
      assert_same(x[k], y[k], f"step {i} metric {k}", tol=2e-5)
  for gkey in sb["groups"]:
    ga, gb = sa["groups"][gkey], sb["groups"][gkey]
    for k in ("last_fired", "fired_count"):
      np.testing.assert_array_equal(ga[k], gb[k], err_msg=f"{gkey} {k}")
    for k in gb["params"]:
      a, b = np.asarray(ga["params"][k]), np.asarray(gb["params"][k])
      assert (np.isnan(a) == np.isnan(b)).all(), (gkey, k, int(np.isnan(a).sum()), int(np.isnan(b).sum()))
      fin = np.isfinite(b)
      np.testing.assert_allclose(a[fin], b[fin], rtol=0, atol=2e-4, err_msg=f"{gkey} {k}")


def test_fallback_without_kernels(monkeypatch):
  # No compiler: available() says False with one warning, and nothing is built.
  monkeypatch.delenv("MONOJAX_REQUIRE_KERNELS", raising=False)  # CI sets it; this is the fallback
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


def test_required_kernels_fail_loudly(monkeypatch):
  """MONOJAX_REQUIRE_KERNELS=1: no compiler (or a failed build) raises instead of falling back."""
  monkeypatch.setattr(build, "_compiler", lambda: None)
  monkeypatch.setattr(build, "_REQUIRED_FAILURE", None)
  monkeypatch.setenv("MONOJAX_REQUIRE_KERNELS", "1")
  with pytest.raises(RuntimeError, match="MONOJAX_REQUIRE_KERNELS"):
    build.available.__wrapped__()
  monkeypatch.setenv("MONOJAX_REQUIRE_KERNELS", "0")
  monkeypatch.setattr(build, "_REQUIRED_FAILURE", None)
  monkeypatch.setattr(logging, "warning", lambda msg, *a: None)
  assert build.available.__wrapped__() is False


def test_variant_flags_have_their_own_cache_entry(monkeypatch):
  monkeypatch.delenv("MONOJAX_KERNEL_FLAGS", raising=False)
  native = build.library_path("g++")
  monkeypatch.setenv("MONOJAX_KERNEL_FLAGS", "-mno-avx512f")
  assert build.flags()[-1] == "-mno-avx512f" and build.library_path("g++") != native


# The kernel-level tests above, again in a subprocess on the variant build (core.update calls the
# same kernel: its tests are left to the main run).
KERNEL_TESTS = ("test_matches_dense_value_and_grad or test_nonfinite_inputs_match_dense or test_compiled_isa or "
                "test_bf16_screen")


def test_compiled_isa(kernels):
  """Which branch the loaded library has: without MONOJAX_KERNEL_FLAGS the kernel's AVX-512 code
  exactly when this CPU has AVX-512 (-march=native); with -mno-avx512f never."""
  isa = build.compiled_isa()[build.SAE_TARGET]
  if "-mno-avx512f" in build.extra_flags():
    assert "avx512f" not in isa
  elif not build.extra_flags():
    assert ("avx512f" in isa) == ("avx512f" in build._cpu_flags().split())


@pytest.mark.skipif(bool(os.environ.get("MONOJAX_KERNEL_FLAGS")), reason="already the variant")
@pytest.mark.skipif("avx512f" not in build._cpu_flags().split(),
                    reason="this CPU has no AVX-512: the default build already is the scalar/AVX2 variant")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 flag")
def test_kernel_tests_without_avx512(kernels):
  """The kernel tests again on a build with -mno-avx512f (its own cache entry; the scalar and AVX2
  code, which an AVX-512 machine otherwise never runs), in a subprocess: the FFI targets are
  registered once per process. The variant must build (MONOJAX_REQUIRE_KERNELS=1)."""
  env = dict(os.environ, MONOJAX_KERNEL_FLAGS="-mno-avx512f", MONOJAX_REQUIRE_KERNELS="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                         KERNEL_TESTS], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-1000:]


# ------------------------------------------------------------------------------------------------
# The bf16 screen (sae.screen_bf16): the encoder GEMM in bf16, every entry within the provable
# margin of 0 (and every kept one) recomputed in f32. bf16 dots run on any CPU, only their speed
# differs, so these run everywhere.


@pytest.mark.parametrize("name", ["2023", "2024"])
@pytest.mark.parametrize("max_density", [1.0, -1.0], ids=["kernel", "dense_formulas"])
def test_bf16_screen_matches_the_f32_path(kernels, monkeypatch, name, max_density):
  """The same features fire, with the same f, and every gradient equals the f32 sparse path's to
  1e-6 relative (the dense reference's to 1e-5, as the f32 path)."""
  monkeypatch.setattr(sparse_update, "MAX_DENSITY", max_density)
  rec, cfg, dead = recipes.get(name), sae_config(), jnp.zeros(M, bool)
  lam = {"2023": 0.004, "2024": 5.0}[name]
  ps = jax.tree.map(lambda a, b: np.stack([a, b]), params(0), params(1))
  lams, x = jnp.asarray([lam, 2 * lam], jnp.float32), acts(1)
  out = {}
  for screen in (False, True):
    fn = functools.partial(sparse.value_and_grad, rec, cfg, dead=dead, screen_bf16=screen)
    out[screen] = jax.jit(jax.vmap(lambda p, x, l, fn=fn: fn(p, x, l), in_axes=(0, None, 0)))(ps, x, lams)
  (l_f, a_f), g_f = out[False]
  (l_b, a_b), g_b = out[True]
  np.testing.assert_array_equal(a_b["fired_count"], a_f["fired_count"])
  np.testing.assert_array_equal(a_b["f"], a_f["f"])
  for k in g_f:
    assert rel_err(g_b[k], g_f[k]) <= 1e-6, (k, rel_err(g_b[k], g_f[k]))
  for k in ("recon", "sparsity"):
    np.testing.assert_allclose(a_b[k], a_f[k], rtol=1e-6)
  np.testing.assert_allclose(l_b, l_f, rtol=1e-6)
  assert rel_err(a_b["x_hat"], a_f["x_hat"]) <= 1e-6 and rel_err(a_b["f_colsum"], a_f["f_colsum"]) <= 1e-6


@pytest.mark.parametrize("d,scale", [(D, 1e-30), (512, 1.0), (512, 1e12)])
def test_bf16_screen_margin_bounds_the_error(scale, d):
  """|bf16-input GEMM − f32 GEMM| (both as XLA computes them) ≤ the margin the kernel uses, for
  every entry, at tiny (near the f32 denormals), ordinary and huge magnitudes: the proof's check."""
  rng = np.random.RandomState(d)
  x = (scale * rng.standard_cauchy((256, d))).astype(np.float32)   # heavy tails: large terms dominate
  w = (rng.randn(1, d, 300) * np.exp(rng.randn(1, d, 1))).astype(np.float32)
  b = (scale * rng.randn(1, 300)).astype(np.float32)
  xb = jnp.matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w[0], jnp.bfloat16), preferred_element_type=jnp.float32)
  xf = jnp.matmul(jnp.asarray(x), jnp.asarray(w[0]))
  kxn, wn, bslack = sparse_update.screen_margin(jnp.asarray(x)[None], jnp.asarray(w), jnp.asarray(b))
  margin = np.asarray(kxn[0])[:, None] * np.asarray(wn[0])[None] + np.asarray(bslack[0])[None]
  err = np.abs(np.asarray(xb + b, np.float64) - np.asarray(xf + b, np.float64))
  assert np.isfinite(margin).all() and (err <= margin).all(), float((err / margin).max())
  # and it is not vacuous: about 0.8 % of ‖x_b‖‖W_i‖, the Cauchy–Schwarz bound of |pre|
  norms = np.linalg.norm(x.astype(np.float64), axis=1)[:, None] * np.linalg.norm(w[0].astype(np.float64), axis=0)
  assert (margin <= 0.01 * norms + np.asarray(bslack[0])[None]).all()


def test_bf16_screen_recomputes_few_entries(kernels):
  """On the heavy-tailed SAE (median L0 < 40 of 302) the screen leaves few candidates beside the
  active entries: what makes it cheaper than the f32 GEMM where bf16 is fast."""
  p, x = params(0), acts(1)
  xw = np.asarray(jnp.matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(p["W_e"], jnp.bfloat16),
                             preferred_element_type=jnp.float32))
  kxn, wn, bslack = (np.asarray(a[0]) for a in sparse_update.screen_margin(
      jnp.asarray(x)[None], jnp.asarray(p["W_e"])[None], jnp.asarray(p["b_e"])[None]))
  ordinary = np.delete(np.arange(B), HEAVY)
  cand = (xw + p["b_e"] > -(kxn[:, None] * wn[None] + bslack[None]))[ordinary]
  active = (x @ p["W_e"] + p["b_e"] > 0)[ordinary]
  assert (cand >= active).all()  # every active entry is a candidate
  assert cand.sum() < 2.0 * active.sum(), (cand.sum(), active.sum())


def test_bf16_screen_is_chosen_by_the_cpu(monkeypatch):
  from monojax import cpu_env
  cfg = sae_config()
  for has, want in ((True, True), (False, False)):
    monkeypatch.setattr(cpu_env, "has_bf16_matrix_units", lambda has=has: has)
    cfg.screen_bf16 = "auto"
    assert sparse.screen_wanted(cfg) is want
  cfg.screen_bf16 = "on"
  assert sparse.screen_wanted(cfg) is True
  cfg.screen_bf16 = "off"
  assert sparse.screen_wanted(cfg) is False


def test_core_update_with_the_bf16_screen_equals_dense(kernels, dense_run):
  _assert_states_close(_train("on", screen="on"), dense_run)
