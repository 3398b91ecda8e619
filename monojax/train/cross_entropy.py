"""The unembedding + next-token cross-entropy, two ways with one contract:

  cross_entropy_terms(h, w_u, targets, vocab_size, chunk, kernel=False) -> (CE sum, #correct)

kernel=False: pure JAX (the reference, and the path on TPU/GPU and on multi-device meshes).
kernel=True (CPU, one device): a custom VJP whose forward pass already computes the gradient. Per
chunk, XLA runs the logits GEMM, one FFI call (monojax/kernels/cross_entropy.cc) turns the logits
into loss, #correct and dlogits = softmax - onehot in place, and XLA runs the two gradient GEMMs;
the backward pass only scales the stored dh [N, d] and dW_U [d, V] by the loss's cotangent (the
loss is a sum, so its cotangent is a scalar). Three GEMMs per chunk and no recomputation, where
autodiff of chunked JAX recomputes the logits (four) and runs max, exp-sum and the softmax gradient
as separate memory passes (measured: BUILD_NOTES.md, "CPU cross-entropy kernel").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from monojax.kernels import build

F32 = jnp.float32


def use_kernel(mode: str, n_devices: int | None = None) -> bool:
  """train.ce_kernel: "auto" (CPU backend, a one-device mesh, kernels built), "on" (required) or
  "off". n_devices: the step's mesh size (default: all devices)."""
  mode = str(mode)
  n_devices = jax.device_count() if n_devices is None else n_devices
  if mode == "off":
    return False
  if mode not in ("auto", "on"):
    raise ValueError(f"train.ce_kernel must be auto | on | off, got {mode!r}")
  problem = ("needs the CPU backend" if jax.default_backend() != "cpu"
             else "runs on a one-device mesh (the FFI call is not partitioned)" if n_devices != 1
             else "needs the CPU kernels (see the warning logged)" if not build.available() else None)
  if problem and mode == "on":
    raise RuntimeError(f"train.ce_kernel='on' {problem}; set it to 'auto' or 'off'")
  return problem is None


def _chunks(h, targets, chunk):
  """[B, T, d], [B, T] -> [n, B*c, d], [n, B*c]: every chunk keeps the whole (data-sharded) batch."""
  B, T, d = h.shape
  chunk = T if chunk <= 0 or chunk >= T or T % chunk else chunk
  n = T // chunk
  return (h.reshape(B, n, chunk, d).swapaxes(0, 1).reshape(n, B * chunk, d),
          targets.reshape(B, n, chunk).swapaxes(0, 1).reshape(n, B * chunk))


def _chunk_terms(hc, w_u, tc, vocab_size):
  """(CE sum, #correct) of rows hc [M, d] with targets tc [M], in JAX."""
  V = w_u.shape[1]
  logits = jnp.dot(hc, w_u, preferred_element_type=F32)
  if V > vocab_size:  # padding columns are never predicted
    logits = logits + jnp.where(jnp.arange(V) < vocab_size, 0.0, -1e30).astype(F32)
  row_max = jax.lax.stop_gradient(logits.max(axis=-1))
  lse = row_max + jnp.log(jnp.exp(logits - row_max[:, None]).sum(-1))
  # The target logit as h · w_u[:, target]: a gather of M columns, not a gather from the [M, V]
  # logits, whose backward pass is a slow scatter.
  tgt = jnp.sum(hc.astype(F32) * jnp.take(w_u.T, tc, axis=0).astype(F32), axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == tc).sum()
  return (lse - tgt).sum(), correct


