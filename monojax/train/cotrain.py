"""SAEs trained inside the LM's jitted step: the phase plan, the step variants and the SAE eval.

One step function, three phases decided by the step number (so resume needs no extra state):
  lm     step < sae.start_step                     LM update only (the LM warms up first)
  fill   start_step <= step < init_step            LM update + sampled activations fill the buffer
  train  step >= init_step                         LM update + buffer exchange + SAE update(s)
The SAE state is initialised from the full buffer (geometric median, input scale) right after the
last fill step. In frozen mode (configs/sae.py) the same step runs with the LM forward only.
The SAE part of the state exists (zero-initialised) from step 0, so the checkpoint structure never
changes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from monojax import errors
from monojax.sae import buffer as buffer_lib, core as sae_core, metrics as sae_metrics
from monojax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Plan:
  start: int              # first LM step (0-based) whose activations are sampled
  positions: int          # positions sampled per context
  per_step: int           # vectors exchanged with the buffer per LM step
  updates_per_step: int   # SAE updates per LM step (per_step / sae.batch_size)
  capacity: int           # buffer rows
  init_step: int          # state["step"] value at which the SAE is initialised from the buffer
  total_sae_steps: int    # SAE updates in the run

  def phase(self, step: int) -> str:
    return "lm" if step < self.start else ("fill" if step < self.init_step else "train")


def make_plan(cfg, total_lm_steps: int) -> Plan:
  s = cfg.sae
  T = cfg.data.seq_len
  positions = min(int(s.positions_per_context), T)
  per_step = cfg.data.global_batch * positions
  if per_step % s.batch_size:
    raise errors.ConfigError(
        f"sae.batch_size={s.batch_size} must divide data.global_batch x sae.positions_per_context = "
        f"{cfg.data.global_batch} x {positions} = {per_step} (each sampled vector is used exactly once)")
  capacity = per_step * int(s.buffer_steps)
  start = int(s.start_step)
  init_step = start + int(s.buffer_steps)
  updates = per_step // s.batch_size
  total_sae = (total_lm_steps - init_step) * updates
  if total_sae <= 0:
    raise errors.ConfigError(
        f"train.steps={total_lm_steps} leaves no SAE steps: the SAE starts sampling at sae.start_step={start} and "
        f"needs sae.buffer_steps={s.buffer_steps} steps to fill its buffer")
  return Plan(start, positions, per_step, updates, capacity, init_step, total_sae)


def initial_sae_state(cfg, d_in: int, plan: Plan, mesh):
  """(SAE state, its shardings): the final structure, placed, held until `init_from_buffer` replaces
  it with the state initialised on the first buffered activations (the paper's geometric-median
  b_d needs them); the steps before that do not read it."""
  state = sae_core.init_state(cfg.sae, d_in, jax.random.key(0), jnp.ones((8, d_in), jnp.float32),
                              plan.total_sae_steps)
  shardings = sae_core.shardings(state, mesh)
  return jax.device_put(state, shardings), shardings


def with_sae_and_buffer(cfg, lm_state: dict, lm_shardings: dict, d_in: int, plan: Plan, mesh):
  """The LM state plus the pre-init SAE state (`initial_sae_state`) and an empty mixing buffer, and
  the matching shardings: the state every co-training / frozen step takes."""
  sae_state, sae_shardings = initial_sae_state(cfg, d_in, plan, mesh)
  state = dict(lm_state, sae=sae_state, buffer=buffer_lib.init(plan.capacity, d_in, mesh))
  return state, dict(lm_shardings, sae=sae_shardings, buffer=buffer_lib.shardings(mesh))


def make_init_from_buffer(cfg, d_in: int, plan: Plan, sae_shardings):
  """(buffer acts, key) -> fresh SAE state initialised on the buffer's activations, placed with
  `sae_shardings` (runs once per run, eagerly: the geometric median iterates on the host)."""
  n = min(plan.capacity, int(cfg.sae.init_inputs))

  def init(acts, key):
    state = sae_core.init_state(cfg.sae, d_in, key, acts[:n], plan.total_sae_steps)
    return jax.device_put(state, sae_shardings)

  return init


def make_step(cfg, phase: str, plan: Plan, lm_update, groups, mesh, layer: int):
  """(state, batch) -> (state, metrics) for one phase; state = LM state + "sae" + "buffer"."""
  sae_update = functools.partial(sae_core.update, cfg.sae, tuple(groups), plan.total_sae_steps)
  rows = NamedSharding(mesh, P("data", None))

  def step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    k_pos, k_ex, k_sae = jax.random.split(key, 3)
    state, metrics, posts = lm_update(state, batch["tokens"])
    if phase == "lm":
      return state, metrics
    acts = jax.lax.stop_gradient(posts[layer]).astype(jnp.float32)
    new = jax.lax.with_sharding_constraint(buffer_lib.sample_positions(acts, plan.positions, k_pos), rows)
    if phase == "fill":
      return dict(state, buffer=buffer_lib.fill(state["buffer"], new, mesh)), metrics
    buf, x = buffer_lib.exchange(state["buffer"], new, k_ex, mesh)
    sae_state = state["sae"]
    xs = x.reshape(plan.updates_per_step, -1, x.shape[-1])
    sae_metrics_all = []
    for i in range(plan.updates_per_step):  # small static count (per_step / batch): unrolled
      sae_state, m = sae_update(sae_state, xs[i], jax.random.fold_in(k_sae, i))
      sae_metrics_all.append(m)
    metrics = dict(metrics, sae=jax.tree.map(lambda *v: jnp.mean(jnp.stack(v), 0), *sae_metrics_all))
    return dict(state, buffer=buf, sae=sae_state), metrics

  return step


def make_resample(cfg, groups, plan: Plan, sae_shardings):
  """jit: (sae state, buffer acts, key) -> (sae state, info); the buffer is the loss sample."""
  fn = functools.partial(sae_core.maybe_resample, cfg.sae, tuple(groups))

  def resample(sae_state, acts, key):
    return fn(sae_state, acts, key, plan.total_sae_steps)

  return jax.jit(resample, out_shardings=(sae_shardings, None), donate_argnums=0)


EVAL_CHUNK_ELEMENTS = 2**24  # rows x features of an SAE's activations alive at once in the eval (64 MB fp32)


def chunk_rows(n_rows: int, width: int, elements: int | None = None) -> int:
  """Rows per chunk so that a [rows, width] fp32 block stays within `elements` (EVAL_CHUNK_ELEMENTS)."""
  elements = EVAL_CHUNK_ELEMENTS if elements is None else elements
  return max(1, min(n_rows, elements // max(width, 1)))


def padded_chunks(x, rows: int):
  """x [N, d] -> (chunks [n, rows, d] zero-padded, valid bool [n, rows])."""
  N = x.shape[0]
  n = -(-N // rows)
  xp = jnp.pad(x, ((0, n * rows - N), (0, 0))).reshape(n, rows, x.shape[1])
  return xp, (jnp.arange(n * rows) < N).reshape(n, rows)


def chunked_sums(fn, x, rows: int):
  """Σ over row chunks of fn(chunk [rows, d], valid bool [rows]) -> pytree of sums; fn must ignore
  invalid (padding) rows. Only one chunk's intermediates exist at a time."""
  xp, valid = padded_chunks(x, rows)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fn, xp[0], valid[0]))
  total, _ = jax.lax.scan(lambda carry, inp: (jax.tree.map(jnp.add, carry, fn(*inp)), None), zeros, (xp, valid))
  return total


