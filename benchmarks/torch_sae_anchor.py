"""PyTorch anchors for benchmarks/sae_step.py: one SAE update as other code does it, on CPU.

torch (and sae_lens) are NOT monojax dependencies: this module is imported only by the benchmark,
and every function here imports them lazily. benchmarks/setup_anchors.sh makes a separate venv
with both pinned.

Two anchors, both started from the same parameters as the monojax state they are compared with
(so they see the same sparsity), with fresh Adam moments:

  "sae_lens"  SAELens' training SAE (StandardTrainingSAE.training_forward_pass) and the body of
              SAETrainer._train_step: firing statistics, loss.backward(), clip_grad_norm_(1.0),
              torch.optim.Adam.step(), zero_grad() (no wandb, no autocast: its GradScaler is off on
              CPU fp32). This is SAELens' recipe (decoder-norm-weighted L1, summed MSE, no decoder
              constraint), not exactly the 2023 one; the FLOPs are the same to within the O(B·m)
              terms. Written against sae-lens 6.18.0.
  "torch"     plain PyTorch with the 2023 recipe as monojax implements it (recipes.py): tied
              pre-encoder bias, MSE averaged over dims + λ Σ f, the decoder gradient's component
              along each (unit) decoder row removed before Adam, rows renormalised after it, and the
              per-feature firing counts the monojax update also keeps. `plain_reference_update`
              checks that it is the same algorithm (benchmarks/sae_step.py --quick prints the check).
"""
from __future__ import annotations

import dataclasses
import os

INSTALL_HINT = ("torch is not installed in this interpreter: `pip install torch==2.13.0` (a CPU wheel on this "
                "machine's disk), or `bash benchmarks/setup_anchors.sh` for a venv with torch and sae-lens")


def import_torch():
  """torch, with its intra-op threads set to every CPU (the same as XLA's CPU client uses)."""
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  return torch


def sae_lens_version() -> str | None:
  """sae_lens' version if it imports in this interpreter, else None."""
  try:
    import sae_lens
  except Exception:  # noqa: BLE001 (any import failure means: not usable here)
    return None
  return str(getattr(sae_lens, "__version__", "unknown"))


def _tensor(torch, a):
  import numpy as np
  return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def _adam(torch, params, *, lr, b1, b2, eps, adam: str):
  kw = {}
  if adam == "fused":
    kw["fused"] = True
  elif adam == "foreach":
    kw["foreach"] = True
  elif adam != "default":
    raise ValueError(f"adam must be default, foreach or fused, got {adam!r}")
  return torch.optim.Adam(params, lr=lr, betas=(b1, b2), eps=eps, **kw)


@dataclasses.dataclass
class Anchor:
  name: str        # "sae_lens" or "torch"
  describe: str    # one line for the benchmark's output
  step: object     # step(x: torch.Tensor [B, d_in] fp32) -> None, runs one update to completion
  params: dict     # name -> torch.Tensor (live parameters, for checks)


def plain_2023(params: dict, *, lr: float, l1: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               adam: str = "default") -> Anchor:
  """Plain PyTorch 2023-recipe update. params: numpy-like {W_e [d,m], b_e [m], W_d [m,d], b_d [d]}
  (monojax layout: W_d row i is feature i's unit dictionary vector)."""
  torch = import_torch()
  p = {k: _tensor(torch, params[k]).requires_grad_(True) for k in ("W_e", "b_e", "W_d", "b_d")}
  opt = _adam(torch, list(p.values()), lr=lr, b1=b1, b2=b2, eps=eps, adam=adam)
  m = p["W_e"].shape[1]
  fired_count = torch.zeros(m, dtype=torch.int64)
  last_fired = torch.zeros(m, dtype=torch.int64)
  counter = {"step": 0}

  def step(x):
    W_e, b_e, W_d, b_d = p["W_e"], p["b_e"], p["W_d"], p["b_d"]
    f = torch.relu((x - b_d) @ W_e + b_e)
    x_hat = f @ W_d + b_d
    loss = (x - x_hat).square().mean() + l1 * f.sum(-1).mean()
    loss.backward()
    with torch.no_grad():
      counter["step"] += 1
      fired = f > 0
      n_fired = fired.sum(0)
      fired_count.add_(n_fired)
      last_fired[n_fired > 0] = counter["step"]
      unit = W_d / W_d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
      g = W_d.grad
      g.sub_((g * unit).sum(-1, keepdim=True) * unit)    # remove the radial component (2023, docs/paper-notes.md §3.2)
    opt.step()
    with torch.no_grad():
      W_d.div_(W_d.norm(dim=-1, keepdim=True).clamp_min(1e-12))  # back to unit rows
    opt.zero_grad(set_to_none=True)

  return Anchor("torch", f"plain PyTorch {torch.__version__} 2023 recipe (fwd + bwd + radial-gradient projection + "
                         f"torch.optim.Adam[{adam}] + renormalisation + firing counts)", step, p)


