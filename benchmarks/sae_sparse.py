"""Dense vs sparse SAE update on CPU (monojax/sae/sparse), a benchmark, not a test.

  python benchmarks/sae_sparse.py                      # d 512, widths 4,096 and 16,384, batch 4,096
  python benchmarks/sae_sparse.py --widths=4096 --steps=8 --recipe=2024
  MONOJAX_SPARSE_THREADS=2 python benchmarks/sae_sparse.py   # kernels on std::threads, not XLA's pool

One 2023 (or 2024) SAE updated by `core.make_update_fn` (forward, backward, Adam, decoder
constraint, firing statistics; state donated) with sae.sparse_update "off" and "on", timed
round-robin on the same batches. Realistic sparsity without a long training run: the inputs are
non-negative sums of a heavy-tailed number of sparse ground-truth directions with a lognormal row
scale (like ReLU MLP outputs), and each encoder bias is set to a quantile of that feature's
pre-activation so that feature densities are Zipf-distributed with mean L0 --l0; rows with large
norms then fire many features (docs/cpu-notes.md §3 measured L0 mean 25-40, p99 225-535, max
1,000-2,500). The L0 mean / p99 / max per row of the timed batches is printed.

Also printed: the encoder GEMM alone and the sparse loss+gradient alone (what limits the step).
Measurement (docs/cpu-notes.md §5): compile, 2 warm-up steps, median of --steps timed steps with
block_until_ready. Re-executes itself once with the glibc malloc tunables of §1.
"""
from __future__ import annotations

import os
import sys
import time

from monojax import cpu_env  # noqa: E402 (imports nothing heavy)

if __name__ == "__main__":  # the allocator setting must be in place before jax starts
  cpu_env.reexec_with_malloc_tunables(sys.argv)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import machine  # noqa: E402 (benchmarks/machine.py, beside this file)
from absl import app, flags  # noqa: E402

from monojax.sae import catalogue, core, recipes, sae_config, sparse  # noqa: E402

_WIDTHS = flags.DEFINE_list("widths", ["4096", "16384"], "SAE widths")
_D_IN = flags.DEFINE_integer("d_in", 512, "SAE input width")
_BATCH = flags.DEFINE_integer("batch", 4096, "activations per update")
_STEPS = flags.DEFINE_integer("steps", 8, "timed steps per configuration (median reported)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after the compile")
_L0 = flags.DEFINE_float("l0", 30.0, "target mean L0 per row")
_RECIPE = flags.DEFINE_enum("recipe", "2023", ["2023", "2024"], "SAE recipe")
T = 1_000_000  # run length: no schedule or dead window matters here


def synthetic_acts(n, d, seed, n_true=4096):
  """[n, d] non-negative rows: 1 + lognormal(log 6, 0.9) of n_true sparse unit directions (Zipf
  frequencies), Exp(1) coefficients, lognormal(0, 0.5) row scale, a little rectified noise."""
  g = np.random.default_rng([7, d, n_true])
  D = np.maximum(g.standard_normal((n_true, d), dtype=np.float32), 0) * (g.random((n_true, d)) < 0.1)
  D /= np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-6)
  p = (np.arange(n_true) + 20.0) ** -1.1
  rng = np.random.default_rng(seed)
  k = np.minimum(np.ceil(np.exp(rng.normal(np.log(6.0), 0.9, n))), 256).astype(np.int64)
  rows = np.repeat(np.arange(n), k)
  codes = np.zeros((n, n_true), np.float32)
  np.add.at(codes, (rows, rng.choice(n_true, size=int(k.sum()), p=p / p.sum())),
            rng.exponential(1.0, int(k.sum())).astype(np.float32))
  x = (codes * np.exp(rng.normal(0.0, 0.5, (n, 1))).astype(np.float32)) @ D
  return (x + np.maximum(0.02 * rng.standard_normal((n, d), dtype=np.float32), 0)).astype(np.float32)


def make_state(cfg, width, d, calib):
  """Fresh state with b_e set so feature i fires on a Zipf-distributed fraction of `calib` rows."""
  state = core.init_state(cfg, d, jax.random.key(width), calib, T)
  (group,) = state["groups"].values()
  p = jax.tree.map(lambda a: np.asarray(a[0]), group["params"])
  scale = float(state["input_scale"]) if recipes.get(cfg.saes.split(":")[2]).scales(cfg) else 1.0
  pre = np.sort((calib * scale - p["b_d"]) @ p["W_e"], axis=0)  # b_d is 0 for 2024
  density = (np.random.default_rng(width).permutation(width) + 10.0) ** -1.0
  density = np.minimum(density * _L0.value / density.sum(), 0.5)
  q = np.round((1.0 - density) * (len(calib) - 1)).astype(np.int64)
  p["b_e"] = -pre[q, np.arange(width)].astype(np.float32)
  group["params"] = {k: jnp.asarray(v[None]) for k, v in p.items()}
  return state


