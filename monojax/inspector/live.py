"""Live activations of any text for the TextInspector: what every feature of one unit (the MLP
neurons, or one SAE) does on each token of a text the reader types.

  live.text_activations(run, "The cat sat", "sae0")
  -> {"unit": "sae0", "n_tokens": 3, "truncated": False, "seq_len": 128, "tokens": [...],
      "pieces": ["The", " cat", " sat"], "features": [[[17, 2.5], [3, 0.25]], ...], "active": [2, ...]}

The text is tokenized as one training document is (without its EOS) and cut into consecutive
contexts of seq_len tokens, each run from its start as training runs its windows. The contexts are
padded to one fixed batch (max_tokens worth), so each unit compiles once, whatever the text's length.
"""
from __future__ import annotations

import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from monojax import errors, text as text_lib
from monojax.inspector import tokens as tokens_lib

NEURONS = "neurons"


_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_bytes(tokenizer) -> tokens_lib.TokenBytes:
  """The tokenizer's byte table, built once per tokenizer (~50k entries for NeoX)."""
  if tokenizer not in _TOKEN_BYTES:
    _TOKEN_BYTES[tokenizer] = tokens_lib.TokenBytes(tokenizer)
  return _TOKEN_BYTES[tokenizer]


def unit_names(run) -> list[str]:
  """The units a text can be read with: "neurons" (the SAEs' MLP layer), then every SAE by name."""
  return [NEURONS, *(s.name for s in run.saes)]


def tokenize(run, text: str) -> np.ndarray:
  """int32[N]: `text` as the run tokenizes one document (long texts in the same pieces), minus the
  EOS that training appends after it."""
  return run.tokenizer.encode_documents([text])[:-1]


