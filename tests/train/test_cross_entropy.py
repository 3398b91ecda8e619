"""The CPU cross-entropy kernel (train/cross_entropy.py + kernels/cross_entropy.cc) against a naive
numpy reference and against autodiff of the pure-JAX loss, and its selection (train.ce_kernel).
Non-finite logits (NaN, ±inf, in real and padding columns, in the vector body and the scalar tail
of a row) and NaN/inf in h and W_U: every output NaN (±inf) exactly where the pure-JAX path's is.
The kernel tests run again in a subprocess on a build without AVX-512 (MONOJAX_KERNEL_FLAGS)."""
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monojax import sharding
from monojax.kernels import build
from monojax.train import cross_entropy as ce_lib, state as st, step as sp
from test_model_step import V, _tokens, tiny_cfg  # V = 250: tokens < V, model vocabulary 256

pytestmark = pytest.mark.skipif(not build.available(), reason="CPU kernels unavailable (no C++ compiler?)")


def _naive(h, w, t, nv):
  logits = (h.reshape(-1, h.shape[-1]).astype(np.float64) @ w.astype(np.float64))[:, :nv]
  m = logits.max(1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
  rows = np.arange(len(logits))
  return -logp[rows, t.reshape(-1)].sum(), int((logits.argmax(1) == t.reshape(-1)).sum())


def _data(B=3, T=20, d=8, V=40, nv=37, seed=1):
  rng = np.random.RandomState(seed)
  h = rng.randn(B, T, d).astype(np.float32)
  w = (2.0 * rng.randn(d, V)).astype(np.float32)
  t = rng.randint(0, nv, (B, T))
  t[0, :5] = (h[0, :5] @ w)[:, :nv].argmax(1)  # some right predictions, so #correct is tested
  return h, w, t, nv


@pytest.mark.parametrize("chunk", [0, 4, 5, 7])
def test_kernel_matches_naive_reference_and_autodiff(chunk):
  h, w, t, nv = _data()
  ce, correct = jax.jit(lambda h, w: ce_lib.cross_entropy_terms(h, w, jnp.asarray(t), nv, chunk, kernel=True))(h, w)
  ref_ce, ref_correct = _naive(h, w, t, nv)
  np.testing.assert_allclose(float(ce), ref_ce, rtol=1e-5)
  assert int(correct) == ref_correct >= 5

  def grads(kernel):
    f = lambda h, w: ce_lib.cross_entropy_terms(h, w, jnp.asarray(t), nv, chunk, kernel=kernel)[0] * 0.37  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(h), jnp.asarray(w))

  (v_k, (dh_k, dw_k)), (v_j, (dh_j, dw_j)) = grads(True), grads(False)
  np.testing.assert_allclose(float(v_k), float(v_j), rtol=1e-5)
  np.testing.assert_allclose(dh_k, dh_j, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dw_k, dw_j, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(dw_k)[:, nv:] == 0)  # padding columns get no gradient


def test_kernel_softmax_is_stable_for_large_logits():
  """Logits of ±200 (exp would overflow without the max shift) and an exact tie for the argmax,
  through the kernel (the differentiated path; the plain call runs the JAX formulas)."""
  h = np.zeros((1, 2, 2), np.float32)
  h[0, 0] = [1.0, 0.0]
  h[0, 1] = [0.0, 1.0]
  w = np.array([[200.0, 200.0, -200.0, 0.0], [0.0, 5.0, 3.0, 1.0]], np.float32)
  t = jnp.asarray([[1, 1]])
  (ce, correct), _ = jax.value_and_grad(
      lambda w: ce_lib.cross_entropy_terms(jnp.asarray(h), w, t, 4, 0, kernel=True), has_aux=True)(jnp.asarray(w))
  ref_ce, ref_correct = _naive(h, w, np.asarray(t), 4)
  np.testing.assert_allclose(float(ce), ref_ce, atol=3e-5)  # f32 ulp at 200 is 1.5e-5
  assert int(correct) == ref_correct == 1  # row 0: tie between 0 and 1 -> first index (0), as argmax


