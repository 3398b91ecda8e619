"""Decoder-only transformer in Flax NNX, shaped so TransformerLens can represent it exactly:
pre-LayerNorm blocks (attention, then a ReLU MLP), learned absolute or rotary positions, a final
LayerNorm and a separate (or optionally tied) unembedding. Parameter names follow TransformerLens
(W_E, W_pos, W_Q/K/V/O, W_in/W_out, W_U) so an export is a renaming.

`__call__` returns the final normalised residual stream and the MLP post-ReLU activations of every
layer (the SAE's input: the tap is a return value, so no sow/capture state can leak between steps).
The unembedding is separate (`unembed_weight`) so the loss can run on flattened, chunked hidden
states without ever materialising [B, T, vocab] logits.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axes of every parameter, by name; sharding.py maps logical axes to mesh axes.
PARAM_AXES = {
    "W_E": ("vocab", "embed"), "W_pos": (None, "embed"), "W_U": ("embed", "vocab"),
    "W_Q": ("embed", "heads", "head_dim"), "W_K": ("embed", "heads", "head_dim"),
    "W_V": ("embed", "heads", "head_dim"), "W_O": ("heads", "head_dim", "embed"),
    "b_Q": ("heads", "head_dim"), "b_K": ("heads", "head_dim"), "b_V": ("heads", "head_dim"), "b_O": ("embed",),
    "W_in": ("embed", "mlp"), "b_in": ("mlp",), "W_out": ("mlp", "embed"), "b_out": ("embed",),
    "w": ("embed",), "b": ("embed",),
}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # train.dtype -> compute dtype


def build_model(model_cfg, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, fp32 params) on the host; the caller places them on the mesh."""
  return nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(params=seed)), nnx.Param)


def abstract_model(model_cfg) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params as ShapeDtypeStructs): the structure, with no weights computed."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=0))), nnx.Param)


def compute_params(params, dtype):
  """bf16 compute from fp32 master weights (the loss stays fp32); fp32: the params as they are."""
  if dtype == jnp.float32:
    return params
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _normal(rngs, shape, std):
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class LayerNorm(nnx.Module):
  """TransformerLens 'LN': centre, scale to unit variance, then w * x + b (eps 1e-5)."""

  def __init__(self, d: int):
    self.w = nnx.Param(jnp.ones((d,), jnp.float32))
    self.b = nnx.Param(jnp.zeros((d,), jnp.float32))

  def __call__(self, x):
    return layer_norm(x, self.w[...], self.b[...])