def sae_lens_standard(params: dict, *, lr: float, l1: float, b1: float = 0.9, b2: float = 0.999,
                      dead_window: int = 1000, autocast_bf16: bool = False) -> Anchor:
  """SAELens' StandardTrainingSAE and the body of SAETrainer._train_step (sae-lens 6.x API).
  autocast_bf16: the forward pass (and so its products) under torch.autocast("cpu", bfloat16), as
  SAETrainer runs it with autocast on; parameters, gradients and Adam stay fp32."""
  import contextlib
  torch = import_torch()
  import sae_lens
  from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
  try:
    from sae_lens.saes.sae import TrainStepInput
  except ImportError:  # older layouts
    from sae_lens import TrainStepInput  # type: ignore[no-redef]

  d_in, m = params["W_e"].shape
  cfg = StandardTrainingSAEConfig(d_in=int(d_in), d_sae=int(m), l1_coefficient=float(l1), dtype="float32",
                                  device="cpu")
  sae = StandardTrainingSAE(cfg)
  with torch.no_grad():
    for ours, theirs in (("W_e", "W_enc"), ("b_e", "b_enc"), ("W_d", "W_dec"), ("b_d", "b_dec")):
      getattr(sae, theirs).copy_(_tensor(torch, params[ours]))
  sae.train()
  opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(b1, b2))  # as SAETrainer builds it
  act_freq_scores = torch.zeros(m)
  since_fired = torch.zeros(m)
  fields = {f.name for f in dataclasses.fields(TrainStepInput)}
  counter = {"step": 0}

  def step(x):
    kw = {"sae_in": x, "coefficients": {"l1": float(l1)}, "dead_neuron_mask": (since_fired > dead_window).bool(),
          "n_training_steps": counter["step"]}
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    with ctx:
      out = sae.training_forward_pass(step_input=TrainStepInput(**{k: v for k, v in kw.items() if k in fields}))
    with torch.no_grad():
      firing = out.feature_acts.bool().float()
      did_fire = firing.sum(-2).bool()
      since_fired.add_(1)
      since_fired[did_fire] = 0
      act_freq_scores.add_(firing.sum(0))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    counter["step"] += 1

  live = {"W_e": sae.W_enc, "b_e": sae.b_enc, "W_d": sae.W_dec, "b_d": sae.b_dec}
  return Anchor("sae_lens", f"SAELens {sae_lens.__version__} StandardTrainingSAE + SAETrainer._train_step body "
                            f"(torch {torch.__version__}; SAELens' loss: decoder-norm-weighted L1, no decoder "
                            f"constraint" + ("; forward under torch.autocast('cpu', bfloat16)" if autocast_bf16 else "")
                            + ")", step, live)


def make(which: str, params: dict, *, lr: float, l1: float, b1: float, b2: float, eps: float,
         adam: str = "default") -> Anchor:
  """which: "sae_lens" | "torch" | "auto" (sae_lens if it imports, else plain torch)."""
  if which == "auto":
    which = "sae_lens" if sae_lens_version() is not None else "torch"
  if which == "sae_lens":
    return sae_lens_standard(params, lr=lr, l1=l1, b1=b1, b2=b2)
  if which == "torch":
    return plain_2023(params, lr=lr, l1=l1, b1=b1, b2=b2, eps=eps, adam=adam)
  raise ValueError(f"anchor must be auto, sae_lens or torch, got {which!r}")


def plain_reference_update(params: dict, x, *, lr: float, l1: float, b1: float, b2: float, eps: float) -> dict:
  """One plain-PyTorch 2023 update from `params` on x (numpy); returns the new params as numpy.
  Used to check that the torch anchor and monojax's update compute the same thing."""
  torch = import_torch()
  anchor = plain_2023(params, lr=lr, l1=l1, b1=b1, b2=b2, eps=eps)
  anchor.step(_tensor(torch, x))
  return {k: v.detach().numpy().copy() for k, v in anchor.params.items()}
