"""The analysis pass: a run's LM and SAEs over held-out tokens, every statistic of every feature
and neuron merged on device (analysis/stats.py), then the feature database (analysis/database.py).

It streams (memory bounded for any number of tokens), shows progress with an ETA, saves its state
every `save_every_s` seconds into RUN/analysis.partial/ and resumes from it after an interruption
(a resumed pass writes exactly what an uninterrupted one would), and runs on the run's mesh
(data-parallel over the batch).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from monojax import errors
from monojax.analysis import database, stats
from monojax.sae import core as sae_core

PARTIAL = "analysis.partial"
FLUSH_EVERY = 16   # batches summed in fp32 on device before the float64 host totals take them
PAIR_MAX = 1 << 26  # cross-SAE activation sums (feature splitting) only for width_a·width_b up to this


@dataclasses.dataclass
class Options:
  tokens: int = 1_000_000
  saes: tuple[str, ...] | None = None   # SAE names/indices; None: all of the run's
  batch_size: int = 64                  # sequences per batch
  split: str = "analysis"
  save_every_s: float = 120.0
  proxies: bool = True
  out: str | None = None                # the database folder (default RUN/analysis)
  flush_every: int = FLUSH_EVERY         # batches summed on device between float64 flushes (and saves)
  stop_after_batches: int | None = None  # tests: stop as if interrupted after this many batches


def _fingerprint(run, opts: Options, saes, seq_len: int) -> str:
  d = {"workdir": run.workdir, "out": opts.out, "step": run.step, "tokens": opts.tokens, "saes": [s.name for s in saes],
       "batch": opts.batch_size, "flush": opts.flush_every, "split": opts.split, "seq_len": seq_len, "proxies": opts.proxies,
       "schema": database.SCHEMA, "processes": jax.process_count(), "window": [stats.LEFT, stats.RIGHT], "hist": list(stats.HIST_LOG10)}
  return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class Pass:
  """The jitted per-batch step and the accumulators of every unit."""

  def __init__(self, run, saes, n_proxies: int):
    self.run, self.saes = run, list(saes)
    d_mlp = run.cfg.model.d_mlp
    self.specs = {"neurons": stats.Spec(width=d_mlp, n_proxies=n_proxies)}
    for s in self.saes:
      self.specs[s.name] = stats.Spec(width=s.width, n_proxies=n_proxies, d_neurons=d_mlp)
    self.pairs = [(a.name, b.name) for i, a in enumerate(self.saes) for b in self.saes[i + 1:]
                  if a.layer == b.layer and a.width * b.width <= PAIR_MAX]
    layers = sorted({s.layer for s in self.saes} or {run.cfg.sae.layer})
    self.layer = layers[0]  # neurons are reported at the (first) SAE layer
    self.acts_fns = {l: run._mlp_acts_fn(l) for l in layers}
    self._step = jax.jit(self._make_step())

  def init(self) -> tuple[dict, dict]:
    accs = {u: stats.init(s) for u, s in self.specs.items()}
    pairs = {f"{a}__{b}": jnp.zeros((self.specs[a].width, self.specs[b].width)) for a, b in self.pairs}
    return accs, pairs

  def _make_step(self):
    specs, saes, layer, pairs = self.specs, self.saes, self.layer, self.pairs

    def step(params, sae_state, accs, pair_sums, tokens, seq0, labels):
      acts = {l: fn(params, tokens) for l, fn in self.acts_fns.items()}
      x = acts[layer]
      accs = dict(accs)
      accs["neurons"] = stats.update(specs["neurons"], accs["neurons"], x, seq0, proxies=labels)
      feats = {}
      for s in saes:
        xs = acts[s.layer]
        f = sae_core.encode(sae_state, s, xs.reshape(-1, xs.shape[-1])).astype(jnp.float32)
        feats[s.name] = f
        accs[s.name] = stats.update(specs[s.name], accs[s.name], f.reshape(*xs.shape[:-1], -1), seq0,
                                    neurons=xs, proxies=labels)
      pair_sums = {f"{a}__{b}": pair_sums[f"{a}__{b}"] + feats[a].T @ feats[b] for a, b in pairs}
      return accs, pair_sums
    return step

  def step(self, accs, pair_sums, tokens, seq0, labels):
    return self._step(self.run.params, self.run.sae_state, accs, pair_sums, tokens, jnp.int32(seq0), labels)


def _host_totals(accs, pair_sums) -> dict:
  """Additive sums moved to float64 host arrays."""
  out = {}
  for u, acc in accs.items():
    for k in stats.ADDITIVE:
      if k in acc:
        out[f"{u}/{k}"] = np.asarray(jax.device_get(acc[k]), np.float64)
  for k, v in pair_sums.items():
    out[f"pair/{k}"] = np.asarray(jax.device_get(v), np.float64)
  return out


def _add(total: dict, new: dict) -> dict:
  return {k: total.get(k, 0) + v for k, v in new.items()}


def run_pass(run, opts: Options, *, log=logging.info) -> str:
  """Runs (or resumes) the pass over `opts.tokens` tokens and writes RUN/analysis. Returns its path."""
  from monojax.analysis import finalize, proxies as proxies_lib  # noqa: PLC0415
  from monojax.corpus import build_corpus
  from monojax.data import pipeline

  if jax.process_count() > 1:
    raise errors.UserInputError("analyze: the pass runs in one process; open the run on one host (BUILD_NOTES.md, "
                                "known gaps)")
  saes = [run.sae(s) for s in opts.saes] if opts.saes else list(run.saes)
  seq_len = run.cfg.data.seq_len
  per_batch = opts.batch_size * seq_len
  n_batches = max(1, -(-int(opts.tokens) // per_batch))
  labeler = proxies_lib.ProxyLabeler(run.tokenizer) if opts.proxies else None
  n_prox = len(proxies_lib.PROXIES) if opts.proxies else 0
  ps = Pass(run, saes, n_prox)
  fp = _fingerprint(run, opts, saes, seq_len)

  out = os.path.abspath(os.path.expanduser(opts.out)) if opts.out else database.database_dir(run.workdir)
  database.check_writable(out)
  partial = out + ".partial" if opts.out else os.path.join(run.workdir, PARTIAL)
  accs, pair_sums = ps.init()
  totals: dict = {}
  done = 0
  label_sum = np.zeros(n_prox)
  label_sq = np.zeros(n_prox)
  state_path = os.path.join(partial, "state.npz")
  if os.path.exists(state_path):
    with np.load(state_path, allow_pickle=False) as z:
      if str(z["fingerprint"]) == fp:
        done = int(z["done"])
        totals = {k[2:]: z[k] for k in z.files if k.startswith("T:")}
        label_sum, label_sq = z["label_sum"], z["label_sq"]
        accs = {u: {k: (jnp.asarray(z[f"A:{u}/{k}"]) if f"A:{u}/{k}" in z.files else v) for k, v in acc.items()}
                for u, acc in accs.items()}
        accs = {u: stats.zero_additive(acc) for u, acc in accs.items()}
        log(f"analyze: resuming {partial} after {done} of {n_batches} batches")
      else:
        log(f"analyze: {partial} holds a pass with other settings; starting over")
        shutil.rmtree(partial)
  os.makedirs(partial, exist_ok=True)
  tok_path = os.path.join(partial, "tokens.bin")
  tokens_file_len = done * per_batch * 4
  with open(tok_path, "ab") as fh:
    fh.truncate(tokens_file_len)

  root = build_corpus.ensure_data_root(run.cfg.data, log=log)
  source = pipeline.analysis_source(run.cfg, root, opts.split)
  batches = pipeline.analysis_batches(run.cfg, run.tokenizer, root, run.mesh, split=opts.split,
                                      batch_size=opts.batch_size, start_batch=done, n_batches=n_batches - done)

  def save():  # called right after a flush: the device's additive sums are zero, totals are complete
    arrays = {f"T:{k}": v for k, v in totals.items()}
    for u, acc in accs.items():
      for k, v in acc.items():
        if k not in stats.ADDITIVE:
          arrays[f"A:{u}/{k}"] = np.asarray(jax.device_get(v))
    arrays.update(fingerprint=np.array(fp), done=np.array(done), label_sum=label_sum, label_sq=label_sq)
    tmp = state_path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, state_path)

  pair_sums_now = [pair_sums]
  t0 = last_log = last_save = time.perf_counter()
  start_done = done
  with open(tok_path, "ab") as tok_fh:
    for batch in batches:
      tokens = batch["tokens"][:, :-1]
      host_tokens = np.asarray(jax.device_get(tokens), np.int32)
      labels = None
      if labeler:  # labelled on the host; the totals from the host copy, the device gets it once
        host_labels = labeler.labels(host_tokens)
        lab = host_labels.reshape(n_prox, -1).astype(np.float64)
        label_sum, label_sq = label_sum + lab.sum(1), label_sq + (lab * lab).sum(1)
        labels = jnp.asarray(host_labels)
      accs, pair_sums_now[0] = ps.step(accs, pair_sums_now[0], tokens, done * opts.batch_size, labels)
      tok_fh.write(host_tokens.tobytes())
      done += 1
      now = time.perf_counter()
      if done % opts.flush_every == 0:  # flush (and maybe save) at fixed batch counts: resume = uninterrupted
        totals = _add(totals, _host_totals(accs, pair_sums_now[0]))
        accs = {u: stats.zero_additive(a) for u, a in accs.items()}
        pair_sums_now[0] = {k: jnp.zeros_like(v) for k, v in pair_sums_now[0].items()}
        stop = opts.stop_after_batches is not None and done - start_done >= opts.stop_after_batches
        if done < n_batches and (now - last_save > opts.save_every_s or stop):
          tok_fh.flush()
          save()
          last_save = time.perf_counter()
        if stop and done < n_batches:
          raise KeyboardInterrupt(f"analyze: stopped after {done} batches (stop_after_batches)")
      if now - last_log > 10 or done == n_batches:
        rate = (done - start_done) * per_batch / max(now - t0, 1e-9)
        eta = (n_batches - done) * per_batch / max(rate, 1e-9)
        log(f"analyze: {done * per_batch:,}/{n_batches * per_batch:,} tokens ({100 * done / n_batches:.0f}%), "
            f"{rate:,.0f} tokens/s, ETA {_duration(eta)}")
        last_log = now
  exhausted = done < n_batches
  totals = _add(totals, _host_totals(accs, pair_sums_now[0]))
  if done == 0:
    raise errors.MissingInputError(f"analyze: the {opts.split} split gave no batch of {opts.batch_size} sequences")
  if exhausted:
    log(f"analyze: the {opts.split} split ran out after {done * per_batch:,} tokens (asked {opts.tokens:,})")
  all_tokens = np.fromfile(tok_path, np.int32)[:done * per_batch].reshape(done * opts.batch_size, seq_len)
  device_accs = {u: {k: np.asarray(jax.device_get(v)) for k, v in acc.items() if k not in stats.ADDITIVE}
                 for u, acc in accs.items()}
  meta = {"run": run.workdir, "step": run.step, "n_tokens": int(done * per_batch), "n_sequences": int(all_tokens.shape[0]),
          "seq_len": seq_len, "asked_tokens": int(opts.tokens), "source": source, "batch_size": opts.batch_size,
          "seconds": round(time.perf_counter() - t0, 1), "window": [stats.LEFT, stats.RIGHT],
          "hist_log10": list(stats.HIST_LOG10), "layer": ps.layer}
  path = finalize.write_database(run, ps, meta, all_tokens, totals, device_accs, label_sum, label_sq,
                                 proxies_on=bool(labeler), out=out, log=log)
  shutil.rmtree(partial, ignore_errors=True)
  return path


def _duration(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