def layer_norm(x, w, b):
  """TransformerLens 'LN' in fp32 (returned in x's dtype): also what analyses that re-run the final
  norm on an edited residual call (analysis/ablation.py)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 - x32.mean(-1, keepdims=True)
  x32 = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + 1e-5)
  return (x32 * w + b).astype(x.dtype)


def rotary(x, positions, base: float = 10_000.0):
  """GPT-NeoX / TransformerLens rotary embedding over the whole head dim (rotate-half layout)."""
  d = x.shape[-1]
  inv = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions[:, None].astype(jnp.float32) * inv[None, :]            # [T, d/2]
  cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None, :]         # [1, T, 1, d]
  sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, d_model: int, n_heads: int, d_head: int, positional: str, init_std: float, out_std: float,
               *, rngs: nnx.Rngs):
    self.positional = positional
    self.W_Q = nnx.Param(_normal(rngs, (d_model, n_heads, d_head), init_std))
    self.W_K = nnx.Param(_normal(rngs, (d_model, n_heads, d_head), init_std))
    self.W_V = nnx.Param(_normal(rngs, (d_model, n_heads, d_head), init_std))
    self.W_O = nnx.Param(_normal(rngs, (n_heads, d_head, d_model), out_std))
    self.b_Q = nnx.Param(jnp.zeros((n_heads, d_head), jnp.float32))
    self.b_K = nnx.Param(jnp.zeros((n_heads, d_head), jnp.float32))
    self.b_V = nnx.Param(jnp.zeros((n_heads, d_head), jnp.float32))
    self.b_O = nnx.Param(jnp.zeros((d_model,), jnp.float32))

  def __call__(self, x):
    T, d_head = x.shape[1], self.W_Q.shape[-1]
    q = jnp.einsum("btd,dhk->bthk", x, self.W_Q[...]) + self.b_Q[...]
    k = jnp.einsum("btd,dhk->bthk", x, self.W_K[...]) + self.b_K[...]
    v = jnp.einsum("btd,dhk->bthk", x, self.W_V[...]) + self.b_V[...]
    if self.positional == "rotary":
      pos = jnp.arange(T)
      q, k = rotary(q, pos), rotary(k, pos)
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) / math.sqrt(d_head)
    causal = jnp.tril(jnp.ones((T, T), bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    z = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return jnp.einsum("bqhk,hkd->bqd", z, self.W_O[...]) + self.b_O[...]


class MLP(nnx.Module):
  def __init__(self, d_model: int, d_mlp: int, init_std: float, out_std: float, *, rngs: nnx.Rngs):
    self.W_in = nnx.Param(_normal(rngs, (d_model, d_mlp), init_std))
    self.b_in = nnx.Param(jnp.zeros((d_mlp,), jnp.float32))
    self.W_out = nnx.Param(_normal(rngs, (d_mlp, d_model), out_std))
    self.b_out = nnx.Param(jnp.zeros((d_model,), jnp.float32))

  def __call__(self, x, replace=None):
    post = jax.nn.relu(x @ self.W_in[...] + self.b_in[...])   # the tap: MLP post-ReLU activations
    tapped = post
    if replace is not None:  # intervention: e.g. the SAE reconstruction, zeros, a clamped feature
      post = replace(post).astype(post.dtype)
    return post @ self.W_out[...] + self.b_out[...], tapped


class Block(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual writes shrink with depth
    self.ln1 = LayerNorm(cfg.d_model)
    self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.positional, cfg.init_std, out_std, rngs=rngs)
    self.ln2 = LayerNorm(cfg.d_model)
    self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.init_std, out_std, rngs=rngs)

  def __call__(self, x, replace=None):
    x = x + self.attn(self.ln1(x))
    out, post = self.mlp(self.ln2(x), replace)
    return x + out, post


class Transformer(nnx.Module):
  """cfg: model ConfigDict (d_model, d_mlp, n_layers, n_heads, d_head, vocab_size (padded),
  max_seq_len, positional, tied_embeddings, init_std)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    if cfg.positional not in ("learned", "rotary"):
      raise ValueError(f"model.positional must be 'learned' or 'rotary', got {cfg.positional!r}")
    self.W_E = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std))
    if cfg.positional == "learned":
      self.W_pos = nnx.Param(_normal(rngs, (cfg.max_seq_len, cfg.d_model), cfg.init_std))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.ln_final = LayerNorm(cfg.d_model)
    self.tied = cfg.tied_embeddings
    if not self.tied:
      self.W_U = nnx.Param(_normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std))

  def __call__(self, tokens, mlp_replace=None):
    """tokens int[B, T] -> (final normalised residual [B, T, d_model], [MLP post-ReLU [B, T, d_mlp] per layer]).

    mlp_replace: optional {layer: fn(post [B, T, d_mlp]) -> replacement}; the tapped activations
    returned are always the model's own (before replacement).
    """
    x = self._embed(tokens)
    posts = []
    for i, block in enumerate(self.blocks):
      x, post = block(x, (mlp_replace or {}).get(i))
      posts.append(post)
    return self.ln_final(x), posts

  def mlp_activations(self, tokens, upto: int):
    """[MLP post-ReLU of blocks 0..upto]: the forward pass cut after block `upto`'s MLP (no later
    blocks, no unembedding; TransformerLens' stop_at_layer). What a frozen-LM SAE step needs."""
    if not 0 <= upto < len(self.blocks):
      raise ValueError(f"layer {upto} is not in this {len(self.blocks)}-layer model")
    x = self._embed(tokens)
    posts = []
    for block in list(self.blocks)[:upto + 1]:
      x, post = block(x)
      posts.append(post)
    return posts

  def _embed(self, tokens):
    x = jnp.take(self.W_E[...], tokens, axis=0)
    if hasattr(self, "W_pos"):
      T = tokens.shape[1]
      if T > self.W_pos.shape[0]:
        raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len={self.W_pos.shape[0]}")
      x = x + self.W_pos[...][:T]
    return x

  def unembed_weight(self):
    return self.W_E[...].T if self.tied else self.W_U[...]
