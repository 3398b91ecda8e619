"""TransformerLens (+ SAELens) anchors for benchmarks/compare.py: the LM step, the co-trained job and
the frozen-LM SAE job as a TransformerLens user writes them, on CPU, fp32.

torch, transformer_lens and sae_lens are NOT monojax dependencies: this module is imported only by
the benchmark, and every function imports them lazily (benchmarks/setup_anchors.sh makes a venv
with all three pinned).

  HookedTransformer   HookedTransformerConfig(n_layers=1, d_model, d_mlp, n_heads, d_head, n_ctx,
                      d_vocab, act_fn="relu", normalization_type="LN",
                      positional_embedding_type="standard"): the architecture monojax's
                      models/transformer.py mirrors (pre-LN, learned positions, ReLU MLP, separate
                      W_U). `load_monojax_params` copies a monojax LM into it (TL has an unembedding
                      bias monojax lacks: set to 0), so both sides start from the same weights, see
                      the same activations and, in the SAE jobs, the same sparsity.
  lm step             model(tokens, return_type="loss") (TL's built-in next-token loss), backward,
                      clip_grad_norm_(1.0) (monojax clips at global norm 1.0 too), AdamW.step,
                      zero_grad.
  co-trained job      the same LM step with a forward hook on blocks.0.mlp.hook_post keeping the
                      activations; then `positions` random positions per context are exchanged
                      with a [capacity, d_mlp] activation buffer (random distinct slots read, the
                      new vectors written there: monojax's buffer.exchange), and the rows read go
                      to one SAELens update (benchmarks/torch_sae_anchor.py's sae_lens_standard).
  frozen-LM job       torch.no_grad(): model.run_with_cache(tokens, stop_at_layer=1,
                      names_filter="blocks.0.mlp.hook_post") (SAELens' ActivationsStore does this),
                      then the same buffer exchange and SAELens update.
"""
from __future__ import annotations

import importlib.metadata
import os

HOOK = "blocks.0.mlp.hook_post"


def version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def available() -> dict:
  """{"torch", "sae_lens", "transformer_lens"} -> importable here (bool); imports them (slow: ~5 s)."""
  out = {}
  for name in ("torch", "sae_lens", "transformer_lens"):
    try:
      __import__(name)
      out[name] = True
    except Exception:  # noqa: BLE001 (any import failure means: not usable here)
      out[name] = False
  if out["torch"]:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
  return out


def make_model(*, d_model: int, d_mlp: int, n_heads: int, d_head: int, n_ctx: int, d_vocab: int, seed: int = 0):
  """A fp32 CPU HookedTransformer with monojax's architecture."""
  import torch
  from transformer_lens import HookedTransformer, HookedTransformerConfig
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = HookedTransformerConfig(n_layers=1, d_model=d_model, d_mlp=d_mlp, n_heads=n_heads, d_head=d_head, n_ctx=n_ctx,
                                d_vocab=d_vocab, act_fn="relu", normalization_type="LN",
                                positional_embedding_type="standard", device="cpu", seed=seed, dtype=torch.float32)
  model = HookedTransformer(cfg)
  model.train()
  return model


def load_monojax_params(model, params: dict) -> None:
  """Copies monojax LM parameters (nested numpy dict, as nnx.State.to_pure_dict() gives them) into
  the TL model, through the exporter's mapping (monojax/export/transformerlens.state_dict: W_Q/K/V
  [d, h, k] -> [h, d, k], everything else as is, W_pos cut to n_ctx, b_U = 0)."""
  import numpy as np
  import torch
  from monojax.export import transformerlens
  table = transformerlens.state_dict(params, n_ctx=model.cfg.n_ctx, d_vocab=model.cfg.d_vocab)
  sd = model.state_dict()
  missing = [k for k in table if k not in sd]
  if missing:
    raise KeyError(f"TransformerLens state dict has no {missing} (have {sorted(sd)[:8]}...)")
  with torch.no_grad():
    for k, v in table.items():
      v = np.asarray(v, np.float32)
      if tuple(sd[k].shape) != v.shape:
        raise ValueError(f"{k}: TL shape {tuple(sd[k].shape)} vs monojax {v.shape}")
      sd[k].copy_(torch.from_numpy(v.copy()))


