"""Speed of the SAE update and the overhead of co-training it in the LM step (a benchmark, not a test).

  python benchmarks/sae_step.py                 # full run (~7 minutes on a quiet machine)
  python benchmarks/sae_step.py --quick         # tiny shapes, 2 timed steps, unoptimised XLA code
                                                # (fast compiles): a smoke check (< 60 s)
  bash benchmarks/setup_anchors.sh && ~/.cache/monojax/anchors-venv/bin/python benchmarks/sae_step.py
                                                # the same with SAELens as the anchor

Part 1: activations/s of ONE SAE update (forward + backward + Adam + the 2023 recipe's decoder
constraint, plus the firing statistics) at d_in 512, widths 4,096 and 16,384, batches 4,096 and
8,192: monojax's jitted `core.make_update_fn` (state donated) against an anchor run in the same
process on the same parameters and batches: SAELens' training SAE if `sae_lens` imports in this
interpreter, else plain PyTorch with the same 2023 loss, decoder-gradient projection and
renormalisation (benchmarks/torch_sae_anchor.py). Target: monojax ≥ 3× the anchor.

Realistic sparsity: the cost of a sparse update depends on how many features fire, and a fresh SAE
fires half of them. So before timing, each width's SAE is trained for --train_updates updates of
the 2023 recipe (lr --sae_lr, λ --l1) on synthetic activations shaped like ReLU MLP outputs:
non-negative sums of 1 + ~lognormal(6) ground-truth features per row (Zipf-distributed over 4,096
sparse non-negative unit directions, exponential coefficients, lognormal row scale, times
--act_scale) plus a little rectified noise, so the SAE's L0 is small on average and heavy-tailed
per row. The L0 mean / p99 / max of the timed state on the timed batches is printed per row.
(docs/cpu-notes.md §3 measured L0 mean 25–40, p99 225–535, max 1,000–2,500 on its SAEs.)

Part 2: co-training overhead at the quickstart shapes (1 layer, d 128, MLP 512, ctx 128, batch 32,
vocab 8,192, one 2023 SAE 4,096 wide fed 4,096 vectors per step): time of the co-trained step (the
"train" phase of `cotrain.make_step`: LM update + buffer exchange + SAE update) ÷ (LM-only step,
the "lm" phase of the same `make_step` on the LM state + the SAE update alone, `make_update_fn`).
Target ≤ 1.15. The run is brought up as `train.loop.run` does it, on synthetic Zipf-distributed
tokens: "fill" steps fill the buffer, the SAE is initialised from it (`make_init_from_buffer`),
then --cotrain_warm co-trained steps make the SAE sparse before timing.

Measurement (docs/cpu-notes.md §5): compile, 2 warm-up steps, then the median of
--steps timed steps, each run to completion (block_until_ready); the configurations of one row are
timed round-robin so load from other processes falls on all of them alike. The process re-executes
itself once with the glibc malloc tunables of docs/cpu-notes.md §1 (unless GLIBC_TUNABLES is
already set), so monojax and the torch anchor run with the same allocator; torch uses every CPU
(torch.set_num_threads(os.cpu_count())), as XLA does.
"""
from __future__ import annotations

import os
import sys
import time

from monojax import cpu_env  # noqa: E402 (imports nothing heavy)
from monojax.cpu_env import MALLOC_TUNABLES  # noqa: E402

if __name__ == "__main__":  # the allocator setting must be in place before jax starts
  cpu_env.reexec_with_malloc_tunables(sys.argv)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # torch_sae_anchor beside this file

import warnings  # noqa: E402

import machine  # noqa: E402 (benchmarks/machine.py)
from absl import app, flags, logging  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "tiny shapes, 2 timed steps, anchor optional: a smoke check (< 60 s)")
_STEPS = flags.DEFINE_integer("steps", 8, "timed steps per configuration (median reported)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after the compile")
_PARTS = flags.DEFINE_list("parts", ["sae", "cotrain"], "what to run: sae (part 1), cotrain (part 2)")
_D_IN = flags.DEFINE_integer("d_in", 512, "SAE input width (part 1)")
_WIDTHS = flags.DEFINE_list("widths", ["4096", "16384"], "SAE widths (part 1)")
_BATCHES = flags.DEFINE_list("batches", ["4096", "8192"], "SAE batch sizes (part 1)")
_ANCHOR = flags.DEFINE_enum("anchor", "auto", ["auto", "sae_lens", "torch", "none"],
                            "auto: SAELens if importable, else plain PyTorch; none: monojax only")
