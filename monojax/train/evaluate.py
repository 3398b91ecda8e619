"""What the training loop reports: metric lines (console, metrics.jsonl, TensorBoard) with speed,
MFU and ETA, the non-finite check, and the held-out evaluations (LM loss against the unigram
entropy; SAE loss recovered, reconstruction and density)."""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from monojax import errors
from monojax.data import pipeline
from monojax.train import cotrain, metrics as metrics_lib


class TrainingDiverged(RuntimeError):
  """The loss or the gradient norm became NaN/Inf."""


def flatten(m) -> dict:
  """Device metrics (a dict, or `pack`ed) -> floats; per-SAE arrays become "sae<i>/<name>" entries."""
  if isinstance(m, Packed):
    return m.fetch()
  out = {}
  for k, v in jax.device_get(m).items():
    if k == "sae":
      for name, arr in v.items():
        for i, x in enumerate(np.asarray(arr).reshape(-1)):
          out[f"sae{i}/{name}"] = float(x)
    else:
      out[k] = float(v)
  return out


class Packed:
  """A step's float32 metrics concatenated on the device into one vector, so the one-step-late
  fetch is one transfer instead of one per metric (17 in a co-training step: ~0.3 ms of host time
  per step on CPU, benchmarks/loop_overhead.py). `fetch` returns exactly what
  `flatten` returns for the metrics dict: the same names in the same order, the same floats (a
  float32 converts to the same float either way)."""

  def __init__(self, vector, names: tuple, index: tuple):
    self.vector, self.names, self.index = vector, names, index

  def fetch(self) -> dict:
    # The loop's one fetch a step, explicit as jax.device_get is (so allowed where a transfer guard
    # disallows implicit ones), without device_get's copy_to_host_async: ~0.1 ms less host time a
    # step on CPU; the same values.
    with jax.transfer_guard_device_to_host("allow"):
      values = np.asarray(self.vector).tolist()
    return {name: values[i] for name, i in zip(self.names, self.index)}

  def block_until_ready(self):
    self.vector.block_until_ready()
    return self


_concat = jax.jit(lambda leaves: jnp.concatenate([jnp.ravel(x) for x in leaves]))
_layouts: dict = {}  # (metrics treedef, leaf shapes) -> (names, index into the vector) or None


def pack(m):
  """`m` (a step's device metrics) as a Packed vector when every metric is float32 (the vector is
  dispatched now and fetched later); otherwise `m` itself."""
  leaves, treedef = jax.tree.flatten(m)
  try:
    key = (treedef, tuple(x.shape for x in leaves))
  except AttributeError:  # not arrays
    return m
  layout = _layouts.get(key, False)
  if layout is False:
    layout = _layouts[key] = _layout(m, leaves, treedef)
  if layout is None:
    return m
  return Packed(_concat(leaves), *layout)


def _layout(m, leaves, treedef):
  """flatten's names, and for each the position of its value in the packed vector (found by
  flattening a stand-in whose values are those positions), or None if `m` cannot be packed."""
  if not leaves or any(not isinstance(x, jax.Array) or x.dtype != jnp.float32 for x in leaves):
    return None
  sizes = [int(np.prod(x.shape)) for x in leaves]
  starts = np.cumsum([0] + sizes)
  stand_in = jax.tree.unflatten(treedef, [np.arange(a, a + n, dtype=np.float64).reshape(x.shape)
                                          for a, n, x in zip(starts, sizes, leaves)])
  try:
    positions = flatten(stand_in)
  except (TypeError, ValueError):  # a shape flatten does not take: the dict path reports it, as before
    return None
  if sorted(int(p) for p in positions.values()) != list(range(int(starts[-1]))):
    return None  # flatten does not read each value exactly once: keep the dict
  return tuple(positions), tuple(int(p) for p in positions.values())


def check_finite(step: int, m: dict, saved_steps, ckpt_dir: str) -> None:
  """Raises TrainingDiverged naming the step and the last good checkpoint if a loss or the
  gradient norm is not finite. saved_steps: the checkpointed steps, or a callable returning them
  (called only on a failure)."""
  bad = [k for k, v in m.items() if (k in ("loss", "grad_norm") or k.endswith("/loss")) and not math.isfinite(v)]
  if bad:
    good = [s for s in (saved_steps() if callable(saved_steps) else saved_steps) if s < step]
    raise TrainingDiverged(
        f"non-finite training at step {step}: " + ", ".join(f"{k}={m[k]}" for k in bad) + "; stopped without "
        "saving. Last good checkpoint: " + (f"step {good[-1]} in {ckpt_dir}" if good else "none"))