def chunked_rows(fn, x, rows: int):
  """fn applied to row chunks of x [N, d] and concatenated back to [N, ...] (fn: [rows, d] -> [rows, ...])."""
  xp, _ = padded_chunks(x, rows)
  out = jax.lax.map(fn, xp)
  return out.reshape(-1, *out.shape[2:])[:x.shape[0]]


def make_eval_step(graphdef, saes, *, vocab_size: int, dtype: str, loss_chunk: int):
  """(params, sae state, batch) -> sums over the batch: clean / zero-ablated / per-SAE spliced CE,
  per-SAE reconstruction sums (squared error, variance, L0, L1) and per-feature firing counts on
  the held-out tokens, for the catalogue records `saes` (all on one layer). All fp32. Memory is
  bounded like the training step's: the LM loss runs in `loss_chunk`s and each SAE's [rows, width]
  activations exist one chunk of rows at a time (EVAL_CHUNK_ELEMENTS)."""
  layers = {s.layer for s in saes}
  if len(layers) != 1:
    raise ValueError(f"the SAE eval step takes SAEs of one layer, got layers {sorted(layers)}")
  (layer,) = layers
  fwd = functools.partial(step_lib.lm_forward, graphdef, vocab_size=vocab_size, dtype=step_lib.DTYPES[dtype],
                          loss_chunk=loss_chunk)

  def eval_step(params, sae_state, batch):
    tokens = batch["tokens"]
    _, clean = fwd(params, tokens)
    acts = clean["mlp_post"][layer].astype(jnp.float32)
    B, T, d = acts.shape
    x = acts.reshape(B * T, d)
    _, zero = fwd(params, tokens, mlp_replace={layer: jnp.zeros_like})
    out = {"ce_clean": clean["ce_sum"], "ce_zero": zero["ce_sum"], "tokens": jnp.float32(clean["n"]),
           "x_sq_dev": jnp.sum((x - x.mean(0)) ** 2)}
    per = {k: [] for k in ("ce_sae", "sq_err", "l0", "l1")}
    fires = []
    for sae in saes:
      rows = chunk_rows(B * T, sae.width)

      def splice(post, sae=sae, rows=rows):
        recon = functools.partial(sae_core.reconstruct, sae_state, sae)
        return chunked_rows(recon, post.reshape(-1, d).astype(jnp.float32), rows).reshape(post.shape)

      def stats(xc, valid, sae=sae):
        f = sae_core.encode(sae_state, sae, xc)
        on = (f > 0) & valid[:, None]
        err = jnp.where(valid[:, None], xc - sae_core.reconstruct(sae_state, sae, xc), 0.0)
        return {"sq_err": jnp.sum(err ** 2), "l0": jnp.sum(on).astype(jnp.float32),
                "l1": jnp.sum(jnp.where(valid[:, None], jnp.abs(f), 0.0)), "fires": jnp.sum(on, axis=0, dtype=jnp.int32)}

      _, spliced = fwd(params, tokens, mlp_replace={layer: splice})
      sums = chunked_sums(stats, x, rows)
      per["ce_sae"].append(spliced["ce_sum"])
      for k in ("sq_err", "l0", "l1"):
        per[k].append(sums[k])
      fires.append(sums["fires"])
    out.update({k: jnp.stack(v) for k, v in per.items()})
    out["fires"] = tuple(fires)  # per SAE [m]: widths may differ
    return out

  return eval_step


