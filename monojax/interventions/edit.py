"""Feature edits: a forward pass of the run's LM in which the MLP activations x at an SAE's layer
are replaced by x̂(f') + (x − x̂(f)) (paper-spec §6.4–6.5): the SAE's error term x − x̂(f) is kept,
and f' is the SAE's features f with chosen features clamped to a value, scaled by a factor or zeroed
at chosen positions. Everything is in the SAE's REPORTED feature units (`core.encode`, what
`Run.features` returns and the inspector shows), in which x̂ = f @ D + b (D the unit decoder rows,
`core.decoder_directions`), so the replacement is exactly x + (f' − f) @ D: positions and features
no edit changes keep their activations bit for bit.

  edits = [Edit(17, "clamp", 5.0), Edit(3, "zero"), Edit(9, "scale", 2.0, positions=[-1])]
  logits = intervened_logits(run, tokens, "sae0", edits)     # f32[B, T, vocab]
  shift = feature_shift(run, tokens, "sae0", edits)          # top tokens up/down, KL per position

Edits reach the jitted functions as arrays (`EditArrays`: feature ids int32[E], mode codes int32[E],
values f32[E], a position mask bool[E, B, T]), so one compiled program serves every edit set of a
given size. Edits apply in order: a later edit of the same feature acts on the earlier one's result.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monojax import errors
from monojax.models import transformer
from monojax.sae import catalogue
from monojax.sae import core as sae_core

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
MODES = {"clamp": 0, "scale": 1, "zero": 2}   # mode name -> code in EditArrays.modes
PAD = 8   # edit_arrays pads E to a multiple of this


@dataclasses.dataclass(frozen=True, eq=False)
class Edit:
  """One feature edit. mode "clamp": f_i := value (reported units); "scale": f_i := value · f_i;
  "zero": f_i := 0 (value ignored). positions: None (every position), positions in the sequence
  (ints; negative count from the end), or a mask bool[T] or bool[B, T]."""
  feature: int
  mode: str = "clamp"
  value: float = 0.0
  positions: object = None


class EditArrays(NamedTuple):
  """Edits as arrays (a pytree): ids int32[E], modes int32[E] (MODES), values f32[E], where bool[E, B, T]."""
  ids: jax.Array
  modes: jax.Array
  values: jax.Array
  where: jax.Array


def edit_arrays(edits, sae: catalogue.SAE, batch: int, length: int) -> EditArrays:
  """`edits` (a sequence of Edit, or an EditArrays passed through) as arrays for `batch` sequences of
  `length` tokens, checked against `sae` (feature ids in range, known modes, finite values). E is
  the number of edits rounded up to a multiple of PAD (the padding edits apply at no position)."""
  if isinstance(edits, EditArrays):
    return edits
  edits = list(edits)
  ids, modes, values = [], [], []
  where = np.ones((len(edits), batch, length), bool)
  for e, edit in enumerate(edits):
    if not isinstance(edit, Edit):
      raise errors.UserInputError(f"edit {e}: expected an interventions.Edit, got {type(edit).__name__}")
    feature = int(edit.feature)
    if not 0 <= feature < sae.width:
      raise errors.UserInputError(f"feature {feature}: {sae.name} has features 0..{sae.width - 1}")
    if edit.mode not in MODES:
      raise errors.UserInputError(f"feature {feature}: mode {edit.mode!r}; choose one of {', '.join(MODES)}")
    value = float(edit.value)
    if not np.isfinite(value):
      raise errors.UserInputError(f"feature {feature}: {edit.mode} value {value} is not finite")
    ids.append(feature)
    modes.append(MODES[edit.mode])
    values.append(value)
    where[e] = _position_mask(edit.positions, batch, length, feature)
  # Padded to a multiple of PAD with edits that change nothing (no position), so that edit sets of
  # similar sizes share one compiled program.
  pad = -len(edits) % PAD
  where = np.concatenate([where, np.zeros((pad, batch, length), bool)])
  return EditArrays(np.asarray(ids + [0] * pad, np.int32), np.asarray(modes + [MODES["zero"]] * pad, np.int32),
                    np.asarray(values + [0.0] * pad, np.float32), where)


def _position_mask(positions, batch: int, length: int, feature: int) -> np.ndarray:
  if positions is None:
    return np.ones((batch, length), bool)
  arr = np.asarray(positions)
  if arr.dtype == bool:
    if arr.shape not in ((length,), (batch, length)):
      raise errors.UserInputError(f"feature {feature}: a position mask must be [{length}] or [{batch}, {length}], "
                                  f"got {list(arr.shape)}")
    return np.broadcast_to(arr, (batch, length))
  if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer) and arr.size:
    raise errors.UserInputError(f"feature {feature}: positions must be ints or a bool mask, got {positions!r}")
  arr = arr.reshape(-1).astype(np.int64)
  bad = arr[(arr < -length) | (arr >= length)]
  if bad.size:
    raise errors.UserInputError(f"feature {feature}: position {int(bad[0])} is outside a sequence of {length} tokens")
  mask = np.zeros((length,), bool)
  mask[arr % length] = True
  return np.broadcast_to(mask, (batch, length))


# ------------------------------------------------------------------------------- pure functions

def edited_acts(sae_state, sae: catalogue.SAE, x, edits: EditArrays):
  """x̂(f') + (x − x̂(f)) = x + (f' − f) @ D (fp32 [..., d_in]) for MLP activations x [..., d_in];
  edits.where is bool[E, ...] over x's leading axes. Pure, jittable; any E (0 too)."""
  x = jnp.asarray(x).astype(F32)
  ids = jnp.asarray(edits.ids, jnp.int32)
  E = ids.shape[0]
  if E == 0:
    return x
  lead, d = x.shape[:-1], x.shape[-1]
  f = sae_core.encode(sae_state, sae, x.reshape(-1, d)).reshape(*lead, -1)
  original = jnp.take(f, ids, axis=-1)                          # [..., E]
  modes, values, where = (jnp.asarray(a) for a in (edits.modes, edits.values, edits.where))

  def one(e, current):   # in order: a later edit of a feature sees the earlier ones' result
    cur = jnp.take(current, e, axis=-1)
    mode, value = modes[e], values[e]
    new = jnp.where(mode == MODES["clamp"], value, jnp.where(mode == MODES["scale"], cur * value, 0.0))
    new = jnp.where(where[e], new, cur)
    return jnp.where(ids == ids[e], new[..., None], current)   # every column of this feature
  current = jax.lax.fori_loop(0, E, one, original)
  # A feature edited twice changes once: only its first column adds its change.
  first = ~jnp.any((ids[:, None] == ids[None, :]) & jnp.tril(jnp.ones((E, E), bool), -1), axis=1)
  delta = jnp.where(first, current - original, 0.0)
  dirs = jnp.take(sae_core.decoder_directions(sae_state, sae).astype(F32), ids, axis=0)   # [E, d]
  return x + jnp.matmul(delta, dirs, precision=HIGHEST)