_ADAM = flags.DEFINE_enum("torch_adam", "default", ["default", "foreach", "fused"],
                          "torch.optim.Adam implementation of the plain-PyTorch anchor (default: what SAELens uses)")
_TRAIN_UPDATES = flags.DEFINE_integer("train_updates", 100, "SAE updates on synthetic activations before timing")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 4096, "batch of those training updates")
_ACT_SCALE = flags.DEFINE_float("act_scale", 2.0, "scale of the synthetic activations (sets the L0 reached)")
_SAE_LR = flags.DEFINE_float("sae_lr", 1e-3, "SAE learning rate (quickstart's; does not change the step's cost)")
_L1 = flags.DEFINE_float("l1", 0.004, "2023 λ (docs/paper-notes.md §3.4)")
_COTRAIN_WARM = flags.DEFINE_integer("cotrain_warm", 100, "co-trained steps after the SAE init, before timing")

QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SAE_TARGET = 3.0
COTRAIN_TARGET = 1.15
TOTAL_SAE_STEPS = 1_000_000  # the paper's run length: no dead window or resampling falls inside a benchmark

# name -> (d_model, d_mlp, n_heads, d_head, seq_len, batch, vocab (padded = real), SAE width, buffer_steps)
COTRAIN_SHAPES = {"quickstart": (128, 512, 4, 32, 128, 32, 8192, 4096, 8)}
QUICK_COTRAIN_SHAPES = {"tiny": (32, 64, 2, 16, 16, 4, 512, 128, 2)}


# ------------------------------------------------------------------------------------------ helpers

