"""The SAE recipes, one object each: initialisation, forward pass, loss, the constraint applied
around each Adam step, optimizer and schedules. Everything here acts on ONE SAE (unstacked
parameters {W_e [d, m], b_e [m], W_d [m, d], b_d [d]}); `core` stacks SAEs and vmaps these methods.
Adding a recipe (JumpReLU, gated, ...) is a subclass of `Recipe` here and one line in `RECIPES`.

Layout: W_d row i is the paper's decoder column i (feature i's dictionary vector), so both GEMMs are
in the fast NN layout (x [B, d] @ W_e [d, m], f [B, m] @ W_d [m, d]; docs/cpu-notes.md §2).

  "2023"  Towards Monosemanticity (docs/paper-notes.md §3): pre-encoder bias tied to b_d (init:
          geometric median), unit-norm decoder with the parallel gradient component removed, MSE
          averaged over dims + λ Σ f, constant lr, resampling (resample.py).
  "2024"  April-2024 update (docs/paper-notes.md §4): one input scale with E‖x‖ = √n, no pre-encoder
          bias, free decoder norms, squared error summed over dims + λ_t Σ f_i ‖W_d,i‖, λ warm-up, lr
          decay to 0, grad clip, W_e = W_dᵀ at init.
  "topk"  OpenAI/sparsify TopK (not in the paper): top-k pre-activations then ReLU, unit-norm decoder
          as in 2023, pre-encoder bias (geometric median), W_e = W_dᵀ at init, input scaled like
          2024, normalised MSE + AuxK on dead latents.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from monojax import errors

F32 = jnp.float32
# ----------------------------------------------------------------------------------------- schedules

def window_steps(fraction: float, total_steps: int) -> int:
  """A config fraction of the SAE run as a whole number of steps (at least 1)."""
  return max(1, round(float(fraction) * int(total_steps)))


# ------------------------------------------------------------------------------------ initialisation

@functools.partial(jax.jit, static_argnames=("max_iters", "tol"))
def geometric_median(points, *, max_iters: int = 200, tol: float = 1e-6):
  """Geometric median of the rows of `points` [N, d] (fp32) by Weiszfeld's iterations, started at
  the mean; stops when a step moves less than tol × (1 + ‖y‖). The 2023 b_d init (§3.1)."""
  x = jnp.asarray(points, F32)

  def step(y):
    dist = jnp.maximum(jnp.linalg.norm(x - y, axis=1), 1e-8)  # a point on y would divide by 0
    w = 1.0 / dist
    return (w[:, None] * x).sum(0) / w.sum()

  def cond(carry):
    i, _, moved = carry
    return (i < max_iters) & moved

  def body(carry):
    i, y, _ = carry
    y_new = step(y)
    return i + 1, y_new, jnp.linalg.norm(y_new - y) > tol * (1.0 + jnp.linalg.norm(y))

  _, y, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), x.mean(0), jnp.array(True)))
  return y


@jax.jit
def input_scale(sample_acts):
  """The constant c with E‖c·x‖ = √n (2024 §4.2; we pick the E‖x‖ form, not SM24's E‖x‖² = n)."""
  x = jnp.asarray(sample_acts, F32)
  mean_norm = jnp.linalg.norm(x, axis=1).mean()
  return jnp.where(mean_norm > 0, jnp.sqrt(jnp.float32(x.shape[1])) / mean_norm, 1.0).astype(F32)


def unit_rows(w):
  return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------- forward / loss

def _order_key(x):
  """float32 -> uint32 with the same order (flip all bits of negatives, the sign bit of the rest)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_key(key):
  bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def kth_largest(x, k: int):
  """Exact per-row k-th largest value of x [..., m] as [..., 1] (no gradient).

  Bisection on the order-preserving integer image of the floats: 32 compare-and-count passes.
  XLA's CPU lax.top_k sorts every row and is slower (measured: BUILD_NOTES.md, "Core
  (`monojax/sae/`)"; docs/cpu-notes.md §3 also found it the bottleneck of pure-XLA TopK)."""
  k = min(int(k), x.shape[-1])
  keys = _order_key(jax.lax.stop_gradient(x))
  lo, hi = keys.min(-1, keepdims=True), keys.max(-1, keepdims=True)

  def halve(_, bounds):  # invariant: count(keys >= lo) >= k > count(keys > hi)
    lo, hi = bounds
    mid = lo + (hi - lo) - (hi - lo) // 2  # ceil midpoint without uint32 overflow
    enough = (keys >= mid).sum(-1, keepdims=True, dtype=jnp.int32) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return _from_order_key(lo)


def _aux_k_loss(cfg, params, pre, residual, dead):
  """AuxK (Gao et al. 2024): the top aux_k pre-activations among DEAD latents reconstruct the main
  reconstruction's residual (no bias); zero when nothing is dead or aux_k = 0."""
  if cfg.aux_k <= 0:
    return jnp.zeros((), F32)
  dead_pre = jnp.where(dead, pre, -jnp.inf)
  keep = dead & (dead_pre >= kth_largest(dead_pre, cfg.aux_k))
  aux_recon = jnp.where(keep, jax.nn.relu(pre), 0.0) @ params["W_d"]
  return jnp.where(dead.any(), _normalised_mse(aux_recon, residual), 0.0)


# ------------------------------------------------------------------------------ decoder constraint

def project_out_parallel(W_d, grad_W_d):
  """Removes from each decoder row's gradient its component along that (unit) row, before Adam
  (§3.2: otherwise the renormalisation discards the radial step and Adam's moments go stale)."""
  unit = unit_rows(W_d)
  return grad_W_d - (grad_W_d * unit).sum(-1, keepdims=True) * unit




def _normalised_mse(pred, target):
  """Σ(pred − target)² / Σ(target − batch mean)², OpenAI's TopK loss normalisation."""
  target_var = jnp.square(target - target.mean(0)).sum()
  return jnp.square(pred - target).sum() / jnp.maximum(jax.lax.stop_gradient(target_var), 1e-12)


# ------------------------------------------------------------------------------------------ recipes

class SparseForm(NamedTuple):
  """How a ReLU recipe's loss maps onto the exact sparse update's kernel (sae/sparse): squared error
  averaged (True) or summed (False) over dims, and an L1 term weighted by ‖W_d,i‖ or not."""
  mean_over_dims: bool
  norm_weighted_l1: bool


class Recipe:
  """One SAE training recipe. The flags are read by the shared code (core, resample, sparse); the
  methods are the recipe's own rules. Instances are stateless and hashable (static under jit)."""
  name = ""
  default_l1 = 0.0          # λ when sae.saes leaves it empty
  uses_l1 = True            # False: sparsity comes from elsewhere (topk's k); λ must be 0
  pre_bias = False          # encoder sees x − b_d, b_d initialised at the geometric median (2023 §3.1)
  unit_norm_decoder = False  # decoder rows kept at norm 1, gradient projected (2023 §3.2)
  scales_input = False      # inputs multiplied by the dataset constant with E‖x‖ = √n (2024 §4.2); see `scales`
  resamples = False         # dead-feature resampling (2023 §3.5)
  sparse: SparseForm | None = None  # set when the exact sparse CPU update can train this recipe

  def __repr__(self) -> str:
    return f"Recipe({self.name!r})"

  def scales(self, cfg) -> bool:
    """Whether this recipe trains on inputs scaled by the dataset constant (static per run)."""
    del cfg
    return self.scales_input

  def k(self, cfg) -> int:
    """Active latents per token when the recipe fixes them (topk), else 0; static per SAE."""
    del cfg
    return 0

  def lr(self, cfg, step, total_steps: int):
    """Learning rate of the update taken at `step` (0-based)."""
    raise NotImplementedError

  def l1_factor(self, cfg, step, total_steps: int):
    """Multiplier of each SAE's λ at `step`."""
    del cfg, step, total_steps
    return jnp.ones((), F32)

  def optimizer(self, cfg) -> optax.GradientTransformation:
    """Adam without the learning rate (core multiplies by `lr`, so one step counter drives every
    schedule). Always a chain ending in scale_by_adam, so the Adam state is `opt[-1]`."""
    return optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))

  def init_params(self, cfg, rng: np.random.Generator, d_in: int, width: int, b_d_init) -> dict:
    """One SAE's parameters as host fp32 arrays, drawn with numpy (identical on every backend and
    mesh, and no PRNG program to compile). `b_d_init` [d] is the geometric median of the
    (recipe-scaled) sample, used where the recipe ties the pre-encoder bias to b_d."""
    raise NotImplementedError

  def activation(self, pre, k: int):
    del k
    return jax.nn.relu(pre)

  def forward(self, params, x, k: int = 0):
    """x [B, d] (already scaled if the recipe scales) -> (pre [B, m], f [B, m], x_hat [B, d]).

    The tied pre-encoder bias enters as `(x - sg(b_d)) @ W_e + b_e - (b_d - sg(b_d)) @ W_e`: the
    same values and gradients as `(x - b_d) @ W_e + b_e`, but b_d's gradient through the encoder is
    a vector-matrix product instead of a sixth [B, d, m] GEMM (docs/cpu-notes.md §3)."""
    W_e, b_e, W_d, b_d = params["W_e"], params["b_e"], params["W_d"], params["b_d"]
    if self.pre_bias:
      b_d_const = jax.lax.stop_gradient(b_d)
      pre = (x - b_d_const) @ W_e + (b_e - (b_d - b_d_const) @ W_e)
    else:
      pre = x @ W_e + b_e
    f = self.activation(pre, k)
    return pre, f, f @ W_d + b_d

  def loss(self, cfg, params, x, l1_coef, dead):
    """One SAE's training loss on x [B, d] (recipe-scaled). l1_coef: λ already multiplied by its
    schedule; dead bool[m]: latents that have not fired for dead_window steps (used by AuxK).
    Returns (loss, aux) with aux {"f", "x_hat", "recon", "sparsity", "aux_k"} (all fp32)."""
    raise NotImplementedError

  def constrain_grads(self, params, grads):
    """Applied to the gradients before Adam: a unit-norm decoder loses each row's component along
    the row (§3.2: otherwise the renormalisation discards the radial step and Adam's moments go
    stale)."""
    if self.unit_norm_decoder:
      return dict(grads, W_d=project_out_parallel(params["W_d"], grads["W_d"]))
    return grads

  def constrain_params(self, params):
    """Applied after each update: a unit row plus a perpendicular step is no longer unit (§3.2)."""
    if self.unit_norm_decoder:
      params["W_d"] = unit_rows(params["W_d"])
    return params

  def reported_factor(self, params, scale):
    """Multiplier taking f to the reported activation in the ORIGINAL input units: ‖W_d,i‖ / scale
    (2024, §4.2: f_i‖W_d,i‖; the scale is folded back in); exactly 1 / scale for unit-norm decoders."""
    if self.unit_norm_decoder:
      return jnp.ones((params["W_d"].shape[0],), F32) / scale
    return jnp.linalg.norm(params["W_d"], axis=-1) / scale


