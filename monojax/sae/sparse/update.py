"""The JAX side of the sparse SAE update: loss and gradients of the ReLU recipes ("2023", "2024")
with the same contract as `jax.value_and_grad(recipes.loss, has_aux=True)`, exact (no top-K).

Only the encoder GEMM (60-70 % of a step) runs in XLA; everything after it costs work proportional
to the number of active entries A = {(b, i): pre_bi > 0} and runs in one FFI call (kernels.cc):

  x̂_b = b_d + Σ_{i∈A_b} f_bi W_d,i                g_b = ∂L/∂x̂_b = c·(x̂_b − x_b)
  df_bi = g_b·W_d,i + l1_i on A, 0 elsewhere       (relu' is 0 at 0, as in JAX)
  dW_d,i = Σ_b f_bi g_b      dW_e[:, i] = Σ_b df_bi xe_b      db_e,i = Σ_b df_bi

  2023: xe = x − b_d, c = 2/(B·d), l1_i = λ/B; db_d = Σ_b g_b − W_e db_e (recipes.forward's
        stop-gradient form: b_d reaches the encoder only through the bias).
  2024: xe = x, c = 2/B, l1_i = λ‖W_d,i‖/B; db_d = Σ_b g_b, and the norm-weighted L1 adds the dense
        dW_d,i += (λ/B)·(Σ_b f_bi)·W_d,i/‖W_d,i‖ (cheap in XLA from the kernel's column sums).

Stacked members (core vmaps over them) go through the custom call as one call looping over the
leading axis. Under a mesh, XLA's partitioner all-gathers the custom call's operands and runs it
on every device: correct, and the encoder GEMM and Adam stay sharded, but the kernel's work is
repeated per device (the default CPU setup has one device; a sharded kernel would need x̂ summed
over feature shards between two calls).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from monojax.sae.sparse import build

F32 = jnp.float32
RECIPES = ("2023", "2024")


def supports(recipe) -> bool:
  return recipe.name in RECIPES


def _kernel(xw, b_e, xe, x, W_d, b_d, l1, c: float):
  """(x_hat, dW_d data term, dW_e, db_e, colsum, count) from the FFI kernel (kernels.cc)."""
  lead, (B, m), d = xw.shape[:-2], xw.shape[-2:], x.shape[-1]
  shape = lambda *s, dtype=F32: jax.ShapeDtypeStruct((*lead, *s), dtype)  # noqa: E731
  call = jax.ffi.ffi_call(
      build.TARGET, (shape(B, d), shape(m, d), shape(d, m), shape(m), shape(m), shape(m, dtype=jnp.int32)),
      vmap_method="broadcast_all")
  return call(xw, b_e, xe, x, W_d, b_d, l1, c=np.float32(c))


def value_and_grad(recipe, cfg, params, x, l1_coef, dead):
  """((loss, aux), grads) of `recipes.loss(recipe, cfg, params, x, l1_coef, dead)` w.r.t. params,
  for one SAE (vmappable). aux: {"f", "x_hat", "recon", "sparsity", "aux_k" (0), "fired_count",
  "f_colsum"}."""
  del cfg, dead  # no AuxK for the ReLU recipes
  if not supports(recipe):
    raise ValueError(f"the sparse update supports recipes {RECIPES}, not {recipe.name!r}")
  if not build.available():
    raise RuntimeError("the sparse SAE kernels are not available (see the warning logged)")
  W_e, b_e, W_d, b_d = (jnp.asarray(params[k], F32) for k in ("W_e", "b_e", "W_d", "b_d"))
  x = jnp.asarray(x, F32)
  B, d = x.shape
  m = W_e.shape[-1]
  l1_coef = jnp.asarray(l1_coef, F32)
  if recipe.name == "2023":
    xe, c = x - b_d, 2.0 / (B * d)
    l1 = jnp.broadcast_to(l1_coef / B, (m,))
  else:
    norms = jnp.linalg.norm(W_d, axis=-1)
    xe, c = x, 2.0 / B
    l1 = l1_coef * norms / B
  xw = xe @ W_e  # the one GEMM; b_e is added inside the kernel, so no [B, m] pre is stored
  x_hat, dW_d, dW_e, db_e, colsum, count = _kernel(xw, b_e, xe, x, W_d, b_d, l1, c)

  sq = jnp.square(x - x_hat)
  db_d = c * (x_hat - x).sum(0)
  if recipe.name == "2023":
    recon, sparsity = sq.mean(), colsum.sum() / B
    db_d = db_d - W_e @ db_e
  else:
    recon, sparsity = sq.sum(-1).mean(), (colsum * norms).sum() / B
    dW_d = dW_d + (l1_coef / B) * (colsum / norms)[:, None] * W_d
  loss = recon + l1_coef * sparsity
  # "f" is lazy: XLA forms it only if a caller reads it. core reads the firing statistics
  # "fired_count" [m] (int32) and "f_colsum" [m] = Σ_b f_bi instead, which cost no [B, m] pass.
  aux = {"f": jax.nn.relu(xw + b_e), "x_hat": x_hat, "recon": recon, "sparsity": sparsity,
         "aux_k": jnp.zeros((), F32), "fired_count": count, "f_colsum": colsum}
  return (loss, aux), {"W_e": dW_e, "b_e": db_e, "W_d": dW_d, "b_d": db_d}


def wanted(sae_cfg, recipe) -> bool:
  """Whether core should use the sparse update for this recipe: sae_cfg.sparse_update "auto"
  (kernels built, CPU backend, a ReLU recipe), "on" (required: errors if impossible) or "off"."""
  mode = str(sae_cfg.get("sparse_update", "auto"))
  if mode == "off":
    return False
  if mode == "on":
    if not supports(recipe):
      return False  # "on" applies to the recipes it can serve; topk groups stay dense
    if jax.default_backend() != "cpu":
      raise RuntimeError(f"sae.sparse_update='on' needs the CPU backend, not {jax.default_backend()!r}")
    if not build.available():
      raise RuntimeError("sae.sparse_update='on' but the sparse SAE kernels could not be built "
                         "(see the warning logged); set it to 'auto' or 'off'")
    return True
  if mode != "auto":
    raise ValueError(f"sae.sparse_update must be auto | on | off, got {mode!r}")
  return supports(recipe) and jax.default_backend() == "cpu" and build.available()