def _model(graphdef, dtype_name: str, params):
  return nnx.merge(graphdef, transformer.compute_params(params, transformer.DTYPES[dtype_name]))


def _unembed(model, h, vocab: int):
  return jnp.einsum("...d,dv->...v", h, model.unembed_weight(), preferred_element_type=F32)[..., :vocab]


def _forward(graphdef, sae, dtype_name, vocab, params, sae_state, tokens, edits):
  model = _model(graphdef, dtype_name, params)
  replace = None
  if sae is not None:
    replace = {sae.layer: lambda post: edited_acts(sae_state, sae, post, edits)}
  h, _ = model(tokens, mlp_replace=replace)
  return _unembed(model, h, vocab)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def logits_fn(graphdef, sae, dtype_name: str, vocab: int, params, sae_state, tokens, edits: EditArrays):
  """Logits f32[B, T, vocab] of tokens int32[B, T] with `edits` applied at `sae`'s layer (sae None:
  the clean model). graphdef/sae/dtype_name (train.dtype)/vocab are static."""
  return _forward(graphdef, sae, dtype_name, vocab, params, sae_state, tokens, edits)


class Shift(NamedTuple):
  """What edits do to the next-token distribution, per position (numpy): kl f32[B, T] = KL(clean‖edited)
  in nats; up_ids/down_ids int32[B, T, k] the tokens whose log-prob rose/fell most, with their
  probabilities before (clean) and after (edited) f32[B, T, k]."""
  kl: np.ndarray
  up_ids: np.ndarray
  up_before: np.ndarray
  up_after: np.ndarray
  down_ids: np.ndarray
  down_before: np.ndarray
  down_after: np.ndarray


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def shift_fn(graphdef, sae, dtype_name: str, vocab: int, k: int, params, sae_state, tokens, edits: EditArrays):
  """Shift's fields (as jax arrays) of tokens int32[B, T] under `edits`; see `feature_shift`."""
  clean = jax.nn.log_softmax(_forward(graphdef, None, dtype_name, vocab, params, sae_state, tokens, edits), -1)
  edited = jax.nn.log_softmax(_forward(graphdef, sae, dtype_name, vocab, params, sae_state, tokens, edits), -1)
  diff = edited - clean
  kl = -jnp.sum(jnp.exp(clean) * diff, -1)             # Σ p_clean (log p_clean − log p_edited)
  _, up = jax.lax.top_k(diff, k)
  _, down = jax.lax.top_k(-diff, k)

  def probs(ids):
    return (jnp.exp(jnp.take_along_axis(clean, ids, -1)), jnp.exp(jnp.take_along_axis(edited, ids, -1)))
  return (jnp.maximum(kl, 0.0), up.astype(jnp.int32), *probs(up), down.astype(jnp.int32), *probs(down))


# ------------------------------------------------------------------------------------ the API

def _tokens(tokens) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim == 1:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.shape[1] == 0:
    raise errors.UserInputError(f"tokens: expected int[B, T] with T ≥ 1, got shape {list(tokens.shape)}")
  return tokens.astype(np.int32)


def intervened_logits(run, tokens, sae, edits):
  """Next-token logits f32[B, T, vocab] (padding columns dropped, as `Run.logits`) of model inputs
  tokens int[B, T] with `edits` (Edit sequence or EditArrays) applied to `sae`'s (name, index or
  record) features at its layer."""
  sae = run.sae(sae)
  tokens = _tokens(tokens)
  arrays = edit_arrays(edits, sae, *tokens.shape)
  return logits_fn(run.graphdef, sae, run.cfg.train.dtype, run.tokenizer.vocab_size, run.params, run.sae_state,
                   jnp.asarray(tokens), arrays)


def feature_shift(run, tokens, sae, edits, k: int = 5) -> Shift:
  """Per position of tokens int[B, T]: the k tokens whose next-token log-prob the edits raised and
  lowered most (with their probabilities before and after), and KL(clean‖edited) in nats."""
  sae = run.sae(sae)
  tokens = _tokens(tokens)
  arrays = edit_arrays(edits, sae, *tokens.shape)
  k = max(1, min(int(k), run.tokenizer.vocab_size))
  out = shift_fn(run.graphdef, sae, run.cfg.train.dtype, run.tokenizer.vocab_size, k, run.params, run.sae_state,
                 jnp.asarray(tokens), arrays)
  return Shift(*(np.asarray(a) for a in jax.device_get(out)))