def _autocast(on: bool):
  """torch.autocast("cpu", bfloat16) when on, else a no-op context."""
  import contextlib
  import torch
  return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def loss_on(model, tokens_np, autocast_bf16: bool = False) -> float:
  """TL's mean next-token loss on int tokens [B, T] (no grad; under CPU autocast bf16 if asked)."""
  import torch
  with torch.no_grad(), _autocast(autocast_bf16):
    return float(model(torch.from_numpy(tokens_np.astype("int64")), return_type="loss"))


def _adamw(model, *, lr, b1, b2, eps, weight_decay):
  import torch
  return torch.optim.AdamW(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)


def lm_step(model, *, lr: float, b1: float, b2: float, eps: float, weight_decay: float, grad_clip: float,
            fwd_hooks=(), autocast_bf16: bool = False):
  """step(tokens int64 [B, T]) -> None: one fp32 TL training step (with `fwd_hooks` attached), run
  to completion. autocast_bf16: the forward pass and loss under torch.autocast("cpu", bfloat16)
  (mixed precision as torch users write it: fp32 weights, gradients and AdamW; backward outside)."""
  import torch
  opt = _adamw(model, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  def step(tokens):
    with model.hooks(fwd_hooks=list(fwd_hooks)), _autocast(autocast_bf16):
      loss = model(tokens, return_type="loss")
    loss.backward()
    if grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)

  return step


class Buffer:
  """monojax's mixing buffer in torch: sample `positions` random positions per context, read that
  many random distinct rows of the buffer, write the new vectors into those rows."""

  def __init__(self, capacity: int, d: int, positions: int, seed: int = 0):
    import torch
    self.torch = torch
    self.acts = torch.zeros((capacity, d), dtype=torch.float32)
    self.positions = positions
    self.gen = torch.Generator().manual_seed(seed)
    self.filled = 0

  def sample(self, acts):  # acts [B, T, d] -> [B * positions, d]
    torch = self.torch
    B, T, d = acts.shape
    if self.positions >= T:
      return acts.reshape(B * T, d)
    idx = torch.rand((B, T), generator=self.gen).argsort(dim=1)[:, : self.positions]
    return torch.gather(acts, 1, idx[:, :, None].expand(B, self.positions, d)).reshape(-1, d)

  def fill(self, new) -> None:
    n = new.shape[0]
    start = (self.filled * n) % self.acts.shape[0]
    self.acts[start:start + n] = new
    self.filled += 1

  def exchange(self, new):
    torch = self.torch
    slots = torch.randperm(self.acts.shape[0], generator=self.gen)[: new.shape[0]]
    out = self.acts[slots]  # advanced indexing: a copy
    self.acts[slots] = new
    return out


def _hooked_acts(model):
  """(box, hook fn): the hook stores blocks.0.mlp.hook_post's output, detached, in box["acts"]."""
  box = {}

  def hook(act, hook):
    del hook
    box["acts"] = act.detach()

  return box, hook


def fill_buffer(model, buf: Buffer, token_batches) -> None:
  """Fills the buffer with TL activations (no grad), as the co-trained/frozen jobs' first steps do."""
  import torch
  for tokens in token_batches:
    with torch.no_grad():
      _, cache = model.run_with_cache(tokens, stop_at_layer=1, names_filter=HOOK)
    buf.fill(buf.sample(cache[HOOK]))


def cotrain_step(model, buf: Buffer, sae_anchor, *, lr: float, b1: float, b2: float, eps: float,
                 weight_decay: float, grad_clip: float):
  """step(tokens [B, T]) -> None: TL training step with a hook on HOOK, buffer exchange, SAELens update."""
  box, hook = _hooked_acts(model)
  lm = lm_step(model, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, grad_clip=grad_clip,
               fwd_hooks=[(HOOK, hook)])

  def step(tokens):
    lm(tokens)
    sae_anchor.step(buf.exchange(buf.sample(box.pop("acts"))))

  return step


def frozen_step(model, buf: Buffer, sae_anchor):
  """step(tokens [B, T]) -> None: TL forward up to the tap (no grad), buffer exchange, SAELens update."""
  import torch

  def step(tokens):
    with torch.no_grad():
      _, cache = model.run_with_cache(tokens, stop_at_layer=1, names_filter=HOOK)
    sae_anchor.step(buf.exchange(buf.sample(cache[HOOK])))

  return step