class Recipe2023(Recipe):
  """Towards Monosemanticity (§3)."""
  name = "2023"
  default_l1 = 0.004  # §3.4
  pre_bias = True
  unit_norm_decoder = True
  resamples = True
  sparse = SparseForm(mean_over_dims=True, norm_weighted_l1=False)

  def scales(self, cfg) -> bool:
    """sae.normalize_inputs: train on c·x with E‖c·x‖ = √n (the 2024 rule), so that λ means the same
    on any LM (λ on raw activations ≈ λ / c); False: raw activations, as the paper."""
    return bool(cfg.get("normalize_inputs", False))

  def lr(self, cfg, step, total_steps):
    # constant: the paper found annealing did not help (§3.3)
    return jnp.asarray(cfg.lr, F32)

  def init_params(self, cfg, rng, d_in, width, b_d_init):
    # PyTorch nn.Linear's default Kaiming-uniform, U(±1/√fan_in) (§3.1), then unit decoder rows.
    W_e = rng.uniform(-1.0, 1.0, (d_in, width)) / math.sqrt(d_in)
    W_d = _unit_np(rng.uniform(-1.0, 1.0, (width, d_in)) / math.sqrt(width))
    return _params_np(W_e, W_d, np.asarray(b_d_init, np.float32))

  def loss(self, cfg, params, x, l1_coef, dead):
    # mean over batch of [ (1/n)‖x − x̂‖² + λ Σ_i f_i ]  (§3.1: MSE averaged over dims, L1 summed)
    _, f, x_hat = self.forward(params, x)
    recon = jnp.square(x - x_hat).mean()
    sparsity = f.sum(-1).mean()
    return recon + l1_coef * sparsity, _aux(f, x_hat, recon, sparsity)