def summarize_eval(sums: dict, cfg, batch_gaps=None) -> dict:
  """Sums over eval batches -> metrics per SAE (fp32 math done on host in float64).

  Loss recovered is (L_zero − L_SAE) / (L_zero − L_clean): undefined when zero-ablating the MLP
  barely changes the loss (an untrained LM), where the ratio is noise. It is then left out (and the
  console says so) when |L_zero − L_clean| is below sae.min_ablation_gap or, given the per-batch
  gaps `batch_gaps`, below twice their standard error."""
  n_tok = float(sums["tokens"])
  l_clean = float(sums["ce_clean"]) / n_tok
  l_zero = float(sums["ce_zero"]) / n_tok
  gap = l_zero - l_clean
  gaps = np.asarray(batch_gaps if batch_gaps is not None else [], np.float64)
  se = float(gaps.std(ddof=1) / np.sqrt(len(gaps))) if len(gaps) >= 2 else 0.0
  defined = abs(gap) >= max(float(cfg.sae.min_ablation_gap), 2.0 * se)
  out = {"sae_eval/loss_clean": l_clean, "sae_eval/loss_zero_ablated": l_zero, "sae_eval/ablation_gap": gap,
         "sae_eval/ablation_gap_se": se}
  for i, fires in enumerate(sums["fires"]):
    l_sae = float(sums["ce_sae"][i]) / n_tok
    stats = sae_metrics.density_stats(np.asarray(fires), n_tok, ultralow=cfg.sae.ultralow_density,
                                      dense=cfg.sae.dense_density)
    out.update({
        f"sae{i}_eval/loss_spliced": l_sae,
        f"sae{i}_eval/fvu": float(sums["sq_err"][i]) / max(float(sums["x_sq_dev"]), 1e-30),
        f"sae{i}_eval/mse": float(sums["sq_err"][i]) / (n_tok * cfg.model.d_mlp),
        f"sae{i}_eval/l0": float(sums["l0"][i]) / n_tok,
        f"sae{i}_eval/l1": float(sums["l1"][i]) / n_tok,
        **{f"sae{i}_eval/{k}": float(v) for k, v in stats.items()},
    })
    if defined:
      out[f"sae{i}_eval/loss_recovered"] = float(sae_metrics.loss_recovered(l_clean, l_sae, l_zero))
  return out