def cross_entropy_terms(h, w_u, targets, vocab_size: int, chunk: int, kernel: bool = False):
  """Sum of next-token cross-entropy (fp32, nats) and number of correct argmax predictions.

  h [B, T, d], w_u [d, V_padded], targets int[B, T]. Columns past `vocab_size` (padding) are masked.
  Everything runs on flattened [N, d] rows (2-D GEMMs; much faster to differentiate than the 3-D
  einsum on CPU, measured: BUILD_NOTES.md, "Step"). chunk > 0 (dividing T): positions per chunk, so
  [B*chunk, V] logits exist at a time, never [B*T, V] (the JAX path rematerialises each chunk's
  logits in the backward pass).
  """
  hs, ts = _chunks(h, targets, chunk)
  if kernel:
    return _kernel_terms(hs, ts, w_u, vocab_size)
  if hs.shape[0] == 1:
    return _chunk_terms(hs[0], w_u, ts[0], vocab_size)
  return _scan_terms(hs, ts, w_u, vocab_size, remat=True)


def _scan_terms(hs, ts, w_u, vocab_size: int, remat: bool):
  """(CE sum, #correct) over the chunks [n, M, d], in JAX; remat: recompute each chunk's logits in
  the backward pass instead of storing them."""
  terms = functools.partial(_chunk_terms, vocab_size=vocab_size)
  if remat:
    terms = jax.checkpoint(terms)

  def body(carry, xs):
    ce, corr = terms(xs[0], w_u, xs[1])
    return (carry[0] + ce, carry[1] + corr), None

  (ce, correct), _ = jax.lax.scan(body, (jnp.zeros((), F32), jnp.zeros((), jnp.int32)), (hs, ts))
  return ce, correct


def _ffi_cross_entropy(logits, targets, vocab_size: int):
  """(dlogits [M, V] written over the logits, loss [M], correct int32 [M]) from cross_entropy.cc."""
  M, V = logits.shape
  call = jax.ffi.ffi_call(build.CE_TARGET, (jax.ShapeDtypeStruct((M, V), F32), jax.ShapeDtypeStruct((M,), F32),
                                            jax.ShapeDtypeStruct((M,), jnp.int32)),
                          input_output_aliases={0: 0})
  return call(logits, targets.astype(jnp.int32), nv=np.int64(vocab_size))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_terms(hs, ts, w_u, vocab_size):
  # Not differentiated (e.g. evaluation): the JAX formulas, no gradient work.
  return _scan_terms(hs, ts, w_u, vocab_size, remat=False)


def _kernel_terms_fwd(hs, ts, w_u, vocab_size):
  def body(carry, xs):
    hc, tc = xs
    logits = jnp.dot(hc, w_u, preferred_element_type=F32)
    dlogits, loss, correct = _ffi_cross_entropy(logits, tc, vocab_size)
    dh = jnp.dot(dlogits.astype(w_u.dtype), w_u.T, preferred_element_type=F32)
    # The JAX path's dh is softmax·W_Uᵀ − W_U[:, target] (the target logit is its own product), the
    # kernel's (softmax − onehot)·W_Uᵀ: equal, except that an inf in W_U[:, target] gives NaN there
    # and ±inf here. 0·W_U[:, target] (a gather of M columns, fused into this add) puts the NaN back.
    dh = (dh + 0.0 * jnp.take(w_u, tc, axis=1).T.astype(F32)).astype(hc.dtype)
    dw = carry[2] + jnp.dot(hc.T, dlogits.astype(hc.dtype), preferred_element_type=F32)
    return (carry[0] + loss.sum(), carry[1] + correct.sum(), dw), dh

  init = (jnp.zeros((), F32), jnp.zeros((), jnp.int32), jnp.zeros(w_u.shape, F32))
  (ce, correct, dw), dh = jax.lax.scan(body, init, (hs, ts))
  return (ce, correct), (dh, dw.astype(w_u.dtype))


def _kernel_terms_bwd(vocab_size, res, cotangents):
  del vocab_size
  dh, dw = res
  g = cotangents[0]  # the #correct output is an integer: no cotangent flows from it
  return (g * dh).astype(dh.dtype), None, (g * dw).astype(dw.dtype)


_kernel_terms.defvjp(_kernel_terms_fwd, _kernel_terms_bwd)
