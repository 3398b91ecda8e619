"""One way to open a finished (or running) run: `Run.open(workdir, step=None)`.

Everything after training starts here: frozen-LM SAE training, the end-of-run preview, and every
later verb. A Run holds the resolved config (config.json), the tokenizer exactly as the run used
it (the copy in the workdir), the model (graphdef + params), the SAE state and its typed catalogue
(sae/catalogue.py), and jitted functions over them. It only reads: opening a run never writes to its
workdir, never trains a tokenizer and never moves a checkpoint.

  run = Run.open("runs/quickstart")
  for batch in run.held_out_batches(4):
    tokens = batch["tokens"][:, :-1]          # model inputs [B, T]
    acts = run.mlp_acts(tokens)               # [B, T, d_mlp] at the SAEs' layer
    f = run.features(tokens, run.saes[0])     # [B, T, width]
    logits = run.logits(tokens)               # [B, T, vocab]
"""
from __future__ import annotations

import functools
import logging
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monojax import checkpoint, config as config_lib, errors, sharding
from monojax.data import pipeline, tokenizer as tokenizer_lib
from monojax.models import transformer
from monojax.sae import catalogue, core as sae_core

# The SAE state's parts a run needs (the optimizer moments and the mixing buffer are never read).
_SAE_GROUP_PARTS = ("params", "last_fired", "fired_count", "fired_count_last")
_SAE_SCALARS = ("input_scale", "step", "density_tokens", "density_tokens_last")