def check_eval_finite(step: int, ev: dict, ckpt_dir: str) -> None:
  """The held-out losses and reconstruction metrics must be finite too (an undefined loss recovered
  is left out of the metrics, not NaN)."""
  watched = ("eval/loss", "sae_eval/loss_clean", "sae_eval/loss_zero_ablated", "_eval/loss_spliced", "_eval/mse",
             "_eval/l0", "_eval/loss_recovered")
  bad = [k for k, v in ev.items() if k.endswith(watched) and not math.isfinite(v)]
  if bad:
    raise TrainingDiverged(f"non-finite evaluation at step {step}: " + ", ".join(f"{k}={ev[k]}" for k in bad)
                           + f"; the checkpoint of step {step} in {ckpt_dir} holds these parameters")


class Reporter:
  """Turns each logged step's metrics into a console line (process 0) and a metrics row. Speed (and
  MFU, ETA) is measured over completed steps only: the loop calls `restart(step)` right after a sync
  point that follows anything that is not a training step (a compile at a phase change, an
  evaluation, a checkpoint save, the SAE's init or resampling), so no line is ever a timing
  artifact; a line with no step measured since shows "-" (NaN in metrics.jsonl)."""

  def __init__(self, writer, *, total: int, tokens_per_step: int, flops_per_token: float, peak: float, saes,
               is_main: bool, log, start: int = 0, clock=time.perf_counter, alarm_dead_frac: float = 0.9):
    self.writer, self.total, self.tokens_per_step = writer, total, tokens_per_step
    self.flops_per_token, self.peak, self.saes, self.is_main, self.log = flops_per_token, peak, saes, is_main, log
    self.clock, self.alarm_dead_frac = clock, alarm_dead_frac
    self.alarmed: set[str] = set()
    self.restart(start)

  def restart(self, synced_step: int) -> None:
    """Starts a new timing window at `synced_step`, whose work has completed."""
    self.window_step, self.window_t = synced_step, self.clock()

  def rate(self, synced_step: int) -> float:
    """Tokens/s over the steps completed since the window started (NaN when there are none)."""
    steps, dt = synced_step - self.window_step, self.clock() - self.window_t
    return steps * self.tokens_per_step / dt if steps > 0 and dt > 0 else float("nan")

  def report(self, step: int, m: dict) -> None:
    """Writes step `step`'s metrics; `step` has completed (its metrics were fetched)."""
    tok_s = self.rate(step)
    mfu = tok_s * self.flops_per_token / self.peak if math.isfinite(tok_s) else float("nan")
    eta = (self.total - step) * self.tokens_per_step / tok_s if math.isfinite(tok_s) else float("nan")
    m = dict(m, **self._alarms(m))
    self.writer.write(step, {**m, "tokens_per_s": tok_s, "mfu": mfu, "tokens_seen": step * self.tokens_per_step})
    if self.is_main:
      self.log("\n".join([metrics_lib.console_line(step, self.total, m, tok_s, mfu, eta)] + self._sae_lines(m)))

  def _alarms(self, m: dict) -> dict:
    """"<sae>/alarm" 1.0 while an SAE is dying (L0 < 1, or dead share > sae.alarm_dead_frac), with a
    WARNING line when it starts and a line when it ends."""
    out = {}
    for sae in self.saes:
      if f"{sae.name}/l0" not in m:
        continue
      l0, dead = m[f"{sae.name}/l0"], m.get(f"{sae.name}/dead_frac", 0.0)
      dying = l0 < 1.0 or dead > self.alarm_dead_frac
      out[f"{sae.name}/alarm"] = float(dying)
      if dying and sae.name not in self.alarmed and self.is_main:
        self.log(f"WARNING: {sae.name} [{sae.label}] is dying: L0 {l0:.2f}, {100 * dead:.0f}% of its features dead "
                 f"(alarm at L0 < 1 or > {100 * self.alarm_dead_frac:.0f}% dead); λ is likely too large for these "
                 "activations (sae.normalize_inputs, or a smaller λ)")
      elif not dying and sae.name in self.alarmed and self.is_main:
        self.log(f"{sae.name} [{sae.label}] recovered: L0 {l0:.2f}, {100 * dead:.0f}% dead")
      (self.alarmed.add if dying else self.alarmed.discard)(sae.name)
    return out

  def _sae_lines(self, m: dict) -> list[str]:
    lines = []
    for sae in self.saes:
      if f"{sae.name}/mse" not in m:
        continue
      g = lambda k: m.get(f"{sae.name}/{k}", float("nan"))  # noqa: E731
      lines.append(f"    {sae.name} [{sae.label}] mse {g('mse'):.4g} | fvu {g('fvu'):.3f} | L0 {g('l0'):.1f} | "
                   f"L1 {g('l1'):.3g} | dead {100 * g('dead_frac'):.1f}% | lr {g('lr'):.1e} | l1 coef {g('l1_coef'):.3g}"
                   + (" | DYING" if m.get(f"{sae.name}/alarm") else ""))
    return lines