def loss_and_grads(rec, cfg, params, x):
  (loss, _), grads = sparse.value_and_grad(rec, cfg, params, x, 1e-3, None)
  return loss, grads


def run_once(fn, *args):
  jax.block_until_ready(fn(*args))


def time_round_robin(fns, steps, warmup):
  """Median seconds per call of each fn (each runs one step to completion): one compile call, then
  warm-up calls, then `steps` rounds of one call of each fn, so load from other processes falls on
  all of them alike."""
  for fn in fns:
    for _ in range(1 + warmup):
      fn()
  ts = [[] for _ in fns]
  for _ in range(steps):
    for t, fn in zip(ts, fns):
      t0 = time.perf_counter()
      fn()
      t.append(time.perf_counter() - t0)
  return [float(np.median(t)) for t in ts]


def main(_):
  if not sparse.available():
    sys.exit("sparse kernels unavailable: nothing to compare")
  d, batch, rec = _D_IN.value, _BATCH.value, recipes.get(_RECIPE.value)
  threads = os.environ.get("MONOJAX_SPARSE_THREADS") or "XLA pool"
  print(f"machine: {machine.cpu_line()}")
  print(f"d_in {d}, batch {batch:,}, recipe {rec.name}, {os.cpu_count()} CPUs, kernel threads: {threads}, "
        f"GLIBC_TUNABLES {'set' if os.environ.get('GLIBC_TUNABLES') else 'unset'}, median of {_STEPS.value} steps")
  calib = synthetic_acts(4096, d, seed=0)
  xs = [jnp.asarray(synthetic_acts(batch, d, seed=1 + i)) for i in range(4)]
  print(f"{'width':>6} {'L0 mean':>8} {'p99':>6} {'max':>6} {'dense act/s':>12} {'sparse act/s':>13} {'ratio':>6}"
        f" {'dense ms':>9} {'sparse ms':>9} {'enc GEMM ms':>11} {'sparse v&g ms':>13}")
  for width in (int(w) for w in _WIDTHS.value):
    steps = []
    for mode in ("off", "on"):
      cfg = sae_config()
      cfg.saes = f"{width}:{rec.default_l1}:{rec.name}"
      cfg.batch_size, cfg.sparse_update = batch, mode
      cfg.lr = cfg.lr_2024 = 1e-7  # keeps the constructed sparsity through the timed steps (cost is lr-blind)
      update = core.make_update_fn(cfg, core.groups_from_config(cfg), T)
      box = {"state": make_state(cfg, width, d, calib), "i": 0}

      def step(box=box, update=update):
        box["state"], m = update(box["state"], xs[box["i"] % len(xs)], jax.random.key(0))
        box["i"] += 1
        jax.block_until_ready((box["state"], m))

      steps.append(step)
    # Where the sparse step's time goes: the encoder GEMM alone, and the sparse loss + gradients.
    sae = catalogue.build(cfg, d)[0]
    params = core.member_params(box["state"], sae)
    x0 = xs[0] * (box["state"]["input_scale"] if rec.scales(cfg) else 1.0)
    enc = jax.jit(lambda p, x: (x - p["b_d"]) @ p["W_e"] + p["b_e"])
    vg = jax.jit(functools.partial(loss_and_grads, rec, cfg))
    parts = [functools.partial(run_once, enc, params, x0), functools.partial(run_once, vg, params, x0)]
    dense_s, sparse_s, enc_s, vg_s = time_round_robin(steps + parts, _STEPS.value, _WARMUP.value)
    l0 = np.concatenate([np.asarray(jax.jit(lambda p, x: (rec.forward(p, x)[1] > 0).sum(-1))(
        core.member_params(box["state"], sae), x * (box["state"]["input_scale"] if rec.scales(cfg) else 1.0)))
        for x in xs])  # the timed state on the timed batches
    print(f"{width:>6} {l0.mean():>8.1f} {np.percentile(l0, 99):>6.0f} {l0.max():>6d} {batch / dense_s:>12,.0f} "
          f"{batch / sparse_s:>13,.0f} {dense_s / sparse_s:>6.2f} {1e3 * dense_s:>9.1f} {1e3 * sparse_s:>9.1f} "
          f"{1e3 * enc_s:>11.1f} {1e3 * vg_s:>13.1f}", flush=True)
    del steps, parts, box


if __name__ == "__main__":
  app.run(main)
