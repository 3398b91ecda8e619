"""Pure step functions. State is data: {"params", "opt", "step", "rng"}; the NNX module is merged
from a static graphdef inside the jitted function, so nothing outside is mutated.

The loss runs on flattened hidden states with the next-token shift done on *tokens* before the
model (never slicing [B, T, vocab] logits, whose backward pass is slow), and the unembedding +
cross-entropy is computed in chunks along the sequence, so full logits and their gradient never
exist at once (at vocab 50k and a TPU-size batch they would not fit); on one CPU device a C++
kernel computes each chunk's loss and logit gradient in one pass (train/cross_entropy.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from monojax.models import transformer
from monojax.train.cross_entropy import cross_entropy_terms, use_kernel  # noqa: F401 (re-exported)

DTYPES = transformer.DTYPES

def lm_forward(graphdef, params, tokens, *, vocab_size: int, dtype, loss_chunk: int, mlp_replace=None,
               ce_kernel: bool = False):
  """tokens int[B, T+1] -> (mean CE, aux{"ce_sum", "correct", "n", "mlp_post"}).

  mlp_replace: {layer: fn(post) -> replacement} spliced into the forward pass (loss recovered).
  ce_kernel: the CPU cross-entropy kernel (train/cross_entropy.py; decided by `use_kernel`)."""
  model = nnx.merge(graphdef, transformer.compute_params(params, dtype))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  h, posts = model(inputs, mlp_replace)
  ce_sum, correct = cross_entropy_terms(h, model.unembed_weight(), targets, vocab_size, loss_chunk, ce_kernel)
  n = targets.size
  return ce_sum / n, {"ce_sum": ce_sum, "correct": correct, "n": n, "mlp_post": posts}


def make_lm_update(graphdef, tx, schedule, *, vocab_size: int, dtype: str, loss_chunk: int, token_bytes,
                   inject_nan_step: int = -1, ce_kernel: str = "auto", mesh=None):
  """(state, tokens) -> (state with new params/opt/step, metrics, MLP post-ReLU activations per layer).

  The activations come out of the same forward pass as the loss (has_aux), so co-training the SAE
  costs no second LM forward."""
  fwd = functools.partial(lm_forward, graphdef, vocab_size=vocab_size, dtype=DTYPES[dtype], loss_chunk=loss_chunk,
                          ce_kernel=use_kernel(ce_kernel, None if mesh is None else mesh.size))

  def lm_update(state, tokens):
    def loss_fn(params):
      loss, aux = fwd(params, tokens)
      if inject_nan_step > 0:  # test hook: a NaN loss (and gradients) in the update that makes step k
        loss = loss * jnp.where(state["step"] + 1 == inject_nan_step, jnp.nan, 1.0)
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = _lm_metrics(loss, aux, tokens, token_bytes)
    metrics.update(grad_norm=grad_norm, lr=schedule(state["step"]))
    new_state = dict(state, params=params, opt=opt, step=state["step"] + 1)
    return new_state, metrics, aux["mlp_post"]

  return lm_update


def make_lm_forward_only(graphdef, *, layer: int, dtype: str):
  """The frozen-LM variant of make_lm_update: the SAEs need only block `layer`'s MLP activations, so
  the forward pass stops there (no later blocks, no unembedding: at vocab 50k the unembedding is
  ~95 % of the forward FLOPs). No gradient, no parameter change, no LM loss (the held-out SAE eval
  reports the clean loss); step += 1. Returns (state, {}, [posts of blocks 0..layer])."""
  def lm_forward_only(state, tokens):
    params = transformer.compute_params(state["params"], DTYPES[dtype])
    posts = nnx.merge(graphdef, params).mlp_activations(tokens[:, :-1], upto=layer)
    return dict(state, step=state["step"] + 1), {}, posts

  return lm_forward_only


def _lm_metrics(loss, aux, tokens, token_bytes) -> dict:
  n_bytes = token_bytes[tokens[:, 1:]].sum()
  return {"loss": loss, "accuracy": aux["correct"] / aux["n"],
          "bits_per_byte": aux["ce_sum"] / jnp.log(2.0) / jnp.maximum(n_bytes, 1)}


def make_train_step(graphdef, tx, schedule, **kw):
  """The LM training step: (state, batch) -> (state, metrics). Metrics are fp32 scalars."""
  lm_update = make_lm_update(graphdef, tx, schedule, **kw)

  def train_step(state, batch):
    new_state, metrics, _ = lm_update(state, batch["tokens"])
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, *, vocab_size: int, dtype: str, loss_chunk: int, token_bytes):
  """(params, batch) -> sums {"ce_sum", "correct", "tokens", "bytes"} to be added over batches."""
  fwd = functools.partial(lm_forward, graphdef, vocab_size=vocab_size, dtype=DTYPES[dtype], loss_chunk=loss_chunk)

  def eval_step(params, batch):
    tokens = batch["tokens"]
    _, aux = fwd(params, tokens)
    return {"ce_sum": aux["ce_sum"], "correct": aux["correct"].astype(jnp.float32),
            "tokens": jnp.float32(aux["n"]), "bytes": token_bytes[tokens[:, 1:]].sum().astype(jnp.float32)}

  return eval_step