def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def time_round_robin(fns, steps: int, warmup: int):
  """Each fn runs one step to completion. Warm-up calls, then `steps` rounds of one call of each;
  returns (median seconds, spread = (max - min) / median) per fn."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(steps):
    for i, fn in enumerate(fns):
      time.sleep(0.005)  # lets the other runtime's spinning worker threads go idle first (not timed)
      t0 = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - t0)
  return [(_median(t), (max(t) - min(t)) / _median(t)) for t in times]


def fresh_copy(tree, shardings=None):
  """A device copy sharing no buffer with `tree` (each runner donates its own state)."""
  import jax
  import numpy as np
  host = jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(tree))
  return jax.device_put(host, shardings) if shardings is not None else jax.device_put(host)


def synthetic_acts(n: int, d: int, *, seed: int, scale: float = 2.0, n_true: int = 4096, mean_k: float = 6.0):
  """[n, d] fp32 non-negative activations, sparse in a ground-truth dictionary with heavy tails.

  Row r = scale · (Σ_{g ∈ S_r} c_g D_g + relu(0.02 · noise)), D_g sparse non-negative unit vectors
  (10 % of the dims), |S_r| = min(ceil(lognormal(log mean_k, 0.9)), 256), features drawn with
  Zipf(1.1) frequencies, c_g ~ Exp(1) times a per-row lognormal(0, 0.5) scale. The dictionary is
  fixed by (d, n_true); `seed` picks the rows."""
  import numpy as np
  import scipy.sparse as sp
  g = np.random.default_rng([7, d, n_true])
  D = np.maximum(g.standard_normal((n_true, d), dtype=np.float32), 0) * (g.random((n_true, d), dtype=np.float32) < 0.1)
  D /= np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-6)
  ranks = g.permutation(n_true)
  p = (np.arange(n_true) + 20.0) ** -1.1
  p /= p.sum()
  rng = np.random.default_rng(seed)
  k = np.minimum(np.ceil(np.exp(rng.normal(np.log(mean_k), 0.9, n))), 256).astype(np.int64)
  rows = np.repeat(np.arange(n), k)
  idx = ranks[rng.choice(n_true, size=int(k.sum()), p=p)]
  coef = rng.exponential(1.0, int(k.sum())) * np.exp(rng.normal(0.0, 0.5, n))[rows]
  x = np.asarray(sp.csr_matrix((coef.astype(np.float32), (rows, idx)), shape=(n, n_true)) @ D, dtype=np.float32)
  x += np.maximum(rng.standard_normal((n, d), dtype=np.float32) * np.float32(0.02), 0)
  return x * np.float32(scale)


def l0_stats(state, xs, sae) -> tuple[float, float, int]:
  """(mean, p99, max) over rows of the features firing on the batches xs (`sae`: a catalogue record)."""
  import jax
  import numpy as np
  from monojax.sae import core
  count = jax.jit(lambda s, x: (core.encode(s, sae, x) > 0).sum(-1))
  l0 = np.concatenate([np.asarray(count(state, x)) for x in xs])
  return float(l0.mean()), float(np.percentile(l0, 99)), int(l0.max())


# An SAE this dead or this poor is not timed (issue 19): its sparse update does almost no work, so
# a ratio against a dense anchor would flatter it. L0 mean below DEAD_L0 features per row, or FVU
# above DEAD_FVU on held-out activations.
DEAD_L0 = 5.0
DEAD_FVU = 0.5


def sae_quality(state, xs, sae) -> dict:
  """The SAE `sae` (a catalogue record) of `state` on held-out batches xs [B, d] (raw activations):
  L0 per row (mean, p99, max) and FVU over all their rows, sae/metrics.py's definition
  Σ(x − x̂)² / Σ(x − mean(x))² with the mean over every row of xs (x̂ in the input units:
  core.reconstruct)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from monojax.sae import core

  @jax.jit
  def parts(state, x):
    x = x.astype(jnp.float32)
    l0 = (core.encode(state, sae, x) > 0).sum(-1)
    err = jnp.square(x - core.reconstruct(state, sae, x)).sum()
    return l0, err, x.sum(0), jnp.square(x).sum()

  l0s, err, s1, s2, n = [], 0.0, 0.0, 0.0, 0
  for x in xs:
    l0, e, a, b = jax.device_get(parts(state, jnp.asarray(x)))
    l0s.append(np.asarray(l0))
    err, s1, s2, n = err + float(e), s1 + np.asarray(a, np.float64), s2 + float(b), n + int(np.shape(x)[0])
  total_var = s2 - float((s1 ** 2).sum()) / n  # Σ‖x − mean‖² = Σ‖x‖² − n‖mean‖²
  l0 = np.concatenate(l0s)
  return {"l0_mean": float(l0.mean()), "l0_p99": float(np.percentile(l0, 99)), "l0_max": int(l0.max()),
          "fvu": err / total_var if total_var > 0 else float("nan")}


def dead_reason(q: dict, on: str = "held-out activations") -> str | None:
  """None for an SAE fit to time; else the line printed instead of its figures (`on`: what q was
  measured on)."""
  l0, fvu = q["l0_mean"], q["fvu"]
  if l0 >= DEAD_L0 and fvu <= DEAD_FVU:  # NaN FVU fails too
    return None
  why = []
  if not l0 >= DEAD_L0:
    why.append(f"L0 mean below {DEAD_L0:g}")
  if not fvu <= DEAD_FVU:
    why.append(f"FVU above {DEAD_FVU:g}")
  return f"not measured: the SAE is dead (L0 {l0:.1f}, FVU {fvu:.2f}: {' and '.join(why)} on {on})"


def member0_params(state) -> dict:
  """Member 0 of the state's first group as numpy (the unstacked {W_e, b_e, W_d, b_d})."""
  import jax
  import numpy as np
  params = next(iter(state["groups"].values()))["params"]
  return {k: np.array(v[0], copy=True) for k, v in jax.device_get(params).items()}


def torch_or_none():
  try:
    import torch_sae_anchor as anchors
    anchors.import_torch()
    return anchors
  except ImportError:
    return None


# ------------------------------------------------------------------------------ part 1: SAE update

def sae_config_for(width: int, batch: int):
  from monojax.sae.config import sae_config
  cfg = sae_config()
  cfg.saes = f"{width}:{_L1.value}:2023"
  cfg.normalize_inputs = False  # raw activations, as the torch anchors train
  cfg.batch_size = batch
  cfg.lr = _SAE_LR.value
  return cfg


