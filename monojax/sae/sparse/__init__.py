"""Sparsity-aware exact SAE update on CPU (C++ kernels through the XLA FFI) for the ReLU recipes.

  available()                 kernels compiled and registered (else: one warning, dense fallback)
  value_and_grad(recipe, ...) drop-in for jax.value_and_grad(recipes.loss, has_aux=True)
  wanted(sae_cfg, recipe)     core's choice from sae_cfg.sparse_update ("auto" | "on" | "off")
"""
from monojax.kernels.build import available
from monojax.sae.sparse.update import screen_wanted, supports, value_and_grad, wanted

__all__ = ["available", "screen_wanted", "supports", "value_and_grad", "wanted"]