def test_bfloat16_gradients_keep_their_dtypes():
  h, w, t, nv = _data()
  f = lambda h, w: ce_lib.cross_entropy_terms(h, w, jnp.asarray(t), nv, 4, kernel=True)[0]  # noqa: E731
  dh, dw = jax.grad(f, argnums=(0, 1))(jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
  assert dh.dtype == dw.dtype == jnp.bfloat16
  dh32, dw32 = jax.grad(f, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(dw, np.float32), dw32, rtol=0.05, atol=0.05)


def _losses(ce_kernel, n=3, chunk=4):
  c = tiny_cfg()
  c.mesh.shape = (1, 1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  sched = st.make_schedule(c.train)
  tx = st.make_optimizer(c.train, sched)
  g, s, sh = st.init_state(c.model, tx, 0, mesh)
  step = sp.make_lm_update(g, tx, sched, vocab_size=V, dtype="float32", loss_chunk=chunk,
                           token_bytes=jnp.ones(V, jnp.int32), ce_kernel=ce_kernel, mesh=mesh)
  f = jax.jit(lambda s, t: step(s, t)[:2], in_shardings=(sh, sharding.batch_sharding(mesh)), donate_argnums=0)
  out = []
  for i in range(n):
    s, m = f(s, _tokens(seed=i))
    out.append((float(m["loss"]), float(m["accuracy"]), float(m["grad_norm"])))
  return np.array(out), jax.device_get(s["params"])


def test_train_steps_with_and_without_kernel_agree():
  (a, pa), (b, pb) = _losses("on"), _losses("off")
  np.testing.assert_allclose(a, b, rtol=2e-5)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):  # Adam turns ~1e-7 gradient noise on
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)       # near-zero-gradient entries into ~1e-6