def anchor_check(anchors) -> str:
  """One update from equal parameters on one batch, monojax vs the plain-PyTorch anchor, tiny
  shapes: the largest parameter difference in units of the learning rate (Adam's first step moves
  each entry by about lr, so a different algorithm shows up as O(1))."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from monojax.sae import core
  d, m, B = 64, 256, 256
  cfg = sae_config_for(m, B)
  x = synthetic_acts(B, d, seed=123, scale=_ACT_SCALE.value)
  state = core.init_state(cfg, d, jax.random.key(1), x, TOTAL_SAE_STEPS)
  before = member0_params(state)
  # Donating, on a copy: the same program as part 1's --quick row (equal config and shapes).
  update = core.make_update_fn(cfg, core.groups_from_config(cfg), TOTAL_SAE_STEPS)
  ours = member0_params(update(fresh_copy(state), jnp.asarray(x), jax.random.key(0))[0])
  theirs = anchors.plain_reference_update(before, x, lr=cfg.lr, l1=_L1.value, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  worst = max(float(np.abs(ours[k] - theirs[k]).max()) / cfg.lr for k in ours)
  moved = min(float(np.abs(ours[k] - before[k]).max()) / cfg.lr for k in ours)
  return (f"anchor check (d {d}, width {m}, batch {B}, one update from equal params): max |monojax - torch| = "
          f"{worst:.2e} lr (every tensor moved by up to {moved:.2f} lr or more) -> "
          + ("same algorithm" if worst < 0.05 else "MISMATCH: the torch anchor is not the same update"))


def part_sae(quick: bool, steps: int, warmup: int, anchors) -> None:
  import jax
  import jax.numpy as jnp
  from monojax.sae import catalogue, core
  d = 64 if quick else _D_IN.value
  widths = [256] if quick else [int(w) for w in _WIDTHS.value]
  batches = [256] if quick else [int(b) for b in _BATCHES.value]
  train_updates = 100 if quick else _TRAIN_UPDATES.value  # --quick: enough for a live SAE (FVU < 0.5)
  train_batch = 256 if quick else _TRAIN_BATCH.value
  which = _ANCHOR.value if anchors is not None else "none"  # anchors is None: torch does not import
  if which == "sae_lens" and anchors.sae_lens_version() is None:
    raise app.UsageError("--anchor=sae_lens but sae_lens does not import here: run benchmarks/setup_anchors.sh")
  if which == "auto":
    which = "sae_lens" if anchors.sae_lens_version() is not None else "torch"

  # One pool of synthetic activations: the training batches cycle through it, the timed batches
  # are drawn from a different seed.
  n_pool = max(train_batch * 16, 4 * max(batches))
  t0 = time.perf_counter()
  pool = synthetic_acts(n_pool, d, seed=0, scale=_ACT_SCALE.value)
  timed_pool = synthetic_acts(4 * max(batches), d, seed=1, scale=_ACT_SCALE.value)
  print(f"part 1: synthetic activations {pool.shape[0]:,} + {timed_pool.shape[0]:,} rows x {d} in "
        f"{time.perf_counter() - t0:.1f}s (mean row norm {float((pool ** 2).sum(1).mean() ** 0.5):.1f}, "
        f"{100 * float((pool > 0).mean()):.0f}% non-zero)")
  train_xs = [jnp.asarray(pool[i:i + train_batch]) for i in range(0, n_pool - train_batch + 1, train_batch)]
  key = jax.random.key(0)
  rows = []
  for width in widths:
    cfg = sae_config_for(width, train_batch)
    groups = core.groups_from_config(cfg)
    state = core.init_state(cfg, d, jax.random.key(width), pool[: min(n_pool, 16_384)], TOTAL_SAE_STEPS)
    update = core.make_update_fn(cfg, groups, TOTAL_SAE_STEPS)
    t0 = time.perf_counter()
    for i in range(train_updates):
      state, metrics = update(state, train_xs[i % len(train_xs)], key)
    jax.block_until_ready(state)
    fvu = float(metrics["fvu"][0]) if train_updates else float("nan")
    print(f"  width {width:,}: {train_updates} training updates of {train_batch:,} in {time.perf_counter() - t0:.1f}s "
          f"(lr {cfg.lr:g}, λ {_L1.value:g}); last fvu {fvu:.3f}")
    trained = jax.device_get(state)
    del state
    sae = catalogue.build(cfg, d)[0]
    for batch in batches:
      xs_np = [timed_pool[i * batch:(i + 1) * batch] for i in range(4)]
      xs = [jnp.asarray(x) for x in xs_np]
      st = fresh_copy(trained)
      q = sae_quality(st, xs, sae)  # the timed batches: drawn from another seed than the training rows
      l0 = (q["l0_mean"], q["l0_p99"], q["l0_max"])
      dead = dead_reason(q)
      if dead:
        print(f"  width {width:,} batch {batch:,}: {dead}")
        rows.append((width, batch, l0, None, dead, None))
        del st
        continue
      box = {"state": st, "i": 0}

      def ours(box=box, xs=xs, update=update):
        box["state"], m = update(box["state"], xs[box["i"] % len(xs)], key)
        box["i"] += 1
        jax.block_until_ready((box["state"], m))

      t0 = time.perf_counter()
      ours()  # compile (a new batch shape) + the first step
      compile_s = time.perf_counter() - t0
      fns = [ours]
      anchor = None
      if which != "none":
        anchor = anchors.make(which, member0_params(trained), lr=cfg.lr, l1=_L1.value, b1=cfg.b1, b2=cfg.b2,
                              eps=cfg.eps, adam=_ADAM.value)
        torch = anchors.import_torch()
        txs = [torch.from_numpy(x.copy()) for x in xs_np]
        abox = {"i": 0}

        def theirs(anchor=anchor, txs=txs, abox=abox):
          anchor.step(txs[abox["i"] % len(txs)])
          abox["i"] += 1

        theirs()  # first call (allocations), counted as neither warm-up nor timing
        fns.append(theirs)
      res = time_round_robin(fns, steps, warmup)
      rows.append((width, batch, l0, compile_s, res, anchor.describe if anchor else None))
      print(f"  width {width:,} batch {batch:,}: held-out FVU {q['fvu']:.3f}, L0 mean {q['l0_mean']:.1f}")
      del box, fns, anchor
  print(f"\npart 1: one SAE update (2023 recipe), d_in {d}, median of {steps} timed steps after compile + "
        f"{warmup} warm-up; act/s = batch / step time")
  if which == "none":
    print("anchor: none (" + ("--anchor=none" if _ANCHOR.value == "none" else "torch does not import here") + ")")
  elif any(r[5] for r in rows):
    print(f"anchor: {which}: {next(r[5] for r in rows if r[5])}")
  head = (f"{'width':>7} {'batch':>6} | {'L0 mean':>7} {'p99':>6} {'max':>6} | {'1st call s':>10} {'monojax ms':>10} "
          f"{'act/s':>9} {'spread':>6} | {'anchor ms':>9} {'act/s':>9} {'spread':>6} | {'ratio':>6}  "
          f"target >= {SAE_TARGET:g}x")
  print(head)
  print("-" * len(head))
  for width, batch, (l0m, l0p, l0x), compile_s, res, _ in rows:
    if compile_s is None:  # a dead SAE: res holds the reason, nothing was timed
      print(f"{width:>7,} {batch:>6,} | {l0m:>7.1f} {l0p:>6.0f} {l0x:>6d} | {res}")
      continue
    (t_ours, sp_ours) = res[0]
    line = (f"{width:>7,} {batch:>6,} | {l0m:>7.1f} {l0p:>6.0f} {l0x:>6d} | {compile_s:>10.1f} {t_ours * 1e3:>10.1f} "
            f"{batch / t_ours:>9,.0f} {100 * sp_ours:>5.0f}% | ")
    if len(res) > 1:
      (t_a, sp_a) = res[1]
      ratio = t_a / t_ours
      line += (f"{t_a * 1e3:>9.1f} {batch / t_a:>9,.0f} {100 * sp_a:>5.0f}% | {ratio:>5.2f}x  "
               + ("ok" if ratio >= SAE_TARGET else "BELOW TARGET"))
    else:
      line += f"{'-':>9} {'-':>9} {'-':>6} | {'-':>6}"
    print(line)


# ------------------------------------------------------------------------- part 2: co-training

def zipf_tokens(rng, shape, vocab: int):
  """Token ids with a Zipf(1.1)-like unigram distribution (text-like frequencies; content is irrelevant
  to the step's cost, but the LM's MLP activations then have a realistic mix of common and rare rows)."""
  import numpy as np
  p = (np.arange(vocab) + 10.0) ** -1.1
  p /= p.sum()
  return rng.choice(vocab, size=shape, p=p).astype(np.int32)


def cotrain_row(name: str, shape: tuple, quick: bool, steps: int, warmup: int) -> tuple:
  """Brings up one co-training configuration as train/job.py and train/loop.py do and times its three
  runners round-robin. Returns (name, shape summary, L0 stats, [(median s, spread)] for the
  co-trained step, the LM-only step and the SAE update alone)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from monojax import sharding
  from monojax.config import base_config
  from monojax.sae import core
  from monojax.train import cotrain
  from monojax.train import state as state_lib, step as step_lib

  d, mlp, heads, d_head, seq, batch, vocab, width, buffer_steps = shape
  warm_steps = 3 if quick else _COTRAIN_WARM.value
  cfg = base_config()
  cfg.model.d_model, cfg.model.d_mlp, cfg.model.n_heads, cfg.model.d_head = d, mlp, heads, d_head
  cfg.model.n_layers = 1
  cfg.data.seq_len, cfg.data.global_batch = seq, batch
  cfg.model.vocab_size = vocab
  cfg.train.steps = 1000
  cfg.train.lr = 3e-3                       # quickstart
  s = cfg.sae
  s.saes = f"{width}:{_L1.value}:2023"
  s.positions_per_context = seq             # every position: batch x seq vectors = one SAE batch per step
  s.batch_size = batch * seq
  s.start_step = 0
  s.buffer_steps = buffer_steps
  s.lr = _SAE_LR.value                      # quickstart's 1e-3
  mesh = sharding.make_mesh(cfg.mesh)
  schedule = state_lib.make_schedule(cfg.train)
  tx = state_lib.make_optimizer(cfg.train, schedule)
  graphdef, lm_state, lm_shardings = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)
  plan = cotrain.make_plan(cfg, cfg.train.steps)
  groups = core.groups_from_config(s)
  state, shardings = cotrain.with_sae_and_buffer(cfg, lm_state, lm_shardings, mlp, plan, mesh)
  # Same wiring as train/job.py; bits/byte is not measured here.
  lm_update = step_lib.make_lm_update(graphdef, tx, schedule, vocab_size=vocab, dtype=cfg.train.dtype,
                                      loss_chunk=cfg.train.loss_chunk, token_bytes=jnp.ones((vocab,), jnp.int32))
  batch_sh = {"tokens": sharding.batch_sharding(mesh)}
  step_fns = {ph: jax.jit(cotrain.make_step(cfg, ph, plan, lm_update, groups, mesh, s.layer),  # compiled lazily
                          in_shardings=(sh, batch_sh), out_shardings=(sh, None), donate_argnums=0)
              for ph, sh in (("lm", lm_shardings), ("fill", shardings), ("train", shardings))}
  rng = np.random.default_rng(0)
  batches = [{"tokens": jax.device_put(zipf_tokens(rng, (batch, seq + 1), vocab), batch_sh["tokens"])}
             for _ in range(8)]

  t0 = time.perf_counter()
  # Fill the buffer and initialise the SAE from it, as run() does. --quick skips this (one compile
  # fewer): its SAE starts from the placeholder state and the buffer from zeros.
  fill_steps = 0 if quick else plan.init_step
  for i in range(fill_steps):
    state, _ = step_fns[plan.phase(i)](state, batches[i % len(batches)])
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 10**9 + plan.init_step)
  if fill_steps:
    state["sae"] = cotrain.make_init_from_buffer(cfg, mlp, plan, shardings["sae"])(state["buffer"]["acts"], key)
  metrics = None
  for i in range(warm_steps):
    state, metrics = step_fns["train"](state, batches[i % len(batches)])
  jax.block_until_ready(state)
  sae_m = jax.device_get(metrics["sae"]) if metrics is not None else None
  print(f"part 2 [{name}]: {fill_steps} fill steps + " + ("SAE init from the buffer" if fill_steps else "no SAE init")
        + f" + {warm_steps} co-trained steps in "
        f"{time.perf_counter() - t0:.1f}s (includes compiles)"
        + (f"; LM loss {float(metrics['loss']):.3f}, SAE fvu {float(sae_m['fvu'][0]):.3f}" if sae_m else "")
        + (" (--quick: placeholder SAE, not initialised from activations)" if not fill_steps else ""))

  # Three runners, each on its own copy: the co-trained step, the LM-only step ("lm" phase of the
  # same make_step, on the LM part of the state) and the SAE update alone on buffered activations.
  acts = np.asarray(jax.device_get(state["buffer"]["acts"]))
  n_xs = min(4, plan.capacity // s.batch_size)
  sae_xs = [jnp.asarray(acts[i * s.batch_size:(i + 1) * s.batch_size]) for i in range(n_xs)]
  boxes = {"train": {"state": fresh_copy(state, shardings)},
           "lm": {"state": fresh_copy({k: state[k] for k in lm_shardings}, lm_shardings)},
           "sae": {"state": fresh_copy(state["sae"], shardings["sae"])}}
  from monojax.sae import catalogue
  q = sae_quality(boxes["sae"]["state"], sae_xs, catalogue.build(s, mlp)[0])
  l0 = (q["l0_mean"], q["l0_p99"], q["l0_max"])
  dead = dead_reason(q, on="buffered activations")
  if dead:  # the overhead ratio is still printed, but its SAE cost is a low estimate
    print(f"part 2 [{name}]: note: {dead.replace('not measured: ', '')} by part 1's rule (the buffered activations "
          "of a fresh LM on synthetic tokens); the overhead is still timed, but its SAE update's cost is a low "
          "estimate")
  sae_update = core.make_update_fn(s, groups, plan.total_sae_steps)
  counter = {"i": 0}

  def lm_or_train(phase):
    def run():
      box = boxes[phase]
      box["state"], m = step_fns[phase](box["state"], batches[counter["i"] % len(batches)])
      counter["i"] += 1
      jax.block_until_ready((box["state"], m))
    return run

  def sae_only():
    box = boxes["sae"]
    box["state"], m = sae_update(box["state"], sae_xs[counter["i"] % len(sae_xs)], key)
    counter["i"] += 1
    jax.block_until_ready((box["state"], m))

  fns = [lm_or_train("train"), lm_or_train("lm"), sae_only]
  compile_s = []
  for fn in fns:  # compile (the "lm" phase and the standalone update are new programs) + first step
    t0 = time.perf_counter()
    fn()
    compile_s.append(time.perf_counter() - t0)
  print(f"part 2 [{name}]: first call (compile + step) of the co-trained step {compile_s[0]:.1f}s, LM-only step "
        f"{compile_s[1]:.1f}s, SAE update {compile_s[2]:.1f}s")
  res = time_round_robin(fns, steps, warmup)
  return name, (d, mlp, seq, batch, vocab, width, s.batch_size), l0, res


def part_cotrain(quick: bool, steps: int, warmup: int) -> None:
  shapes = QUICK_COTRAIN_SHAPES if quick else COTRAIN_SHAPES
  rows = [cotrain_row(name, shape, quick, steps, warmup) for name, shape in shapes.items()]
  print(f"\npart 2: co-training overhead = co-trained step / (LM-only step + SAE update), median of {steps} timed "
        f"steps after compile + {warmup} warm-up each, round-robin")
  head = (f"{'shape':<11} {'d':>4} {'mlp':>4} {'ctx':>4} {'batch':>5} {'vocab':>6} {'SAE':>6} {'SAE B':>6} | "
          f"{'L0 mean':>7} {'p99':>5} {'max':>5} | {'cotrain ms':>10} {'LM ms':>7} {'SAE ms':>7} | "
          f"{'overhead':>8}  target <= {COTRAIN_TARGET:g}")
  print(head)
  print("-" * len(head))
  for name, (d, mlp, seq, batch, vocab, width, sae_b), (l0m, l0p, l0x), res in rows:
    (t_co, _), (t_lm, _), (t_sae, _) = res
    ratio = t_co / (t_lm + t_sae)
    print(f"{name:<11} {d:>4} {mlp:>4} {seq:>4} {batch:>5} {vocab:>6} {width:>6,} {sae_b:>6,} | "
          f"{l0m:>7.1f} {l0p:>5.0f} {l0x:>5d} | {t_co * 1e3:>10.1f} {t_lm * 1e3:>7.1f} {t_sae * 1e3:>7.1f} | "
          f"{ratio:>8.3f}  "
          + ("ok" if ratio <= COTRAIN_TARGET else "ABOVE TARGET"))
    print(f"{'':<11} spread (max-min)/median: cotrain {100 * res[0][1]:.0f}%, LM {100 * res[1][1]:.0f}%, "
          f"SAE {100 * res[2][1]:.0f}%; tokens/s co-trained {batch * seq / t_co:,.0f}, "
          f"LM only {batch * seq / t_lm:,.0f}")


# ------------------------------------------------------------------------------------------- main

def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # not jax's "Unable to initialize backend 'tpu'" INFO line
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  t_start = time.perf_counter()
  quick = _QUICK.value
  if quick and "XLA_FLAGS" not in os.environ:
    # A smoke check times nothing that matters: cheaper LLVM code generation halves its compile time
    # (XLA reads the flags when jax's backend starts, below).
    os.environ["XLA_FLAGS"] = QUICK_XLA_FLAGS
  import jax
  steps = 2 if quick else _STEPS.value
  warmup = _WARMUP.value
  if steps < 1 or warmup < 0:
    raise app.UsageError("--steps must be >= 1 and --warmup >= 0")
  parts = set(_PARTS.value)
  if not parts <= {"sae", "cotrain"}:
    raise app.UsageError(f"--parts: sae and/or cotrain, got {_PARTS.value}")

  dev = jax.devices()[0]
  load0 = os.getloadavg()
  print(f"machine: {machine.cpu_line()}")
  print(f"jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} ({dev.platform}); os.cpu_count() = "
        f"{os.cpu_count()}; load average {load0[0]:.2f}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(unset)'}"
        + ("  (--quick: fast compiles, slower code; the timings are a smoke check only)"
           if os.environ.get("XLA_FLAGS") == QUICK_XLA_FLAGS else ""))
  print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '') or '(unset)'}"
        + ("  (set by this script's re-exec, docs/cpu-notes.md §1)"
           if os.environ.get("GLIBC_TUNABLES") == MALLOC_TUNABLES else ""))
  anchors = None
  if "sae" in parts and (_ANCHOR.value != "none" or quick):
    anchors = torch_or_none()
    if anchors is None:
      print("torch: not importable: anchor rows skipped. " + (
          "To get them: `pip install torch==2.13.0` (a CPU wheel on this machine's disk), or "
          "`bash benchmarks/setup_anchors.sh` for a venv with torch + sae-lens"))
    else:
      import torch
      slv = anchors.sae_lens_version()
      print(f"torch {torch.__version__}: torch.set_num_threads(os.cpu_count()) -> {torch.get_num_threads()} intra-op "
            f"threads, {torch.get_num_interop_threads()} inter-op; sae_lens "
            + (slv if slv else "not importable (`bash benchmarks/setup_anchors.sh`)"))
      print(anchor_check(anchors))
  print()
  if "sae" in parts:
    part_sae(quick, steps, warmup, anchors)
    print()
  if "cotrain" in parts:
    part_cotrain(quick, steps, warmup)
  load1 = os.getloadavg()
  print(f"\nspread = (max - min) / median over the timed steps; load average {load0[0]:.2f} -> {load1[0]:.2f}"
        + ("  [noisy: other processes were using the CPU; rerun on a quiet machine]" if load0[0] > 0.5 else "")
        + f"; total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
  app.run(main)