class Run:
  """A run opened from its workdir. Attributes: workdir, cfg (resolved config), step (the
  checkpoint opened), tokenizer, graphdef, params, sae_state (None for an LM-only run), saes (the
  catalogue: tuple of sae.catalogue.SAE, in sae.saes order), mesh."""

  def __init__(self, *, workdir, cfg, step, tokenizer, graphdef, params, sae_state, saes, mesh, meta=None):
    self.workdir, self.cfg, self.step, self.tokenizer = workdir, cfg, step, tokenizer
    self.graphdef, self.params, self.sae_state, self.saes, self.mesh = graphdef, params, sae_state, saes, mesh
    self.meta = meta or {}  # the checkpoint's record (mode, SAEs, a frozen run's lm_source); {} for older runs
    self._jitted: dict = {}  # compiled functions of this run, by (what, argument)

  # ------------------------------------------------------------------------------------- opening

  @classmethod
  def open(cls, workdir: str, step: int | None = None, *, mesh=None, log=logging.info) -> Run:
    """Opens `workdir` at checkpoint `step` (default: the newest). `mesh`: where to place the
    parameters (default: data-parallel over this process's devices, whatever mesh the run trained
    on: orbax reshards on restore). Errors
    (errors.UserInputError) are one line naming the file and what was expected."""
    workdir = os.path.abspath(os.path.expanduser(str(workdir)))
    if not os.path.isdir(workdir):
      raise errors.MissingInputError(f"workdir: {workdir} is not a directory")
    cfg = config_lib.load_resolved(os.path.join(workdir, "config.json"))
    ckpt = _open_checkpoints(workdir)
    try:
      step = _pick_step(ckpt, step)
      tokenizer = _run_tokenizer(workdir, cfg, log)
      padded = tokenizer_lib.padded_vocab_size(tokenizer.vocab_size)
      if cfg.model.vocab_size is None:  # runs from before config.json held the resolved vocab
        cfg.model.vocab_size = padded
      elif cfg.model.vocab_size != padded:
        raise errors.RunFormatError(f"{workdir}: config.json says model.vocab_size {cfg.model.vocab_size}, its "
                                    f"tokenizer has {tokenizer.vocab_size} tokens (padded {padded})")
      if mesh is None:  # data-parallel over this process's devices: the run may have trained elsewhere
        mesh = sharding.make_mesh(types.SimpleNamespace(shape=(-1, 1), axes=tuple(cfg.mesh.axes)))
      graphdef, abstract_params = transformer.abstract_model(cfg.model)
      params_sh = sharding.tree_shardings(abstract_params, transformer.PARAM_AXES, mesh)
      abstract = {"params": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                         abstract_params, params_sh)}
      saved = _saved_structure(ckpt, step)
      meta = ckpt.read_meta(step) or {}
      saes = _catalogue(ckpt, step, cfg, saved)
      if saes:
        abstract["sae"] = _abstract_sae(saved["sae"], saes, mesh)
      _check_shapes(ckpt, step, abstract, saved)
      checkpoint.drop_closed_loop_callbacks()  # before the read: a failing one's callbacks can fire while it fails
      try:
        restored = ckpt.restore_parts(step, abstract)
      except Exception as e:  # noqa: BLE001 — orbax raises many types for unreadable files
        checkpoint.drop_closed_loop_callbacks()
        raise errors.RunFormatError(
            f"{ckpt.directory}/{step}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            + _older_hint(ckpt, step)) from None
    finally:
      ckpt.close()
    cfg.lock()
    return cls(workdir=workdir, cfg=cfg, step=step, tokenizer=tokenizer, graphdef=graphdef,
               params=restored["params"], sae_state=restored.get("sae"), saes=saes, mesh=mesh, meta=meta)

  # ---------------------------------------------------------------------------------- the SAEs

  def sae(self, which) -> catalogue.SAE:
    """A catalogue record by index (0), name ("sae0") or record."""
    if isinstance(which, catalogue.SAE):
      return which
    for s in self.saes:
      if which in (s.index, s.name):
        return s
    have = ", ".join(f"{s.name} [{s.label}]" for s in self.saes) or "none (an LM-only run)"
    raise errors.UserInputError(f"{self.workdir}: no SAE {which!r}; this run has {have}")

  def input_scale(self, sae) -> float:
    """The constant `sae` multiplies its inputs by: c with E‖c·x‖ = √n on the init sample (2024,
    topk, and 2023 with sae.normalize_inputs), 1.0 for an SAE on raw activations."""
    sae = self.sae(sae)
    return float(self.sae_state["input_scale"]) if sae.scaled else 1.0

  # ------------------------------------------------------------------------- jitted functions

  @property
  def compute_dtype(self):
    """The dtype the run's LM computed in (train.dtype): the activations its SAEs were trained on."""
    return transformer.DTYPES[self.cfg.train.dtype]

  def mlp_acts(self, tokens, layer: int | None = None):
    """MLP post-ReLU activations [B, T, d_mlp] (fp32) of model inputs tokens int[B, T] at `layer`
    (default: the SAEs' layer, sae.layer), computed as the run trained (train.dtype)."""
    layer = self.cfg.sae.layer if layer is None else int(layer)
    if not 0 <= layer < self.cfg.model.n_layers:
      raise errors.UserInputError(f"layer {layer}: the model has {self.cfg.model.n_layers} layer(s)")
    return self._mlp_acts_fn(layer)(self.params, jnp.asarray(tokens, jnp.int32))

  def features(self, tokens, sae):
    """Feature activations [B, T, width] (fp32, as the recipe reports them) of `sae` on model inputs
    tokens int[B, T]."""
    return self._features_fn(self.sae(sae))(self.params, self.sae_state, jnp.asarray(tokens, jnp.int32))

  def logits(self, tokens):
    """Next-token logits [B, T, vocab] (fp32; the tokenizer's vocabulary, padding columns dropped) of
    model inputs tokens int[B, T]."""
    return self._logits_fn()(self.params, jnp.asarray(tokens, jnp.int32))

  def held_out_batches(self, n: int):
    """The first n global batches {"tokens": int32[global_batch, seq_len + 1]} of the run's held-out
    (validation) split, in the fixed order every evaluation of the run reads. Builds the default
    corpus first if it is not on this machine (it is deterministic)."""
    from monojax.corpus import build_corpus  # the corpus package sits below the run loader
    root = build_corpus.ensure_data_root(self.cfg.data, log=logging.info)
    return pipeline.eval_batches(self.cfg, self.tokenizer, root, self.mesh, n_batches=n)

  def _cached(self, key, make):
    if key not in self._jitted:
      self._jitted[key] = make()
    return self._jitted[key]

  def _mlp_acts_fn(self, layer: int):
    return self._cached(("mlp_acts", layer), functools.partial(self._make_mlp_acts, layer))

  def _make_mlp_acts(self, layer: int):
    dtype = self.compute_dtype

    def acts(params, tokens):
      model = nnx.merge(self.graphdef, transformer.compute_params(params, dtype))
      return model.mlp_activations(tokens, upto=layer)[layer].astype(jnp.float32)
    return jax.jit(acts)

  def _features_fn(self, sae: catalogue.SAE):
    return self._cached(("features", sae), functools.partial(self._make_features, sae))

  def _make_features(self, sae: catalogue.SAE):
    acts_fn = self._mlp_acts_fn(sae.layer)

    def features(params, sae_state, tokens):
      x = acts_fn(params, tokens)
      f = sae_core.encode(sae_state, sae, x.reshape(-1, x.shape[-1]))
      return f.reshape(*x.shape[:-1], f.shape[-1])
    return jax.jit(features)

  def _logits_fn(self):
    return self._cached(("logits",), self._make_logits)

  def _make_logits(self):
    dtype, vocab = self.compute_dtype, self.tokenizer.vocab_size

    def logits(params, tokens):
      model = nnx.merge(self.graphdef, transformer.compute_params(params, dtype))
      h, _ = model(tokens)
      return jnp.einsum("btd,dv->btv", h, model.unembed_weight(), preferred_element_type=jnp.float32)[..., :vocab]
    return jax.jit(logits)

  def __repr__(self) -> str:
    saes = "; ".join(f"{s.name} [{s.label}] layer {s.layer}, input scale {self.input_scale(s):.4g}"
                     for s in self.saes) or "no SAEs"
    return f"Run({self.workdir}, step {self.step}, mode {self.cfg.mode}, {saes})"


# ------------------------------------------------------------------------------------- helpers

def check_workdir(workdir: str, flag: str = "--workdir") -> str:
  """A verb's --workdir: the absolute path of a monojax run, or a one-line error naming the flag."""
  path = os.path.abspath(os.path.expanduser(str(workdir)))
  if not os.path.isdir(path):
    raise errors.MissingInputError(f"{flag}={workdir}: not a directory (expected a run written by monojax.main)")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise errors.MissingInputError(f"{flag}={workdir}: no config.json there; not a monojax run")
  return path


def _open_checkpoints(workdir: str) -> checkpoint.Checkpointer:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise errors.RunFormatError(f"{workdir}: no checkpoints/ folder (a run saves one every train.ckpt_every steps "
                                "and at its end)")
  ckpt = checkpoint.Checkpointer(directory, read_only=True)
  if not ckpt.steps():
    unfinished = sorted(n for n in os.listdir(directory) if "tmp" in n)
    raise errors.RunFormatError(
        f"{directory}: no complete checkpoint" + (f" (only unfinished saves: {', '.join(unfinished[:3])})"
                                                  if unfinished else ""))
  return ckpt


def _pick_step(ckpt: checkpoint.Checkpointer, step: int | None) -> int:
  steps = ckpt.steps()
  if step is None:
    return steps[-1]
  if int(step) not in steps:
    raise errors.UserInputError(f"{ckpt.directory}: no checkpoint at step {step}; saved steps: "
                                f"{', '.join(map(str, steps))}")
  return int(step)


def _older_hint(ckpt: checkpoint.Checkpointer, step: int) -> str:
  older = [s for s in ckpt.steps() if s < step]
  return f"; an older step may open: step={older[-1]}" if older else ""


def _saved_structure(ckpt: checkpoint.Checkpointer, step: int) -> dict:
  try:
    return ckpt.saved_structure(step)
  except Exception as e:  # noqa: BLE001
    raise errors.RunFormatError(f"{ckpt.directory}/{step}: its state cannot be read ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})" + _older_hint(ckpt, step)) from None


def _run_tokenizer(workdir: str, cfg, log) -> tokenizer_lib.TextTokenizer:
  """The tokenizer as the run used it: its copy in the workdir, else the vendored NeoX one; a run
  written before the copy existed falls back to the cached BPE it was trained with (never retrains)."""
  path = tokenizer_lib.run_tokenizer_path(workdir)
  spec = cfg.data.tokenizer
  if path is None and spec.startswith("bpe:"):
    try:
      path = pipeline.bpe_cache_path(cfg.data, pipeline.corpus_root(cfg.data), log=log)
    except errors.UserInputError as e:
      raise errors.RunFormatError(f"{workdir}: no {tokenizer_lib.RUN_TOKENIZER_FILE} (a run from an older monojax) "
                                  f"and its corpus is not here to find the cached {spec} ({e})") from None
    if not os.path.exists(path):
      raise errors.RunFormatError(f"{workdir}: no {tokenizer_lib.RUN_TOKENIZER_FILE} (a run from an older monojax) "
                                  f"and no cached {spec} at {path}; it is never retrained for an existing run")
    log(f"run: {workdir} has no {tokenizer_lib.RUN_TOKENIZER_FILE} (an older run): using the cached {spec} at {path}")
  return tokenizer_lib.TextTokenizer(path or spec, max_chunk_chars=cfg.data.max_chunk_chars)


def _catalogue(ckpt: checkpoint.Checkpointer, step: int, cfg, saved: dict) -> tuple[catalogue.SAE, ...]:
  """The SAE records of the checkpoint's meta record; for a checkpoint from before records existed,
  derived from the config. Checked against the saved state's groups."""
  meta = ckpt.read_meta(step)
  where = f"{ckpt.directory}/{step}"
  if meta is not None:
    if meta.get("format", 0) > checkpoint.FORMAT:
      raise errors.RunFormatError(f"{where}: checkpoint record format {meta.get('format')} is newer than this "
                                  f"monojax reads ({checkpoint.FORMAT})")
    try:
      saes = catalogue.from_json(meta.get("saes", []))
    except (TypeError, ValueError) as e:
      raise errors.RunFormatError(f"{where}/meta: bad SAE records ({e})") from None
  elif cfg.mode in ("cotrain", "frozen") and cfg.sae.enabled:
    saes = catalogue.build(cfg.sae, cfg.model.d_mlp, cfg.sae.layer)
  else:
    saes = ()
  saved_groups = set(saved.get("sae", {}).get("groups", {})) if isinstance(saved.get("sae"), dict) else set()
  wanted = {s.group for s in saes}
  if wanted - saved_groups:
    raise errors.RunFormatError(f"{where}: the state holds SAE groups {sorted(saved_groups) or 'none'}, the run's "
                                f"records name {sorted(wanted)}")
  return saes


def _abstract_sae(saved_sae: dict, saes, mesh) -> dict:
  """Targets for the SAE parts a run reads, shaped as saved, sharded as training shards them."""
  def leaf(meta):
    return jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(meta.dtype))
  tree = {"groups": {g: {p: jax.tree.map(leaf, saved_sae["groups"][g][p]) for p in _SAE_GROUP_PARTS}
                     for g in sorted({s.group for s in saes})}}
  tree.update({k: leaf(saved_sae[k]) for k in _SAE_SCALARS})
  shardings = sae_core.shardings(tree, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _check_shapes(ckpt, step: int, abstract: dict, saved: dict) -> None:
  """The model the config describes must be the one saved (a clear line, not an orbax trace)."""
  want = checkpoint.flat_shapes(abstract)
  got = checkpoint.flat_shapes({k: saved[k] for k in abstract if k in saved})
  for name, shape in want.items():
    if name not in got:
      raise errors.RunFormatError(f"{ckpt.directory}/{step}: the saved state has no {name} (config.json and the "
                                  "checkpoint describe different models)")
    if got[name] != shape:
      raise errors.RunFormatError(f"{ckpt.directory}/{step}: {name} is saved as {got[name]}, config.json's model "
                                  f"needs {shape}")