def assert_same(a, b, what, rtol=1e-5, atol=1e-6):
  """NaN, +inf and -inf at the same positions (elementwise); the finite entries close."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
    ta, tb = test(a), test(b)
    assert (ta == tb).all(), (f"{what}: {name} at {int(ta.sum())} vs {int(tb.sum())} entries, differing at "
                              f"{np.argwhere(ta != tb)[:4].tolist()}")
  fin = np.isfinite(b)
  np.testing.assert_allclose(a[fin], b[fin], rtol=rtol, atol=atol, err_msg=what)


def _jax_rows(logits, t, nv):
  """The pure-JAX path's formulas (`_chunk_terms`) on given logits [M, V]: per-row loss, its
  gradient w.r.t. the logits, and whether argmax == target."""
  V = logits.shape[1]

  def f(lg):
    z = lg + jnp.where(jnp.arange(V) < nv, 0.0, -1e30).astype(jnp.float32)
    row_max = jax.lax.stop_gradient(z.max(axis=-1))
    lse = row_max + jnp.log(jnp.exp(z - row_max[:, None]).sum(-1))
    return lse - jnp.take_along_axis(lg, t[:, None], 1)[:, 0], jnp.argmax(z, axis=-1) == t

  loss, vjp, correct = jax.vjp(f, logits, has_aux=True)
  return loss, vjp(jnp.ones_like(loss))[0], correct


# Rows of [*, 40] logits: {column: value} over random finite logits, and the target. nv = 37: 32
# columns in two 16-wide vectors, a scalar tail 32..36, padding 37..39 (with nv = 40: all real).
NONFINITE_ROWS = [  # (name, {column: value}, target)
    ("finite", {}, 4),
    ("nan_in_vector", {5: np.nan}, 4),
    ("nan_in_tail", {35: np.nan}, 4),
    ("nan_at_target", {20: np.nan}, 20),
    ("first_nan_is_target", {3: np.nan, 30: np.nan}, 3),  # argmax: the first NaN
    ("nan_after_target_max", {30: np.nan, 6: 50.0}, 6),  # the largest finite logit is not argmax
    ("inf", {12: np.inf}, 12),
    ("inf_then_nan", {4: np.inf, 9: np.nan}, 4),          # argmax: the NaN, not the +inf
    ("two_infs", {7: np.inf, 20: np.inf}, 7),
    ("neg_infs", {2: -np.inf, 17: -np.inf, 33: -np.inf}, 4),
    ("neg_inf_target", {11: -np.inf}, 11),                # loss +inf
    ("all_neg_inf", {j: -np.inf for j in range(40)}, 0),
    ("real_neg_inf", {j: -np.inf for j in range(37)}, 0),  # with nv 37 the padding holds the max
    ("nan_col_38", {38: np.nan}, 4),                       # padding when nv = 37
    ("inf_col_39", {39: np.inf}, 4),
    ("neg_inf_col_38", {38: -np.inf}, 4),
    ("huge_col_39", {39: 1e31}, 4),                        # above the real logits even after -1e30
    ("all_nan", {j: np.nan for j in range(40)}, 0),
]


@pytest.mark.parametrize("nv", [37, 40])
def test_kernel_nonfinite_logits_match_jax(nv):
  rng = np.random.RandomState(3)
  logits = (3.0 * rng.randn(len(NONFINITE_ROWS), 40)).astype(np.float32)
  for r, (_, cols, _) in enumerate(NONFINITE_ROWS):
    for j, v in cols.items():
      logits[r, j] = v
  t = jnp.asarray([tgt for _, _, tgt in NONFINITE_ROWS], jnp.int32)
  dl_k, loss_k, corr_k = jax.jit(lambda lg: ce_lib._ffi_cross_entropy(lg, t, nv))(jnp.asarray(logits))
  loss_j, dl_j, corr_j = jax.jit(lambda lg: _jax_rows(lg, t, nv))(jnp.asarray(logits))
  failures = []
  for r in range(len(NONFINITE_ROWS)):
    what = f"row {r} {NONFINITE_ROWS[r][0]}"
    try:
      assert_same(loss_k[r], loss_j[r], f"{what} loss")
      assert_same(dl_k[r], dl_j[r], f"{what} dlogits")
      assert bool(corr_k[r]) == bool(corr_j[r]), f"{what} correct: {bool(corr_k[r])} vs {bool(corr_j[r])}"
    except AssertionError as e:
      failures.append(str(e).splitlines()[0])
  assert not failures, "\n".join(failures)


# One entry of h [3, 20, 8] or W_U [8, 40] (nv 37: columns 37..39 are padding).
NONFINITE_PARAMS = {
    "h_nan": ("h", (1, 3, 2), np.nan),
    "h_inf": ("h", (2, 7, 5), np.inf),
    "h_neg_inf": ("h", (0, 0, 1), -np.inf),
    "w_nan": ("w", (2, 10), np.nan),
    "w_inf": ("w", (5, 10), np.inf),
    "w_neg_inf": ("w", (3, 4), -np.inf),
    "w_pad_nan": ("w", (2, 38), np.nan),
    "w_pad_inf": ("w", (5, 39), np.inf),
}


@pytest.mark.parametrize("chunk", [0, 4])
def test_nonfinite_h_and_w_match_jax(chunk):
  """cross_entropy_terms with a NaN/inf in h or W_U: CE sum, #correct, dh and dW_U NaN (±inf)
  where the pure-JAX path's are, elementwise. Targets are set to the modified column, so a
  non-finite target logit and its gradient are covered."""
  h0, w0, t0, nv = _data()
  t0 = t0.copy()
  t0[:, :3] = 10  # rows whose target is column 10 (w_nan, w_inf)
  t0[0, 3:5] = 4

  def run(kernel):
    f = lambda h, w: ce_lib.cross_entropy_terms(h, w, jnp.asarray(t0), nv, chunk, kernel=kernel)  # noqa: E731
    return jax.jit(jax.value_and_grad(lambda h, w: f(h, w)[0] * 0.37, argnums=(0, 1))), jax.jit(f)

  (vg_k, _), (vg_j, f_j) = run(True), run(False)
  # #correct through the kernel itself (the undifferentiated call runs the JAX formulas)
  correct_k = jax.jit(jax.value_and_grad(lambda h, w: ce_lib.cross_entropy_terms(
      h, w, jnp.asarray(t0), nv, chunk, kernel=True), has_aux=True))
  failures = []
  for case, (where, index, value) in NONFINITE_PARAMS.items():
    h, w = h0.copy(), w0.copy()
    (h if where == "h" else w)[index] = value
    (v_k, (dh_k, dw_k)), (v_j, (dh_j, dw_j)) = vg_k(h, w), vg_j(h, w)
    assert not np.isfinite(v_j), case  # the case is what we meant: the loss shows it
    try:
      assert_same(v_k, v_j, f"{case} loss")
      assert_same(dh_k, dh_j, f"{case} dh")
      assert_same(dw_k, dw_j, f"{case} dW_U")
      (_, c_kk), _ = correct_k(h, w)
      assert int(c_kk) == int(f_j(h, w)[1]), f"{case} #correct: {int(c_kk)} vs {int(f_j(h, w)[1])}"
    except AssertionError as e:
      failures.append(str(e).splitlines()[0])
  assert not failures, "\n".join(failures)


def test_kernel_selection():
  assert ce_lib.use_kernel("auto", 1) and not ce_lib.use_kernel("off", 1)
  assert not ce_lib.use_kernel("auto", 8)  # an 8-device mesh: the pure-JAX (partitioned) loss
  with pytest.raises(RuntimeError, match="ce_kernel='on' runs on a one-device mesh"):
    ce_lib.use_kernel("on", 8)
  with pytest.raises(ValueError, match="train.ce_kernel must be auto"):
    ce_lib.use_kernel("yes", 1)


def test_kernel_hlo_has_one_chunk_of_logits_and_three_gemms_per_chunk():
  B, T, d, Vp = 4, 32, 8, 1024
  t = jnp.zeros((B, T), jnp.int32)
  f = jax.jit(jax.grad(lambda h, w: ce_lib.cross_entropy_terms(h, w, t, Vp - 3, 8, kernel=True)[0], argnums=(0, 1)))
  hlo = f.lower(jnp.ones((B, T, d)), jnp.ones((d, Vp))).compile().as_text()
  assert f"f32[{B * T},{Vp}]" not in hlo and f"f32[{B * 8},{Vp}]" in hlo
  assert build.CE_TARGET in hlo
  assert len([line for line in hlo.splitlines() if " dot(" in line]) == 3


def test_compiled_isa():
  """Without MONOJAX_KERNEL_FLAGS the kernel's AVX-512 code is compiled in exactly when this CPU
  has AVX-512 (-march=native); with -mno-avx512f never."""
  isa = build.compiled_isa()[build.CE_TARGET]
  if "-mno-avx512f" in build.extra_flags():
    assert "avx512f" not in isa
  elif not build.extra_flags():
    assert ("avx512f" in isa) == ("avx512f" in build._cpu_flags().split())


KERNEL_TESTS = ("test_kernel_matches_naive_reference_and_autodiff or test_kernel_softmax_is_stable_for_large_logits or "
                "test_kernel_nonfinite_logits_match_jax or test_nonfinite_h_and_w_match_jax or test_compiled_isa")


@pytest.mark.skipif(bool(os.environ.get("MONOJAX_KERNEL_FLAGS")), reason="already the variant")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 flag")
def test_kernel_tests_without_avx512():
  """The kernel tests again on a build with -mno-avx512f (its own cache entry: the scalar code,
  which an AVX-512 machine otherwise never runs), in a subprocess (the FFI targets are registered
  once per process). The variant must build (MONOJAX_REQUIRE_KERNELS=1)."""
  env = dict(os.environ, MONOJAX_KERNEL_FLAGS="-mno-avx512f", MONOJAX_REQUIRE_KERNELS="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                         KERNEL_TESTS], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-1000:]