class Recipe2024(Recipe):
  """Anthropic's April-2024 update (§4.2)."""
  name = "2024"
  default_l1 = 5.0  # §4.2
  scales_input = True
  sparse = SparseForm(mean_over_dims=False, norm_weighted_l1=True)

  def lr(self, cfg, step, total_steps):
    """Constant, then linear to 0 over the last lr_decay_frac (§4.2): the update at step s gets
    lr·min(1, (T − s)/decay_steps), which reaches 0 at s = T."""
    step = jnp.asarray(step, F32)
    if cfg.lr_decay_frac <= 0:
      return jnp.asarray(cfg.lr_2024, F32)
    decay = window_steps(cfg.lr_decay_frac, total_steps)
    return cfg.lr_2024 * jnp.clip((total_steps - step) / decay, 0.0, 1.0)

  def l1_factor(self, cfg, step, total_steps):
    """λ warms up linearly from 0 (step 0) to full at lambda_warmup_frac·T (§4.2)."""
    if cfg.lambda_warmup_frac <= 0:
      return jnp.ones((), F32)
    warm = window_steps(cfg.lambda_warmup_frac, total_steps)
    return jnp.minimum(jnp.asarray(step, F32) / warm, 1.0)

  def optimizer(self, cfg):
    # each SAE's global gradient norm is clipped first (§4.2)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*parts, optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))

  def init_params(self, cfg, rng, d_in, width, b_d_init):
    # random directions with a small fixed norm, W_e = W_dᵀ at init only (§4.2)
    W_d = cfg.init_decoder_norm * _unit_np(rng.standard_normal((width, d_in)))
    return _params_np(W_d.T, W_d, np.zeros((d_in,), np.float32))

  def loss(self, cfg, params, x, l1_coef, dead):
    # mean over batch of [ ‖x − x̂‖² + λ_t Σ_i f_i ‖W_d,i‖ ]  (§4.2: summed over dims, norm-weighted L1)
    _, f, x_hat = self.forward(params, x)
    recon = jnp.square(x - x_hat).sum(-1).mean()
    sparsity = (f * jnp.linalg.norm(params["W_d"], axis=-1)).sum(-1).mean()
    return recon + l1_coef * sparsity, _aux(f, x_hat, recon, sparsity)