def text_activations(run, text: str, unit: str, *, max_tokens: int = 1024, top_k: int = 32) -> dict:
  """The `top_k` strongest active features (activation > 0) of `unit` on each of the first
  `max_tokens` tokens of `text`, as JSON-ready plain Python (see the module docstring)."""
  units = unit_names(run)
  if unit not in units:
    raise errors.UserInputError(f"unit {text_lib.visible(str(unit))[:80]!r}: this run has {', '.join(units)}")
  if not isinstance(text, str):
    raise errors.UserInputError(f"text: a string is needed, got {type(text).__name__}")
  if int(max_tokens) < 1 or int(top_k) < 1:
    raise errors.UserInputError(f"max_tokens ({max_tokens}) and top_k ({top_k}) must be ≥ 1")
  seq_len = int(run.cfg.data.seq_len)
  ids = tokenize(run, text)
  truncated = ids.size > max_tokens
  ids = ids[:max_tokens]
  n = int(ids.size)
  out = {"unit": unit, "n_tokens": n, "truncated": bool(truncated), "seq_len": seq_len,
         "tokens": [int(i) for i in ids], "pieces": token_bytes(run.tokenizer).pieces(ids),
         "features": [], "active": []}
  if n == 0:
    return out
  # One fixed shape per (max_tokens, seq_len): the padding (token 0) sits after every real token, so
  # causal attention keeps it from changing them, and its positions are dropped below.
  n_ctx = -(-int(max_tokens) // seq_len)
  batch = np.zeros((n_ctx * seq_len,), np.int32)
  batch[:n] = ids
  batch = batch.reshape(n_ctx, seq_len)
  acts = run.mlp_acts(batch) if unit == NEURONS else run.features(batch, unit)
  k = min(int(top_k), int(acts.shape[-1]))
  # The top k and the counts on device: only [tokens, k] crosses to the host, not [tokens, width].
  values, indices, active = jax.device_get(_top_k(acts, k))
  values = values.reshape(-1, k)[:n]
  indices = indices.reshape(-1, k)[:n]
  active = active.reshape(-1)[:n]
  for vals, idx, n_active in zip(values, indices, active):
    out["features"].append([[int(i), float(v)] for i, v in zip(idx, vals) if v > 0])
    out["active"].append(int(n_active))
  return out


@functools.partial(jax.jit, static_argnames="k")
def _top_k(acts, k: int):
  """(values f32[..., k] descending — ties: lower index first, indices i32[..., k], count of > 0)."""
  acts = acts.astype(jnp.float32)
  values, indices = jax.lax.top_k(acts, k)
  return values, indices.astype(jnp.int32), jnp.sum(acts > 0, axis=-1, dtype=jnp.int32)


STEER_MAX_NEW, STEER_MAX_PROMPT = 48, 2000


def steer(run, query: dict) -> dict:
  """The steering panel: `query` {"unit": an SAE, "feature": int, "value": float, "prompt": str,
  "max_new_tokens": int, "seed": int} → greedy-free samples (temperature 1, top_p 0.9) of the
  continuation with the feature clamped to `value` at every position and without (the same random
  draws), and the next-token shift after the prompt. JSON-ready."""
  from monojax import interventions
  unit = query.get("unit")
  saes = {s.name: s for s in run.saes}
  if unit not in saes:
    raise errors.UserInputError(f"unit: one of {', '.join(saes) or 'no SAE'} expected")
  sae = saes[unit]
  feature, value, prompt = query.get("feature"), query.get("value"), query.get("prompt")
  if not isinstance(feature, int) or isinstance(feature, bool) or not 0 <= feature < sae.width:
    raise errors.UserInputError(f"feature: an integer in 0..{sae.width - 1} expected")
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(float(value)) <= 1e4:
    raise errors.UserInputError("value: a number with |value| ≤ 10000 expected")
  if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > STEER_MAX_PROMPT:
    raise errors.UserInputError(f"prompt: a non-empty string of at most {STEER_MAX_PROMPT} characters expected")
  n_new = query.get("max_new_tokens", 24)
  seed = query.get("seed", 0)
  if not isinstance(n_new, int) or not 1 <= n_new <= STEER_MAX_NEW:
    raise errors.UserInputError(f"max_new_tokens: an integer in 1..{STEER_MAX_NEW} expected")
  if not isinstance(seed, int) or not 0 <= seed < 2**31:
    raise errors.UserInputError("seed: a non-negative integer expected")
  ids = tokenize(run, prompt)
  if not ids.size:
    raise errors.UserInputError("prompt: no tokens")
  # A long prompt keeps its end: the model reads at most max_seq_len tokens, continuation included.
  max_len = int(run.cfg.model.max_seq_len)
  n_new = min(n_new, max(1, max_len // 2))
  cut = ids.size > max_len - n_new
  ids = ids[-(max_len - n_new):]
  edits = [interventions.Edit(int(feature), "clamp", float(value))]
  kw = {"samples": 1, "max_new_tokens": n_new, "temperature": 1.0, "top_p": 0.9, "seed": seed}
  clean = interventions.generate(run, ids, **kw)[0]
  edited = interventions.generate(run, ids, sae=sae, edits=edits, **kw)[0]
  shift = interventions.feature_shift(run, ids[None], sae, edits, k=5)
  tb = token_bytes(run.tokenizer)
  last = len(ids) - 1
  moved = lambda ids_, before, after: [[tb.vocab[int(t)], float(b), float(a)]  # noqa: E731
                                       for t, b, a in zip(ids_[0, last], before[0, last], after[0, last])]
  return {"unit": unit, "feature": feature, "value": float(value), "prompt_tokens": int(len(ids)), "prompt_cut": bool(cut),
          "new_tokens": int(n_new),
          "clean": tb.pieces_text(clean), "edited": tb.pieces_text(edited), "kl": float(shift.kl[0, last]),
          "up": moved(shift.up_ids, shift.up_before, shift.up_after),
          "down": moved(shift.down_ids, shift.down_before, shift.down_after)}
