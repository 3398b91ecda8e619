"""Pure step functions. State is data: {"params", "opt", "step", "rng"}; the NNX module is merged
from a static graphdef inside the jitted function, so nothing outside is mutated.

The loss runs on flattened hidden states with the next-token shift done on *tokens* before the
model (never slicing [B, T, vocab] logits, whose backward pass is slow), and the unembedding +
cross-entropy is computed in chunks along the sequence with rematerialisation, so full logits and
their gradient never exist at once (at vocab 50k and a TPU-size batch they would not fit).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cross_entropy_terms(h, w_u, targets, vocab_size: int, chunk: int):
  """Sum of next-token cross-entropy (fp32, nats) and number of correct argmax predictions.

  h [B, T, d], w_u [d, V_padded], targets int[B, T]. Columns past `vocab_size` (padding) are masked.
  Everything runs on flattened [N, d] rows (2-D GEMMs; measured 4x faster to differentiate than the
  3-D einsum on CPU), and the target logit is h · w_u[:, target] (a gather of N columns, not a
  gather from the [N, V] logits, whose backward is a slow scatter).
  """
  B, T, d = h.shape
  V = w_u.shape[1]
  chunk = T if chunk <= 0 or chunk >= T or T % chunk else chunk
  pad_bias = jnp.where(jnp.arange(V) < vocab_size, 0.0, -1e30).astype(jnp.float32) if V > vocab_size else None

  def terms(hc, tc):  # hc [M, d], tc [M]
    logits = jnp.dot(hc, w_u, preferred_element_type=jnp.float32)
    if pad_bias is not None:
      logits = logits + pad_bias
    row_max = jax.lax.stop_gradient(logits.max(axis=-1))
    lse = row_max + jnp.log(jnp.exp(logits - row_max[:, None]).sum(-1))
    tgt = jnp.sum(hc.astype(jnp.float32) * jnp.take(w_u.T, tc, axis=0).astype(jnp.float32), axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == tc).sum()
    return (lse - tgt).sum(), correct

  if chunk == T:
    return terms(h.reshape(B * T, d), targets.reshape(B * T))
  n = T // chunk
  # [B, n, c, d] -> [n, B*c, d]: every chunk keeps the whole (data-sharded) batch.
  hs = h.reshape(B, n, chunk, d).swapaxes(0, 1).reshape(n, B * chunk, d)
  ts = targets.reshape(B, n, chunk).swapaxes(0, 1).reshape(n, B * chunk)
  chunk_terms = jax.checkpoint(terms)  # recompute each chunk's logits in the backward pass

  def body(carry, xs):
    ce, corr = chunk_terms(*xs)
    return (carry[0] + ce, carry[1] + corr), None

  (ce, correct), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (hs, ts))
  return ce, correct


def lm_forward(graphdef, params, tokens, *, vocab_size: int, dtype, loss_chunk: int, mlp_replace=None):
  """tokens int[B, T+1] -> (mean CE, aux{"ce_sum", "correct", "n", "mlp_post"}).

  mlp_replace: {layer: fn(post) -> replacement} spliced into the forward pass (loss recovered)."""
  if dtype != jnp.float32:  # bf16 compute from fp32 master weights; the loss stays fp32
    params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
  model = nnx.merge(graphdef, params)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  h, posts = model(inputs, mlp_replace)
  ce_sum, correct = cross_entropy_terms(h, model.unembed_weight(), targets, vocab_size, loss_chunk)
  n = targets.size
  return ce_sum / n, {"ce_sum": ce_sum, "correct": correct, "n": n, "mlp_post": posts}


def make_lm_update(graphdef, tx, schedule, *, vocab_size: int, dtype: str, loss_chunk: int, token_bytes,
                   inject_nan_step: int = -1):
  """(state, tokens) -> (state with new params/opt/step, metrics, MLP post-ReLU activations per layer).

  The activations come out of the same forward pass as the loss (has_aux), so co-training the SAE
  costs no second LM forward."""
  fwd = functools.partial(lm_forward, graphdef, vocab_size=vocab_size, dtype=DTYPES[dtype], loss_chunk=loss_chunk)

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


def make_lm_forward_only(graphdef, *, layer: int, dtype: str, **_):
  """The frozen-LM variant of make_lm_update: the SAEs need only block `layer`'s MLP activations, so
  the forward pass stops there (no later blocks, no unembedding: at vocab 50k the unembedding is
  ~95 % of the forward FLOPs). No gradient, no parameter change, no LM loss (the held-out SAE eval
  reports the clean loss); step += 1. Returns (state, {}, [posts of blocks 0..layer])."""
  def lm_forward_only(state, tokens):
    params = state["params"]
    if DTYPES[dtype] != jnp.float32:
      params = jax.tree.map(lambda p: p.astype(DTYPES[dtype]) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
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
