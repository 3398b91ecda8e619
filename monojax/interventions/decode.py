"""Sampling from a run's LM with a key/value cache: a prefill over the prompt, then one token at a
time, so generation costs time linear in its length. The model module has no cache; this is a
second forward path over the same weights (and the model's own LayerNorm, MLP and rotary code) that
reproduces `Transformer.__call__` position by position: learned or rotary positions, tied or untied
unembedding, the vocabulary's padding columns never sampled. Feature edits (edit.py) can apply at
every position, the prompt's and the generated ones.

  out = generate(run, prompt_ids, samples=4, max_new_tokens=32, temperature=1.0, top_p=0.9, seed=0)
  out = generate(run, prompt_ids, sae="sae0", edits=[Edit(17, "clamp", 5.0)], seed=0)   # same draws

Token i of every row is drawn with jax.random.fold_in(key(seed), i): two calls with one seed use the
same random numbers, so their samples differ only where the model's distributions do.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from monojax import errors
from monojax.interventions import edit as edit_lib
from monojax.models import transformer

F32 = jnp.float32


def forward_chunk(model, tokens, start, caches, replace=None):
  """tokens int32[B, S] at positions start..start+S-1 through every block, attending to the cache
  (positions < start) and to themselves (causally); their keys and values are written into `caches`
  ((k, v) per layer, each [B, L, heads, d_head] in the compute dtype). replace: (layer, fn(post,
  start, S)) or None. Returns (final normalised residual [B, S, d_model], caches)."""
  S = tokens.shape[1]
  x = jnp.take(model.W_E[...], tokens, axis=0)
  if hasattr(model, "W_pos"):
    x = x + jax.lax.dynamic_slice_in_dim(model.W_pos[...], start, S, axis=0)
  positions = start + jnp.arange(S)
  new_caches = []
  for i, (block, (k_cache, v_cache)) in enumerate(zip(model.blocks, caches)):
    attn, h = block.attn, block.ln1(x)
    q = jnp.einsum("btd,dhk->bthk", h, attn.W_Q[...]) + attn.b_Q[...]
    k = jnp.einsum("btd,dhk->bthk", h, attn.W_K[...]) + attn.b_K[...]
    v = jnp.einsum("btd,dhk->bthk", h, attn.W_V[...]) + attn.b_V[...]
    if attn.positional == "rotary":
      q, k = transformer.rotary(q, positions), transformer.rotary(k, positions)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
    new_caches.append((k_cache, v_cache))
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k_cache).astype(F32) / math.sqrt(q.shape[-1])
    causal = jnp.arange(k_cache.shape[1])[None, :] <= positions[:, None]          # [S, L]
    scores = jnp.where(causal, scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    z = jnp.einsum("bhqs,bshk->bqhk", probs, v_cache)
    x = x + jnp.einsum("bqhk,hkd->bqd", z, attn.W_O[...]) + attn.b_O[...]
    fn = None
    if replace is not None and replace[0] == i:
      fn = functools.partial(replace[1], start=start, size=S)
    out, _ = block.mlp(block.ln2(x), fn)
    x = x + out
  return model.ln_final(x), tuple(new_caches)


def sample_token(logits, key, temperature, top_p):
  """int32[B] from logits f32[B, V]: argmax when temperature is 0, else a draw from softmax(logits /
  temperature) cut to its nucleus (the most probable tokens whose mass first reaches top_p; the top
  token always stays)."""
  greedy = jnp.argmax(logits, -1)
  order = jnp.argsort(-logits, axis=-1, stable=True)
  scaled = jnp.take_along_axis(logits, order, -1) / jnp.maximum(temperature, 1e-6)
  p = jax.nn.softmax(scaled, -1)
  keep = ((jnp.cumsum(p, -1) - p) < top_p) | (top_p >= 1.0)
  keep = keep.at[:, 0].set(True)
  choice = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1)
  drawn = jnp.take_along_axis(order, choice[:, None], -1)[:, 0]
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def generate_fn(graphdef, sae, dtype_name: str, vocab: int, max_new: int, params, sae_state, prompt,
                edits: edit_lib.EditArrays, key, temperature, top_p):
  """int32[B, max_new]: continuations of prompt int32[B, P]; `edits` (where: bool[E, B, P + max_new])
  applied at `sae`'s layer (sae None: the clean model). Static: graphdef, sae, dtype_name, vocab, max_new."""
  model = edit_lib._model(graphdef, dtype_name, params)
  B, P = prompt.shape
  L = P + max_new
  attn0 = model.blocks[0].attn
  shape = (B, L, attn0.W_K.shape[1], attn0.W_K.shape[2])
  dtype = transformer.DTYPES[dtype_name]
  caches = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in model.blocks)
  replace = None
  if sae is not None:
    def fn(post, start, size):
      where = jax.lax.dynamic_slice_in_dim(jnp.asarray(edits.where), start, size, axis=2)
      return edit_lib.edited_acts(sae_state, sae, post, edits._replace(where=where))
    replace = (sae.layer, fn)
  h, caches = forward_chunk(model, prompt, 0, caches, replace)
  first = sample_token(edit_lib._unembed(model, h[:, -1], vocab), jax.random.fold_in(key, 0), temperature, top_p)

  def step(carry, i):   # feeds token i (at position P + i), draws token i + 1
    caches, tok = carry
    h, caches = forward_chunk(model, tok[:, None], P + i, caches, replace)
    nxt = sample_token(edit_lib._unembed(model, h[:, 0], vocab), jax.random.fold_in(key, i + 1), temperature, top_p)
    return (caches, nxt), nxt
  _, rest = jax.lax.scan(step, (caches, first), jnp.arange(max_new - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(run, prompt, *, sae=None, edits=(), samples: int = 1, max_new_tokens: int = 32,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
  """int32[B · samples, N]: `samples` continuations of each prompt (int[P] or int[B, P]), N =
  min(max_new_tokens, model.max_seq_len − P) tokens. temperature 0: greedy. edits (Edit sequence):
  applied to `sae`'s features at its layer at every position (an Edit's positions count over the
  prompt and the continuation). Errors: empty or too long prompt, bad settings, bad edits."""
  prompt = np.asarray(prompt)
  if prompt.ndim == 1:
    prompt = prompt[None]
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise errors.UserInputError("prompt: no tokens to continue")
  max_len = int(run.cfg.model.max_seq_len)
  P = prompt.shape[1]
  if P >= max_len:
    raise errors.UserInputError(f"prompt: {P} tokens, but the model reads at most model.max_seq_len={max_len} "
                                "tokens in all (prompt and continuation)")
  if int(samples) < 1 or int(max_new_tokens) < 1:
    raise errors.UserInputError(f"samples ({samples}) and max_new_tokens ({max_new_tokens}) must be ≥ 1")
  if not (float(temperature) >= 0 and math.isfinite(float(temperature))):
    raise errors.UserInputError(f"temperature {temperature}: must be ≥ 0 (0: greedy)")
  if not 0 < float(top_p) <= 1:
    raise errors.UserInputError(f"top_p {top_p}: must be in (0, 1]")
  n = min(int(max_new_tokens), max_len - P)
  tokens = np.repeat(prompt.astype(np.int32), int(samples), axis=0)
  edits = edits if isinstance(edits, edit_lib.EditArrays) else list(edits)
  if sae is None and (isinstance(edits, edit_lib.EditArrays) or edits):
    raise errors.UserInputError("edits need an SAE (sae=...)")
  record = run.sae(sae) if sae is not None else None
  arrays = edit_lib.edit_arrays(edits, record, tokens.shape[0], P + n)   # no edits: no SAE needed
  out = generate_fn(run.graphdef, record, run.cfg.train.dtype, run.tokenizer.vocab_size, n, run.params,
                    run.sae_state, jnp.asarray(tokens), arrays, jax.random.key(int(seed)),
                    jnp.float32(temperature), jnp.float32(top_p))
  return np.asarray(out)
