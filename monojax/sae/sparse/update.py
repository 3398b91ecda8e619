"""The JAX side of the sparse SAE update: loss and gradients of the ReLU recipes ("2023", "2024")
with the same contract as `jax.value_and_grad(recipe.loss, has_aux=True)`, exact (no top-K). A
recipe opts in by declaring its `sparse` form (recipes.SparseForm: how its loss maps onto the kernel).

Only the encoder GEMM (most of a step's time; measured: BUILD_NOTES.md, "Sparse SAE update") runs
in XLA; everything after it costs work proportional to the number of active entries
A = {(b, i): pre_bi > 0} and runs in one FFI call (monojax/kernels/sae_sparse.cc):

  x̂_b = b_d + Σ_{i∈A_b} f_bi W_d,i                g_b = ∂L/∂x̂_b = c·(x̂_b − x_b)
  df_bi = g_b·W_d,i + l1_i on A, 0 elsewhere       (relu' is 0 at 0, as in JAX)
  dW_d,i = Σ_b f_bi g_b      dW_e[:, i] = Σ_b df_bi xe_b      db_e,i = Σ_b df_bi

  pre_bias (2023): xe = x − b_d; db_d = Σ_b g_b − W_e db_e (Recipe.forward's stop-gradient form:
        b_d reaches the encoder only through the bias); otherwise (2024) xe = x, db_d = Σ_b g_b.
  mean_over_dims (2023): c = 2/(B·d); summed over dims (2024): c = 2/B.
  norm_weighted_l1 (2024): l1_i = λ‖W_d,i‖/B, and the L1 term adds the dense
        dW_d,i += (λ/B)·(Σ_b f_bi)·W_d,i/‖W_d,i‖ (cheap in XLA from the kernel's column sums);
        otherwise (2023) l1_i = λ/B.

Dense activity. The kernel's cost grows with |A| and beats the four remaining dense GEMMs only
while few features fire: a fresh SAE fires about half of them, where the kernel is slower than
the dense step (measured: BUILD_NOTES.md, "Sparse SAE update"). So the density is estimated on a
strided sample of rows and above MAX_DENSITY the same formulas run as dense GEMMs (lax.cond; the
encoder GEMM is shared). The predicate must not be batched (vmap turns a batched cond into both
branches), so this function has its own vmap rule: stacked members (core vmaps over them) share one
decision, and go through the custom call as one call looping over the leading axis.

Non-finite values (NaN/inf in x, W_e, b_e, b_d, λ) give the outputs autodiff of Recipe.loss
gives, NaN for NaN, whichever branch runs (tests/sae/test_sparse.py compares every output
elementwise): the kernel lists NaN pre-activations with f = NaN and relu'(NaN) = 0, counts only
f > 0 as fired (as core's dense path does), and adds the NaN that the dense GEMMs get from
multiplying unlisted features by a non-finite row (kernels/sae_sparse.cc has the details). The
density probe counts NaN entries as active (they are listed work), so an all-NaN batch runs dense.
What the kernel assumes instead of testing it: a finite W_d (the dense x̂ = f W_d multiplies every
row of W_d, active or not) — a non-finite W_d sends the step to the dense formulas (2024: from the
norms it computes anyway; 2023: a matrix-vector product over W_d). The 2023 forward's
`(b_d − sg(b_d)) W_e` term is 0 for finite values but NaN in a column of W_e holding a NaN or inf,
so it is kept here too (one matrix-vector product over W_e, ~0.1 % of the step).

Under a mesh, XLA's partitioner all-gathers the custom call's operands and runs it on every
device: correct, and the encoder GEMM and Adam stay sharded, but the kernel's work is repeated
per device (the default CPU setup has one device; a sharded kernel would need x̂ summed over
feature shards between two calls).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from monojax.kernels import build

F32 = jnp.float32
MAX_DENSITY = 0.1   # fraction of active entries above which the dense formulas run
                    # (crossover ~0.12 measured: BUILD_NOTES.md, "Sparse SAE update")
PROBE_ROWS = 256    # rows sampled for that estimate


def supports(recipe) -> bool:
  return recipe.sparse is not None


def value_and_grad(recipe, cfg, params, x, l1_coef, dead, screen_bf16: bool = False):
  """((loss, aux), grads) of `recipe.loss(cfg, params, x, l1_coef, dead)` w.r.t. params,
  for one SAE (vmappable). aux: {"f", "x_hat", "recon", "sparsity", "aux_k" (0), "fired_count"
  (int32 [m], firings per feature), "f_colsum" ([m], Σ_b f_bi)}. screen_bf16: the encoder GEMM in
  bf16 with an f32 recheck (see `screen_margin`): the same values where the hardware makes it faster."""
  del cfg, dead  # no AuxK for the ReLU recipes
  if not supports(recipe):
    raise ValueError(f"the sparse update supports recipes that declare a sparse form, not {recipe.name!r}")
  if not build.available():
    raise RuntimeError("the sparse SAE kernels are not available (see the warning logged)")
  params = {k: jnp.asarray(params[k], F32) for k in ("W_e", "b_e", "W_d", "b_d")}
  form = (recipe.pre_bias, *recipe.sparse, screen_bf16)
  return _batchable(form)(params, jnp.asarray(x, F32), jnp.asarray(l1_coef, F32))


@functools.cache
def _batchable(form):
  """value_and_grad for one SAE, whose vmap rule calls `_stacked` once for all members."""
  @jax.custom_batching.custom_vmap
  def one(params, x, l1_coef):
    out = _stacked(form, jax.tree.map(lambda a: a[None], params), x, l1_coef[None])
    return jax.tree.map(lambda a: a[0], out)

  @one.def_vmap
  def rule(axis_size, in_batched, params, x, l1_coef):
    p_batched, x_batched, l1_batched = in_batched
    grow = lambda a, batched: a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))  # noqa: E731
    params = {k: grow(v, p_batched[k]) for k, v in params.items()}
    out = _stacked(form, params, x, grow(l1_coef, l1_batched), x_batched=x_batched)
    return out, jax.tree.map(lambda _: True, out)

  return one


def _stacked(form, params, x, l1_coef, x_batched=False):
  """((loss, aux), grads) for S stacked SAEs: params leaves [S, ...], l1_coef [S], x [B, d] shared
  (or [S, B, d] when x_batched). form: (pre_bias, mean_over_dims, norm_weighted_l1, screen_bf16)."""
  pre_bias, mean_over_dims, norm_weighted_l1, screen = form
  W_e, b_e, W_d, b_d = params["W_e"], params["b_e"], params["W_d"], params["b_d"]
  S, m = b_e.shape
  xs = x if x_batched else jnp.broadcast_to(x, (S, *x.shape))
  B, d = xs.shape[1:]
  xe = xs - b_d[:, None] if pre_bias else xs
  c = 2.0 / (B * d) if mean_over_dims else 2.0 / B
  if norm_weighted_l1:
    norms = jnp.linalg.norm(W_d, axis=-1)
    l1 = l1_coef[:, None] * norms / B
  else:
    l1 = jnp.broadcast_to((l1_coef / B)[:, None], (S, m))
  # The one encoder GEMM (pre = xw + b_e is never stored), batched as vmap batches Recipe.forward
  # (so f > 0 agrees bit for bit with the dense update's).
  def encoder_gemm(dtype):
    mm = lambda a, w: jnp.matmul(a.astype(dtype), w.astype(dtype), preferred_element_type=F32)  # noqa: E731
    if not pre_bias and not x_batched:
      return jax.vmap(mm, in_axes=(None, 0))(x, W_e)
    return jax.vmap(mm)(xe, W_e)
  exact_xw = lambda: encoder_gemm(F32)  # noqa: E731 (what the dense formulas and aux["f"] use)
  xw = encoder_gemm(jnp.bfloat16) if screen else exact_xw()
  if pre_bias:  # Recipe.forward's `b_e − (b_d − sg(b_d)) W_e`: b_e bit for bit, unless W_e or b_d is not finite
    b_e = b_e - jnp.einsum("sd,sdm->sm", b_d - jax.lax.stop_gradient(b_d), W_e)
  probe = xw[:, :: max(1, B // PROBE_ROWS)] + b_e[:, None]
  sparse_enough = jnp.logical_not(probe <= 0).mean() <= MAX_DENSITY  # NaN counts: the kernel lists it
  # The kernel skips the decoder rows of inactive features, whose 0 · W_d,i the dense x̂ adds (NaN
  # for a non-finite W_d): such a W_d takes the dense formulas.
  wd_finite = jnp.isfinite(norms).all() if norm_weighted_l1 else jnp.isfinite(
      jnp.einsum("sm,smd->sd", jnp.zeros_like(b_e), W_d)).all()

  def sparse(xw):
    if not screen:
      return _kernel(xw, b_e, xe, xs, W_d, b_d, l1, c)
    kxn, wn, bslack = screen_margin(xe, W_e, b_e)
    return _kernel(xw, b_e, xe, xs, W_d, b_d, l1, c, screen=(jnp.swapaxes(W_e, 1, 2), kxn, wn, bslack))

  def dense(xw):  # the same formulas with GEMMs (what autodiff of Recipe.loss computes)
    pre = (exact_xw() if screen else xw) + b_e[:, None]
    f = jax.nn.relu(pre)
    x_hat = jnp.einsum("sbm,smd->sbd", f, W_d) + b_d[:, None]
    g = c * (x_hat - xs)
    df = jnp.where(pre > 0, jnp.einsum("sbd,smd->sbm", g, W_d) + l1[:, None], 0.0)
    return (x_hat, jnp.einsum("sbm,sbd->smd", f, g), jnp.einsum("sbd,sbm->sdm", xe, df), df.sum(1), f.sum(1),
            (pre > 0).sum(1, dtype=jnp.int32))

  x_hat, dW_d, dW_e, db_e, colsum, count = jax.lax.cond(sparse_enough & wd_finite, sparse, dense, xw)
  sq = jnp.square(xs - x_hat)
  db_d = c * (x_hat - xs).sum(1)
  recon = sq.mean((1, 2)) if mean_over_dims else sq.sum(-1).mean(-1)
  if pre_bias:
    db_d = db_d - jnp.einsum("sdm,sm->sd", W_e, db_e)
  if norm_weighted_l1:
    sparsity = (colsum * norms).sum(-1) / B
    dW_d = dW_d + (l1_coef / B)[:, None, None] * (colsum / norms)[..., None] * W_d
  else:
    sparsity = colsum.sum(-1) / B
  loss = recon + l1_coef * sparsity
  # "f" is lazy: XLA forms it only if a caller reads it. core reads "fired_count" and "f_colsum"
  # instead, which cost no [B, m] pass.
  aux = {"f": jax.nn.relu((exact_xw() if screen else xw) + b_e[:, None]), "x_hat": x_hat, "recon": recon, "sparsity": sparsity,
         "aux_k": jnp.zeros((S,), F32), "fired_count": count, "f_colsum": colsum}
  return (loss, aux), {"W_e": dW_e, "b_e": db_e, "W_d": dW_d, "b_d": db_d}


def _kernel(xw, b_e, xe, x, W_d, b_d, l1, c: float, screen=None):
  """(x_hat, dW_d data term, dW_e, db_e, colsum, count) from the FFI kernel (sae_sparse.cc); every
  operand has the leading member axis S. screen: (W_e transposed, κ‖xe_b‖, ‖W_e,i‖, slack) when xw
  is the bf16 GEMM (the kernel recomputes its candidates in f32)."""
  (S, B, m), d = xw.shape, x.shape[-1]
  shape = lambda *s, dtype=F32: jax.ShapeDtypeStruct((S, *s), dtype)  # noqa: E731
  target = build.SAE_TARGET if screen is None else build.SAE_SCREENED_TARGET
  call = jax.ffi.ffi_call(
      target, (shape(B, d), shape(m, d), shape(d, m), shape(m), shape(m), shape(m, dtype=jnp.int32)),
      vmap_method="broadcast_all")
  return call(xw, b_e, xe, x, W_d, b_d, l1, *(screen or ()), c=np.float32(c))


# ------------------------------------------------------------------------------------------------
# The bf16 screen: a provable bound on |bf16 GEMM − f32 GEMM| per entry.
#
# pre_bi = xe_b · W_e[:, i] + b_e,i. With bf16 inputs (unit roundoff u = 2⁻⁸: |x̃ − x| ≤ u|x|), the
# products x̃_k W̃_k are exact in f32 (8 + 8 significand bits), so the bf16 GEMM accumulated in f32
# (γ_d = d·u₃₂/(1 − d·u₃₂), u₃₂ = 2⁻²⁴) and the f32 GEMM differ from the exact dot e by at most
#   |S̃ − e| ≤ (2u + u²) Σ|x_k W_k| + γ_d (1+u)² Σ|x_k W_k|,     |S − e| ≤ γ_d Σ|x_k W_k|,
# and adding b_e rounds each by u₃₂·|S + b|. Σ|x_k W_k| ≤ ‖xe_b‖‖W_e,i‖ (Cauchy–Schwarz), so
#   |pre_bf16 − pre_f32| ≤ κ‖xe_b‖‖W_e,i‖ + 2u₃₂|b_e,i|  (κ below, with slack for the norms' own
# rounding), plus terms for inputs and products that a bf16 unit flushes to zero (each below
# 2⁻¹²⁶ in size: √d·2⁻¹²⁶ per flushed input vector, d·2⁻¹²⁶ for flushed products). An entry whose
# bf16 value is ≤ −margin is ≤ 0 in f32 too; every other entry (a candidate) is recomputed in f32
# by the kernel, so f, the firing set and the gradients are the f32 path's (up to the summation
# order of one dot product: tests/sae/test_sparse.py compares them).

_U, _U32 = 2.0 ** -8, 2.0 ** -24
_TINY = 2.0 ** -126


def screen_kappa(d: int) -> float:
  g = d * _U32 / (1 - d * _U32)
  return (2 * _U + _U * _U + g * ((1 + _U) ** 2 + 1) + 2 * _U32 * (1 + 2 * _U + _U * _U + g)) * (1 + 2 ** -8)


def _norm(v, axis):
  """‖v‖₂ along axis, scaled by max|v| first: no underflow to 0 (which would void the bound) and no
  overflow for values whose squares leave the f32 range."""
  amax = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
  safe = jnp.where(amax > 0, amax, 1.0)
  return (jnp.squeeze(amax, axis) * jnp.sqrt(jnp.sum(jnp.square(v / safe), axis=axis)))


def screen_margin(xe, W_e, b_e):
  """(κ‖xe_b‖ + a [S, B], ‖W_e,i‖ + a/κ [S, m], per-feature slack [S, m]): the kernel's margin is
  their product plus the slack (see above)."""
  d = xe.shape[-1]
  kappa = screen_kappa(d)
  a = 2 * np.sqrt(d) * _TINY
  kxn = kappa * _norm(xe, -1) + a
  wn = _norm(W_e, 1) + a / kappa
  bslack = 2 * _U32 * (1 + 2 ** -8) * jnp.abs(b_e) + d * 2 * _TINY
  return kxn.astype(F32), wn.astype(F32), bslack.astype(F32)


def screen_wanted(sae_cfg) -> bool:
  """Whether the sparse update screens with a bf16 encoder GEMM: sae_cfg.screen_bf16 "on", "off", or
  "auto": on where the CPU has bf16 matrix units (AVX512-BF16, AMX), the f32 GEMM elsewhere (where
  XLA emulates bf16 dots, slower than f32). Exact either way."""
  mode = str(sae_cfg.get("screen_bf16", "auto"))
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"sae.screen_bf16 must be auto | on | off, got {mode!r}")
  if mode == "auto":
    from monojax import cpu_env
    return cpu_env.has_bf16_matrix_units()
  return mode == "on"


def wanted(sae_cfg, recipe) -> bool:
  """Whether core should use the sparse update for this recipe: sae_cfg.sparse_update "auto"
  (kernels built, CPU backend, a ReLU recipe), "on" (required: errors if impossible; topk groups
  stay dense) or "off"."""
  mode = str(sae_cfg.get("sparse_update", "auto"))
  if mode == "off":
    return False
  if mode == "on":
    if not supports(recipe):
      return False
    if jax.default_backend() != "cpu":
      raise RuntimeError(f"sae.sparse_update='on' needs the CPU backend, not {jax.default_backend()!r}")
    if not build.available():
      raise RuntimeError("sae.sparse_update='on' but the sparse SAE kernels could not be built "
                         "(see the warning logged); set it to 'auto' or 'off'")
    return True
  if mode != "auto":
    raise ValueError(f"sae.sparse_update must be auto | on | off, got {mode!r}")
  return supports(recipe) and jax.default_backend() == "cpu" and build.available()
