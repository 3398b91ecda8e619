"""The CPU cross-entropy kernel (train/cross_entropy.py + kernels/cross_entropy.cc) against a naive
numpy reference and against autodiff of the pure-JAX loss, and its selection (train.ce_kernel)."""
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