class Evaluator:
  """The held-out evaluations, on the same batches every time (pipeline.eval_batches)."""

  def __init__(self, cfg, *, tokenizer, root, mesh, eval_step, sae_eval_step, saes, sae_from_step: int, log):
    self.cfg, self.tokenizer, self.root, self.mesh = cfg, tokenizer, root, mesh
    self.eval_step, self.sae_eval_step, self.saes = eval_step, sae_eval_step, saes
    self.sae_from_step, self.log = sae_from_step, log

  def __call__(self, step: int, state) -> dict:
    ev = self.lm(state["params"])
    self.log(f"eval at step {step}: loss {ev['eval/loss']:.4f} | acc {ev['eval/accuracy']:.3f} | "
             f"bits/byte {ev['eval/bits_per_byte']:.3f} | unigram entropy of these tokens "
             f"{ev['eval/unigram_entropy']:.4f} ({ev['eval/batches']} batches)")
    if self.saes and step >= self.sae_from_step:
      gaps = []

      def one(batch):
        out = self.sae_eval_step(state["params"], state["sae"], batch)
        c, z, n = (float(v) for v in jax.device_get((out["ce_clean"], out["ce_zero"], out["tokens"])))
        gaps.append((z - c) / n)
        return out
      sev = cotrain.summarize_eval(self._sums(one), self.cfg, gaps)
      ev.update(sev)
      self.log("\n".join(self._sae_lines(step, sev)))
    return ev

  def _sae_lines(self, step: int, sev: dict) -> list[str]:
    lines = [f"sae eval at step {step} on held-out tokens: LM loss clean {sev['sae_eval/loss_clean']:.4f}, "
             f"MLP zero-ablated {sev['sae_eval/loss_zero_ablated']:.4f}"]
    undefined = f"{self.saes[0].name}_eval/loss_recovered" not in sev
    if undefined:
      lines[0] += (f"; loss recovered is undefined: zero-ablating the MLP changes the loss by only "
                   f"{sev['sae_eval/ablation_gap']:+.4f} nats (noise ±{2 * sev['sae_eval/ablation_gap_se']:.4f}, "
                   f"sae.min_ablation_gap {self.cfg.sae.min_ablation_gap:g})")
    for sae in self.saes:
      g = lambda k: sev[f"{sae.name}_eval/{k}"]  # noqa: E731
      recovered = "loss recovered -" if undefined else f"loss recovered {100 * g('loss_recovered'):.1f}%"
      lines.append(f"    {sae.name} [{sae.label}] {recovered} (spliced "
                   f"{g('loss_spliced'):.4f}) | fvu {g('fvu'):.3f} | L0 {g('l0'):.1f} | dead {g('dead'):.0f} | "
                   f"ultralow {g('ultralow'):.0f} | dense {g('dense'):.0f} of {g('n_features'):.0f} features "
                   f"(on {g('n_tokens'):,.0f} tokens)")
    return lines

  def _batches(self):
    return pipeline.eval_batches(self.cfg, self.tokenizer, self.root, self.mesh)

  def lm(self, params) -> dict:
    """Held-out LM loss, accuracy, bits per byte, and the entropy of the targets' own unigram
    distribution (no unigram model can score below it)."""
    totals, n, counts = None, 0, np.zeros((self.tokenizer.vocab_size,), np.int64)
    for batch in self._batches():
      out = self.eval_step(params, batch)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
      for shard in batch["tokens"].addressable_shards:  # targets, once per replica, for the unigram baseline
        if shard.replica_id == 0:
          counts += np.bincount(np.asarray(shard.data)[:, 1:].reshape(-1), minlength=len(counts))
      n += 1
    if totals is None:
      raise errors.ConfigError(f"data.val_files: the validation split has fewer than one batch of "
                               f"{self.cfg.data.global_batch} x {self.cfg.data.seq_len + 1} tokens")
    t = jax.device_get(totals)
    if jax.process_count() > 1:  # every host saw only its own slice of the batch
      from jax.experimental import multihost_utils
      counts = np.asarray(multihost_utils.process_allgather(counts.astype(np.int32))).sum(0)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    return {"eval/loss": t["ce_sum"] / t["tokens"], "eval/accuracy": t["correct"] / t["tokens"],
            "eval/bits_per_byte": t["ce_sum"] / math.log(2) / max(t["bytes"], 1.0),
            "eval/unigram_entropy": unigram, "eval/batches": n}

  def _sums(self, fn) -> dict:
    """Sums fn(batch) over the held-out batches."""
    totals = None
    for batch in self._batches():
      out = fn(batch)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    return jax.device_get(totals)