class RecipeTopK(Recipe):
  """TopK (Gao et al. 2024; sparsify): k largest pre-activations, then ReLU; AuxK on dead latents."""
  name = "topk"
  uses_l1 = False
  pre_bias = True
  unit_norm_decoder = True
  scales_input = True

  def k(self, cfg):
    return int(cfg.topk_k)

  def lr(self, cfg, step, total_steps):
    return jnp.asarray(cfg.lr_topk, F32)

  def init_params(self, cfg, rng, d_in, width, b_d_init):
    # the 2024 directions at norm 1 (the decoder is unit-norm constrained), W_e = W_dᵀ
    W_d = _unit_np(rng.standard_normal((width, d_in)))
    return _params_np(W_d.T, W_d, np.asarray(b_d_init, np.float32))

  def activation(self, pre, k):
    # ties at the k-th value keep every tied entry (measure zero for real data)
    return jnp.where(pre >= kth_largest(pre, k), jax.nn.relu(pre), 0.0)

  def loss(self, cfg, params, x, l1_coef, dead):
    pre, f, x_hat = self.forward(params, x, cfg.topk_k)
    recon = _normalised_mse(x_hat, x)
    aux_k = _aux_k_loss(cfg, params, pre, jax.lax.stop_gradient(x - x_hat), dead)
    return recon + cfg.aux_k_coef * aux_k, _aux(f, x_hat, recon, jnp.zeros((), F32), aux_k)


RECIPES = {r.name: r for r in (Recipe2023(), Recipe2024(), RecipeTopK())}
NAMES = tuple(RECIPES)


def get(name: str) -> Recipe:
  if name not in RECIPES:
    raise errors.ConfigError(f"sae.saes: unknown recipe {name!r}; choose one of {', '.join(NAMES)}")
  return RECIPES[name]


def _aux(f, x_hat, recon, sparsity, aux_k=None):
  return {"f": f, "x_hat": x_hat, "recon": recon, "sparsity": sparsity,
          "aux_k": jnp.zeros((), F32) if aux_k is None else aux_k}


def _unit_np(w):
  return w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def _params_np(W_e, W_d, b_d) -> dict:
  width = W_d.shape[0]
  return {"W_e": np.ascontiguousarray(W_e, np.float32), "b_e": np.zeros((width,), np.float32),
          "W_d": np.ascontiguousarray(W_d, np.float32), "b_d": b_d}
