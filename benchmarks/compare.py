"""monojax measured side by side with SAELens and TransformerLens, in one process (a benchmark, not a test).

  ~/.cache/monojax/anchors-venv/bin/python benchmarks/compare.py            # full run (~40 min on a shared 2-core machine)
  ~/.cache/monojax/anchors-venv/bin/python benchmarks/compare.py --quick    # tiny shapes, 2 timed steps (< 90 s)
  python benchmarks/compare.py --quick      # without torch: the monojax side only ("anchor unavailable")
  ... --lm_workdir=runs/quickstart           # part 1's SAEs trained on that LM's real MLP activations

The anchors venv (benchmarks/setup_anchors.sh) has monojax (editable) and the pinned torch,
sae-lens and transformer-lens, so both sides run in the same interpreter, on the same machine, with
the same allocator (the process re-executes itself once with the glibc malloc tunables of
docs/cpu-notes.md §1, as benchmarks/lm_step.py does) and the same thread count (XLA's
CPU client uses every core; torch.set_num_threads(os.cpu_count())).

1. SAE update (forward + backward + Adam + the recipe's decoder constraint), d_in 512, widths
   4,096 and 16,384, batch 4,096: monojax `sae.core.make_update_fn` (2023 recipe, state donated)
   vs SAELens' StandardTrainingSAE + the body of SAETrainer._train_step
   (benchmarks/torch_sae_anchor.py), both from the same parameters. The SAE is first trained for
   --train_updates (300) updates so its sparsity is realistic: on synthetic heavy-tailed activations
   (benchmarks/sae_step.py's `synthetic_acts`), or, with --lm_workdir, on the MLP activations of
   that finished LM run on the default corpus. L0 mean / p99 / max per row are printed.
2. LM training step, 1 layer, d 128, MLP 512, ctx 256, batch 32, fp32, vocab 50,304 and 8,192:
   monojax `train.step.make_train_step` (AdamW + clip 1.0, state donated; on CPU its default
   train.ce_kernel 'auto': the cross-entropy kernel of train/cross_entropy.py) vs a TransformerLens
   HookedTransformer with the same config and the same weights (copied from monojax; the two
   losses are compared first), TL's built-in loss, backward, clip_grad_norm_(1.0), AdamW.
3. The co-trained job per token: monojax's "train" phase of `train.cotrain.make_step` (LM update +
   buffer exchange + one 2023 SAE of width 4,096 fed 4,096 activations a step: 128 positions of each
   of the 32 contexts) vs TL's training step with a hook on blocks.0.mlp.hook_post -> the same
   buffer exchange in torch -> one SAELens update (benchmarks/anchors_tl.py). Also monojax
   co-trained ÷ monojax LM alone (the "lm" phase of the same make_step).
4. SAE training on a frozen LM per token: monojax's "train" step with `make_lm_forward_only` (what
   train/job.py builds in mode "frozen") vs TL `run_with_cache(stop_at_layer=1,
   names_filter=hook)` under torch.no_grad + buffer exchange + SAELens update.
5. The data pipeline's tokens/s (`data.pipeline.host_batches`, raw format, on the default corpus
   if it is built, else a small corpus of Python's pydoc topics) vs the tokens/s the co-trained
   step of part 3 consumes.

If the config has `sae.sparse_update` (monojax's sparse FFI update), monojax is timed with its
default and with "off" (dense) as two columns. Parts 3 and 4 start from the state a short
co-training run reaches (fill the buffer from a fresh LM on Zipf-distributed synthetic tokens,
initialise the SAE from it, --sae_pretrain SAE updates on the buffered activations, --cotrain_warm
co-trained steps), so the SAE's sparsity is what training gives; the TL model and the SAELens SAE
are loaded with those same weights. Measurement (docs/cpu-notes.md §5): compile, --warmup untimed steps, then the median of
--steps timed steps, each run to completion; the runners of one row are timed round-robin. The
fraction of this machine's f32 matmul peak (a 4096x512 @ 512x4096 jitted matmul, best of 5, measured
at the start and end of this run) is printed where the FLOPs are defined: LM 6N + attention per
token (train/metrics.py; forward: a third), SAE 10·B·d·m per update (its five GEMMs); for the
sparse SAE update that is a dense-equivalent figure (it does fewer FLOPs).
"""
from __future__ import annotations

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)                    # sae_step, torch_sae_anchor, anchors_tl beside this file
sys.path.insert(1, os.path.dirname(_HERE))   # monojax from this checkout, before any installed copy

from monojax import cpu_env  # noqa: E402 (imports nothing heavy)
from monojax.cpu_env import MALLOC_TUNABLES  # noqa: E402

if __name__ == "__main__":  # the allocator setting must be in place before jax starts
  cpu_env.reexec_with_malloc_tunables(sys.argv)

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import warnings  # noqa: E402

QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TOTAL_SAE_STEPS = 1_000_000   # no dead window or resampling falls inside a benchmark
MATMUL = (4096, 512, 4096)
PARTS = ("sae", "lm", "cotrain", "frozen", "pipeline")

# Targets: ratio = monojax ÷ anchor in throughput (higher is better), except "co-trained ÷ LM alone",
# a time ratio (lower is better).
T_SAE = {4096: 8.0, 16384: 12.0}
T_LM = 3.0
T_COTRAIN_VS_TL = 4.0
T_COTRAIN_OVER_LM = 1.15
T_FROZEN = 8.0
T_PIPELINE = 5.0

# LM shapes: (d_model, d_mlp, n_heads, d_head, ctx, batch); SAE width / positions per context / buffer steps.
FULL = dict(lm=(128, 512, 4, 32, 256, 32), vocabs=(50304, 8192), d_in=512, widths=(4096, 16384), sae_batch=4096,
            job_width=4096, positions=128, buffer_steps=8, train_updates=300, sae_pretrain=200, cotrain_warm=10,
            pipeline_s=10.0)
QUICK = dict(lm=(32, 64, 2, 16, 16, 4), vocabs=(512,), d_in=64, widths=(256,), sae_batch=256,
             job_width=128, positions=8, buffer_steps=2, train_updates=5, sae_pretrain=2, cotrain_warm=1,
             pipeline_s=1.0)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny shapes, 2 timed steps, anchors optional (< 90 s)")
  p.add_argument("--steps", type=int, default=8, help="timed steps per runner (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
  p.add_argument("--vocabs", default="", help="LM vocab sizes (default 50304,8192)")
  p.add_argument("--widths", default="", help="part 1 SAE widths (default 4096,16384)")
  p.add_argument("--lm_workdir", default="", help="a finished LM run (config.json + checkpoints/): part 1 trains "
                                                  "its SAEs on this LM's MLP activations instead of synthetic ones")
  p.add_argument("--train_updates", type=int, default=None, help="part 1: SAE updates before timing (default 300)")
  p.add_argument("--sae_pretrain", type=int, default=None,
                 help="parts 3-4: SAE updates on the filled buffer after the SAE init (default 200)")
  p.add_argument("--cotrain_warm", type=int, default=None, help="parts 3-4: co-trained steps before timing (default 10)")
  p.add_argument("--pipeline_seconds", type=float, default=None, help="part 5: seconds per measurement (default 10)")
  p.add_argument("--l1", type=float, default=0.004, help="2023 λ")
  p.add_argument("--sae_lr", type=float, default=1e-3, help="SAE lr (quickstart's)")
  p.add_argument("--act_scale", type=float, default=2.0, help="synthetic activations' scale (sets the L0 reached)")
  p.add_argument("--no_anchor", action="store_true", help="monojax side only")
  a = p.parse_args(argv)
  sh = dict(QUICK if a.quick else FULL)
  if a.vocabs:
    sh["vocabs"] = tuple(int(v) for v in a.vocabs.split(","))
  if a.widths:
    sh["widths"] = tuple(int(v) for v in a.widths.split(","))
  for k in ("train_updates", "sae_pretrain", "cotrain_warm"):
    if getattr(a, k) is not None:
      sh[k] = getattr(a, k)
  if a.pipeline_seconds is not None:
    sh["pipeline_s"] = a.pipeline_seconds
  if a.quick:
    a.steps, a.warmup = 2, min(a.warmup, 1)
  a.parts = [x for x in a.parts.split(",") if x]
  bad = set(a.parts) - set(PARTS)
  if bad or a.steps < 1 or a.warmup < 0:
    p.error(f"--parts must be a subset of {PARTS} (got {sorted(bad)}), --steps >= 1, --warmup >= 0")
  return a, sh


# ------------------------------------------------------------------------------------------ results

@dataclasses.dataclass
class Row:
  part: str
  name: str
  unit: str
  mj: float | None                   # monojax rate (default config)
  mj_dense: float | None = None      # monojax rate with sae.sparse_update="off" (None: no such option / no SAE)
  anchor: float | None = None        # anchor rate (None: unavailable)
  target: float | None = None
  lower_is_better: bool = False      # the ratio is a time ratio (anchor rate ÷ monojax rate)
  flops_per_unit: float | None = None
  anchor_name: str = ""
  note: str = ""
  sparse_sae: bool = False           # mj runs the sparse SAE update: its %peak is dense-equivalent

  def ratio(self, rate):
    if rate is None or self.anchor is None:
      return None
    return self.anchor / rate if self.lower_is_better else rate / self.anchor


ROWS: list[Row] = []
_peaks: list[tuple[str, float]] = []   # (library, FLOP/s) of every matmul probe


def _fmt_rate(x):
  return "-" if x is None else (f"{x / 1e6:.2f}M" if x >= 1e7 else f"{x:,.0f}")


def _fmt_ratio(r, lower):
  return "-" if r is None else (f"{r:.3f}" if lower else f"{r:.2f}x")


def print_summary(quick: bool, anchors_ok: bool) -> None:
  peak = max(f for _, f in _peaks) if _peaks else None
  xla_peak = max((f for n, f in _peaks if n == "XLA"), default=None)
  print("\n" + "=" * 30 + " summary " + "=" * 30)
  print("ratio = monojax ÷ anchor in throughput (higher is better); for 'co-trained ÷ LM alone' a step-time ratio "
        "(lower is better). mj = monojax with its default config"
        + ("; mj dense = sae.sparse_update='off'" if any(r.mj_dense is not None for r in ROWS) else "")
        + (f"; %peak = achieved FLOP/s ÷ {peak / 1e9:.1f} GFLOP/s, this machine's f32 matmul peak (the best probe "
           f"of this run, any library; XLA's own best {xla_peak / 1e9:.1f}); * = dense-equivalent FLOPs of a "
           f"sparse SAE update (it does fewer), so it can exceed 100%" if peak else ""))
  head = (f"{'row':<46} {'unit':<6} {'mj':>9} {'mj dense':>9} {'anchor':>9} {'ratio':>7} {'r dense':>7} "
          f"{'target':>8} {'result':>7} {'%peak':>7} {'%pk dns':>7}")
  print(head)
  print("-" * len(head))
  for r in ROWS:
    rat, rat_d = r.ratio(r.mj), r.ratio(r.mj_dense)
    tgt = "-" if r.target is None else (f"<= {r.target:g}" if r.lower_is_better else f">= {r.target:g}x")
    if rat is None or r.target is None:
      res = "-"
    elif quick:
      res = "(quick)"
    else:
      res = "met" if (rat <= r.target if r.lower_is_better else rat >= r.target) else "MISSED"
    anc = _fmt_rate(r.anchor) if r.anchor is not None else ("n/a" if r.target is None else "unavail")

    def pk(rate, star=""):
      if peak is None or rate is None or r.flops_per_unit is None:
        return "-"
      return f"{100 * rate * r.flops_per_unit / peak:.1f}%{star}"
    print(f"{r.name:<46} {r.unit:<6} {_fmt_rate(r.mj):>9} {_fmt_rate(r.mj_dense):>9} {anc:>9} "
          f"{_fmt_ratio(rat, r.lower_is_better):>7} {_fmt_ratio(rat_d, r.lower_is_better):>7} {tgt:>8} {res:>7} "
          f"{pk(r.mj, '*' if r.sparse_sae else ''):>7} {pk(r.mj_dense):>7}")
  notes = [f"  {r.name}: {r.note}" for r in ROWS if r.note]
  if notes:
    print("notes:")
    print("\n".join(notes))
  if not anchors_ok:
    print("anchor unavailable: torch / sae_lens / transformer_lens do not import in this interpreter "
          "(bash benchmarks/setup_anchors.sh; then run this with ~/.cache/monojax/anchors-venv/bin/python)")
  if quick:
    print("--quick: tiny shapes, 2 timed steps, unoptimised XLA code: nothing about timing is judged")


# ------------------------------------------------------------------------------------------ helpers

def log(msg: str) -> None:
  print(msg, flush=True)


def measure_peak(when: str) -> str:
  """f32 matmul FLOP/s of a 4096x512 @ 512x4096 product, best of 5 (benchmarks/lm_step.py's
  anchor shape), jitted in XLA and, when torch imports, in torch (MKL/oneDNN): on some CPUs the
  two libraries' GEMMs differ by 1.4-2x, and the machine's peak is the faster one. Every probe
  is kept; the summary uses the largest (a probe during load from other processes reads low)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  m, k, n = MATMUL
  a = np.random.default_rng(0).random((m, k), dtype=np.float32)
  b = np.random.default_rng(1).random((k, n), dtype=np.float32)
  f = jax.jit(lambda a, b: a @ b)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  runs = {"XLA": lambda: f(ja, jb).block_until_ready()}
  try:
    import torch
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    runs["torch"] = lambda: torch.matmul(ta, tb)
  except ImportError:
    pass
  out = []
  for name, fn in runs.items():
    fn()
    best = float("inf")
    for _ in range(5):
      time.sleep(0.005)
      t0 = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - t0)
    flops = 2 * m * k * n / best
    _peaks.append((name, flops))
    out.append(f"{name} {flops / 1e9:.1f}")
  return f"f32 matmul {m}x{k} @ {k}x{n}, best of 5, {when}: " + ", ".join(out) + " GFLOP/s"


def sparse_variants() -> list:
  """[None] when the config has no sae.sparse_update; else [its default, "off"]."""
  from monojax.sae.config import sae_config
  c = sae_config()
  if "sparse_update" not in c:
    return [None]
  return [c.sparse_update] + (["off"] if c.sparse_update != "off" else [])


def sae_cfg(width: int, batch: int, args, sparse_update=None):
  from monojax.sae.config import sae_config
  c = sae_config()
  c.saes = f"{width}:{args.l1}:2023"
  c.normalize_inputs = False  # raw activations on both sides, as SAELens' standard SAE trains
  c.batch_size = batch
  c.lr = args.sae_lr
  if sparse_update is not None:
    c.sparse_update = sparse_update
  return c


def sparse_default() -> bool:
  """monojax's default SAE update is the sparse one (its %peak is then dense-equivalent)."""
  v = sparse_variants()[0]
  return v is not None and v != "off"


def sae_flops(batch: int, d: int, m: int) -> float:
  """Dense FLOPs of one 2023 SAE update's five GEMMs (encoder fwd, decoder fwd, dW_d, dL/df, dW_e)."""
  return 10.0 * batch * d * m


def _step_runner(fn, box, batches):
  """A callable running fn(box["state"], batch_i) -> (state, metrics) to completion, cycling batches."""
  import jax

  def run():
    box["state"], m = fn(box["state"], batches[box["i"] % len(batches)])
    box["i"] += 1
    jax.block_until_ready((box["state"], m))
  return run


def _per_token_timings(labels, res, firsts, tokens) -> str:
  return "; ".join(f"{lab} {t * 1e3:.1f} ms ({tokens / t:,.0f} tok/s, spread {100 * sp:.0f}%, 1st call {f:.1f}s)"
                   for lab, (t, sp), f in zip(labels, res, firsts))


def _first_call(run) -> float:
  t0 = time.perf_counter()
  run()
  return time.perf_counter() - t0


def _torch_runner(step, batches):
  box = {"i": 0}

  def run():
    step(batches[box["i"] % len(batches)])
    box["i"] += 1
  return run


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or "unknown"


# ------------------------------------------------------------------------------- part 1: SAE update

def lm_activations(workdir: str, n_rows: int, seed: int = 1):
  """[n_rows, d_mlp] float32 MLP post-ReLU activations of the finished LM run in `workdir` (opened
  with the run loader: its own tokenizer, config and newest checkpoint) on its corpus (train split,
  data seed `seed`: another order than the run's), rows shuffled."""
  import numpy as np
  from monojax.corpus import build_corpus
  from monojax.data import pipeline
  from monojax.run import Run
  quiet = lambda *a, **k: None  # noqa: E731
  run = Run.open(workdir, log=quiet)
  cfg = run.cfg
  root = build_corpus.ensure_data_root(cfg.data, log=quiet)
  it = iter(pipeline.host_batches(cfg.data, "train", tokenizer=run.tokenizer, root=root,
                                  host_batch=cfg.data.global_batch, seed=seed, process_index=0, process_count=1,
                                  log=quiet))
  rows, n = [], 0
  while n < n_rows:
    a = np.asarray(run.mlp_acts(next(it)["tokens"][:, :-1], layer=0))
    rows.append(a.reshape(-1, a.shape[-1]))
    n += rows[-1].shape[0]
  acts = np.concatenate(rows)[:n_rows]
  acts = acts[np.random.default_rng(seed).permutation(len(acts))]
  return acts, (f"LM {workdir} (step {run.step}, {cfg.model.d_model}x{cfg.model.d_mlp}, {run.tokenizer.spec}), "
                f"ctx {cfg.data.seq_len}")


def part_sae(args, sh, anchors_ok: bool) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import sae_step
  from monojax.sae import catalogue, core
  d, B = sh["d_in"], sh["sae_batch"]
  widths = sh["widths"]
  train_batch = B
  n_train = train_batch * 16
  n_timed = 4 * B
  variants = sparse_variants()
  t0 = time.perf_counter()
  if args.lm_workdir:
    acts, src = lm_activations(args.lm_workdir, n_train + n_timed)
    if acts.shape[1] != d:
      raise ValueError(f"--lm_workdir: its MLP is {acts.shape[1]} wide, part 1 needs d_in {d}")
    pool, timed_pool = acts[:n_train], acts[n_train:]
  else:
    pool = sae_step.synthetic_acts(n_train, d, seed=0, scale=args.act_scale)
    timed_pool = sae_step.synthetic_acts(n_timed, d, seed=1, scale=args.act_scale)
    src = f"synthetic heavy-tailed activations (benchmarks/sae_step.py synthetic_acts, scale {args.act_scale:g})"
  log(f"part 1: {n_train:,} + {n_timed:,} activation rows x {d} from {src} in {time.perf_counter() - t0:.1f}s "
      f"(mean row norm {float((pool ** 2).sum(1).mean() ** 0.5):.2f}, {100 * float((pool > 0).mean()):.0f}% non-zero)")
  if args.lm_workdir:
    # --l1 is meant for normalised inputs (E‖c·x‖ = √d, sae.normalize_inputs): on this LM's raw
    # activations the same sparsity pressure is λ / c, used by monojax and the anchor alike.
    c = float(np.sqrt(d) / np.linalg.norm(pool, axis=1).mean())
    args.l1 = args.l1 / c
    log(f"part 1: λ {args.l1 * c:g} on normalised inputs = {args.l1:.3g} on this LM's activations (c = {c:.2f})")
  train_xs = [jnp.asarray(pool[i:i + train_batch]) for i in range(0, n_train, train_batch)]
  key = jax.random.key(0)
  anchor_desc = ""
  for width in widths:
    cfg = sae_cfg(width, train_batch, args)
    groups = core.groups_from_config(cfg)
    state = core.init_state(cfg, d, jax.random.key(width), pool[:16_384], TOTAL_SAE_STEPS)
    update = core.make_update_fn(cfg, groups, TOTAL_SAE_STEPS)
    t0 = time.perf_counter()
    metrics = None
    for i in range(sh["train_updates"]):
      state, metrics = update(state, train_xs[i % len(train_xs)], key)
    jax.block_until_ready(state)
    fvu = float(metrics["fvu"][0]) if metrics is not None else float("nan")
    trained = jax.device_get(state)
    del state
    xs_np = [timed_pool[i * B:(i + 1) * B] for i in range(4)]
    xs = [jnp.asarray(x) for x in xs_np]
    l0m, l0p, l0x = sae_step.l0_stats(sae_step.fresh_copy(trained), xs, catalogue.build(cfg, d)[0])
    log(f"part 1: width {width:,}: {sh['train_updates']} training updates of {train_batch:,} in "
        f"{time.perf_counter() - t0:.1f}s (lr {args.sae_lr:g}, λ {args.l1:g}), fvu {fvu:.3f}; on the timed batches "
        f"L0 mean {l0m:.1f}, p99 {l0p:.0f}, max {l0x}")
    fns, labels, firsts = [], [], []
    for v in variants:
      upd = core.make_update_fn(sae_cfg(width, B, args, v), groups, TOTAL_SAE_STEPS)
      box = {"state": sae_step.fresh_copy(trained), "i": 0}
      run = _step_runner(lambda s, x, upd=upd: upd(s, x, key), box, xs)
      firsts.append(_first_call(run))
      fns.append(run)
      labels.append(f"monojax[sparse_update={v}]" if v is not None else "monojax")
    if anchors_ok:
      import torch
      import torch_sae_anchor as tsa
      anchor = tsa.sae_lens_standard(sae_step.member0_params(trained), lr=cfg.lr, l1=args.l1, b1=cfg.b1, b2=cfg.b2)
      anchor_desc = anchor.describe
      run = _torch_runner(anchor.step, [torch.from_numpy(x.copy()) for x in xs_np])
      firsts.append(_first_call(run))
      fns.append(run)
      labels.append("SAELens")
    res = sae_step.time_round_robin(fns, args.steps, args.warmup)
    log(f"part 1: width {width:,} batch {B:,}: " + "; ".join(
        f"{lab} {t * 1e3:.1f} ms/update ({B / t:,.0f} act/s, spread {100 * s:.0f}%, 1st call {f:.1f}s)"
        for lab, (t, s), f in zip(labels, res, firsts)))
    rates = [B / t for t, _ in res]
    nv = len(variants)
    ROWS.append(Row("sae", f"1 SAE update w{width:,} B{B:,} (L0 {l0m:.0f}/{l0p:.0f}/{l0x})", "act/s", rates[0],
                    rates[1] if nv > 1 else None, rates[nv] if anchors_ok else None,
                    T_SAE.get(width, T_SAE[4096] if width <= 4096 else T_SAE[16384]),
                    flops_per_unit=sae_flops(1, d, width), sparse_sae=sparse_default()))
  if anchor_desc:
    log(f"part 1 anchor: {anchor_desc}")
  log("part 1: L0 in the row names is mean/p99/max features firing per row of the timed batches")


# ------------------------------------------------------------------------------ monojax LM / job state

def base_lm_config(sh, vocab: int):
  from monojax.config import base_config
  d, mlp, heads, d_head, seq, batch = sh["lm"]
  cfg = base_config()
  cfg.model.d_model, cfg.model.d_mlp, cfg.model.n_heads, cfg.model.d_head = d, mlp, heads, d_head
  cfg.model.n_layers = 1
  cfg.data.seq_len, cfg.data.global_batch = seq, batch
  cfg.model.vocab_size = vocab
  cfg.train.dtype = "float32"
  return cfg


def token_batches(sh, vocab: int, n: int = 4, seed: int = 0):
  """n int32 [batch, ctx + 1] arrays of Zipf-distributed tokens (sae_step.zipf_tokens)."""
  import numpy as np
  import sae_step
  rng = np.random.default_rng(seed)
  _, _, _, _, seq, batch = sh["lm"]
  return [sae_step.zipf_tokens(rng, (batch, seq + 1), vocab) for _ in range(n)]


def tl_model_like(sh, vocab: int, params):
  """A HookedTransformer with monojax's config and `params` (a monojax params State, any device)."""
  import jax
  import anchors_tl
  d, mlp, heads, d_head, seq, _ = sh["lm"]
  model = anchors_tl.make_model(d_model=d, d_mlp=mlp, n_heads=heads, d_head=d_head, n_ctx=seq, d_vocab=vocab)
  anchors_tl.load_monojax_params(model, jax.device_get(params).to_pure_dict())
  return model


def loss_check(sh, vocab, graphdef, params, model, tokens) -> str:
  """monojax's lm_forward loss vs TL's built-in loss on the same tokens[:, :ctx] (both: ctx-1 targets)."""
  import jax.numpy as jnp
  import anchors_tl
  from monojax.train import step as step_lib
  seq = sh["lm"][4]
  t = tokens[:, :seq]
  ours = float(step_lib.lm_forward(graphdef, params, jnp.asarray(t), vocab_size=vocab, dtype=jnp.float32,
                                   loss_chunk=0)[0])
  theirs = anchors_tl.loss_on(model, t)
  ok = abs(ours - theirs) < 1e-4 * max(1.0, abs(ours))
  return (f"same weights, same tokens: monojax loss {ours:.6f}, TransformerLens loss {theirs:.6f} -> "
          + ("same model" if ok else "MISMATCH: the TL anchor is not the same model"))


# ------------------------------------------------------------------------------- part 2: LM step

def part_lm(args, sh, anchors_ok: bool) -> None:
  import jax
  import jax.numpy as jnp
  from monojax import sharding
  from monojax.train import metrics as metrics_lib, state as state_lib, step as step_lib
  _, _, _, _, seq, batch = sh["lm"]
  for vocab in sh["vocabs"]:
    cfg = base_lm_config(sh, vocab)
    mesh = sharding.make_mesh(cfg.mesh)
    schedule = state_lib.make_schedule(cfg.train)
    tx = state_lib.make_optimizer(cfg.train, schedule)
    graphdef, state, shardings = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)
    flops_tok = metrics_lib.lm_flops_per_token(cfg.model, seq, state_lib.count_params(state["params"]))
    batch_sh = {"tokens": sharding.batch_sharding(mesh)}
    step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, vocab_size=vocab, dtype="float32",
                                            loss_chunk=cfg.train.loss_chunk, token_bytes=jnp.ones((vocab,), jnp.int32)),
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
    toks = token_batches(sh, vocab)
    batches = [{"tokens": jax.device_put(t, batch_sh["tokens"])} for t in toks]
    fns, labels, firsts = [], [], []
    check = ""
    if anchors_ok:
      import torch
      import anchors_tl
      model = tl_model_like(sh, vocab, state["params"])
      check = loss_check(sh, vocab, graphdef, state["params"], model, toks[0])
      tc = cfg.train
      tl = anchors_tl.lm_step(model, lr=tc.lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                              grad_clip=tc.grad_clip)
    box = {"state": state, "i": 0}
    run = _step_runner(step, box, batches)
    firsts.append(_first_call(run))
    fns.append(run)
    labels.append("monojax")
    if anchors_ok:
      run = _torch_runner(tl, [torch.from_numpy(t[:, :seq].astype("int64")) for t in toks])
      firsts.append(_first_call(run))
      fns.append(run)
      labels.append("TransformerLens")
    res = sae_time(fns, args)
    tokens = batch * seq
    log(f"part 2: LM step vocab {vocab:,} (ctx {seq}, batch {batch}, loss_chunk {cfg.train.loss_chunk}, fp32): "
        + "; ".join(f"{lab} {t * 1e3:.1f} ms ({tokens / t:,.0f} tok/s, spread {100 * s:.0f}%, 1st call {f:.1f}s)"
                    for lab, (t, s), f in zip(labels, res, firsts)))
    if check:
      log(f"part 2: vocab {vocab:,}: {check}")
    ROWS.append(Row("lm", f"2 LM step V{vocab:,}", "tok/s", tokens / res[0][0], None,
                    tokens / res[1][0] if anchors_ok else None, T_LM, flops_per_unit=flops_tok))
    del box, fns


def sae_time(fns, args):
  import sae_step
  return sae_step.time_round_robin(fns, args.steps, args.warmup)


# ----------------------------------------------------------------- parts 3-4: co-trained and frozen jobs

def part_jobs(args, sh, anchors_ok: bool, do_cotrain: bool, do_frozen: bool) -> dict:
  """Parts 3 and 4 per vocab; returns {vocab: monojax co-trained tok/s} (part 5 compares against it)."""
  import jax
  import jax.numpy as jnp
  import sae_step
  from monojax import sharding
  from monojax.sae import catalogue, core
  from monojax.train import cotrain
  from monojax.train import metrics as metrics_lib, state as state_lib, step as step_lib
  d, mlp, _, _, seq, batch = sh["lm"]
  width, positions = sh["job_width"], sh["positions"]
  variants = sparse_variants()
  consumed = {}
  for vocab in sh["vocabs"]:
    cfg = base_lm_config(sh, vocab)
    s = cfg.sae
    s.saes = f"{width}:{args.l1}:2023"
    s.positions_per_context = positions
    s.batch_size = batch * positions       # one SAE update of all sampled vectors per step
    s.start_step = 0
    s.buffer_steps = sh["buffer_steps"]
    s.lr = args.sae_lr
    mesh = sharding.make_mesh(cfg.mesh)
    schedule = state_lib.make_schedule(cfg.train)
    tx = state_lib.make_optimizer(cfg.train, schedule)
    graphdef, lm_state, lm_sh = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)
    n_matmul = state_lib.count_params(lm_state["params"])
    lm_flops_tok = metrics_lib.lm_flops_per_token(cfg.model, seq, n_matmul)
    plan = cotrain.make_plan(cfg, cfg.train.steps)
    groups = core.groups_from_config(s)
    state, full_sh = cotrain.with_sae_and_buffer(cfg, lm_state, lm_sh, mlp, plan, mesh)
    kw = dict(vocab_size=vocab, dtype="float32", loss_chunk=cfg.train.loss_chunk,
              token_bytes=jnp.ones((vocab,), jnp.int32))
    lm_update = step_lib.make_lm_update(graphdef, tx, schedule, **kw)
    # The frozen-LM step as train/job.py builds it: the forward stops at the SAE's layer.
    lm_fwd_only = step_lib.make_lm_forward_only(graphdef, layer=s.layer, dtype="float32")
    frozen_note = ("monojax's frozen step (train/job.py, mode 'frozen') stops at the SAE's layer (no unembedding), "
                   "as TL's stop_at_layer=1")
    batch_sh = {"tokens": sharding.batch_sharding(mesh)}

    def jit_step(phase, upd, variant=None, sh_=full_sh):
      c = cfg.copy_and_resolve_references()
      if variant is not None:
        c.sae.sparse_update = variant
      return jax.jit(cotrain.make_step(c, phase, plan, upd, groups, mesh, s.layer),
                     in_shardings=(sh_, batch_sh), out_shardings=(sh_, None), donate_argnums=0)

    toks = token_batches(sh, vocab, n=8)
    batches = [{"tokens": jax.device_put(t, batch_sh["tokens"])} for t in toks]
    # Bring-up as train/job.py and train/loop.py do it: fill the buffer, initialise the SAE from it, co-train a while.
    t0 = time.perf_counter()
    fill = jit_step("fill", lm_update)
    for i in range(plan.init_step):
      state, _ = fill(state, batches[i % len(batches)])
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 10**9 + plan.init_step)
    state["sae"] = cotrain.make_init_from_buffer(cfg, mlp, plan, full_sh["sae"])(state["buffer"]["acts"], key)
    # A co-trained step at vocab 50k is costly (BUILD_NOTES.md, "The harness"); the SAE's sparsity
    # is reached far cheaper by SAE updates alone on the buffered activations (then a few co-trained
    # steps on top).
    sae_upd = core.make_update_fn(s, groups, plan.total_sae_steps)
    buf_xs = [state["buffer"]["acts"][i * s.batch_size:(i + 1) * s.batch_size]
              for i in range(plan.capacity // s.batch_size)]
    for i in range(sh["sae_pretrain"]):
      state["sae"], _ = sae_upd(state["sae"], buf_xs[i % len(buf_xs)], key)
    train_default = jit_step("train", lm_update, variants[0])
    m = None
    for i in range(sh["cotrain_warm"]):
      state, m = train_default(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    sae_m = jax.device_get(m["sae"]) if m is not None else None
    acts = state["buffer"]["acts"]
    nb = min(4, plan.capacity // s.batch_size)
    l0m, l0p, l0x = sae_step.l0_stats(state["sae"], [acts[i * s.batch_size:(i + 1) * s.batch_size] for i in range(nb)],
                                      catalogue.build(s, mlp)[0])
    log(f"parts 3-4 vocab {vocab:,}: {plan.init_step} fill steps + SAE init from the buffer + {sh['sae_pretrain']} "
        f"SAE updates on it + {sh['cotrain_warm']} co-trained steps in {time.perf_counter() - t0:.1f}s (incl. compiles)"
        + (f"; LM loss {float(m['loss']):.3f}, SAE fvu {float(sae_m['fvu'][0]):.3f}" if m is not None else "")
        + f"; SAE L0 on buffered activations mean {l0m:.1f}, p99 {l0p:.0f}, max {l0x}")
    tokens = batch * seq
    sae_flops_tok = sae_flops(plan.per_step, mlp, width) / tokens
    # forward to the tap: attention (4 d^2 MACs + 2 T d_attn) + W_in (d x mlp), 2 FLOPs per MAC
    fwd_flops_tok = 2.0 * (4 * d * d + d * mlp) + 4.0 * seq * cfg.model.n_heads * cfg.model.d_head
    if m is not None and float(sae_m["fvu"][0]) > 0.9:
      log(f"parts 3-4 vocab {vocab:,}: note: the SAE explains little of these activations (fvu "
          f"{float(sae_m['fvu'][0]):.2f}: a fresh LM's MLP outputs on synthetic tokens), so it fires less than a "
          f"trained SAE on a trained LM would; the sparse update's cost in these rows is a low estimate")
    tl_ready = False
    if anchors_ok:
      import torch
      import anchors_tl
      import torch_sae_anchor as tsa
      model = tl_model_like(sh, vocab, state["params"])
      log(f"parts 3-4 vocab {vocab:,}: {loss_check(sh, vocab, graphdef, state['params'], model, toks[0])}")
      sae_params = sae_step.member0_params(state["sae"])
      tl_toks = [torch.from_numpy(t[:, :seq].astype("int64")) for t in toks]
      tc = cfg.train

      def tl_buffer():
        buf = anchors_tl.Buffer(plan.capacity, mlp, positions, seed=vocab)
        anchors_tl.fill_buffer(model, buf, [tl_toks[i % len(tl_toks)] for i in range(sh["buffer_steps"])])
        return buf

      def tl_sae():
        return tsa.sae_lens_standard(sae_params, lr=s.lr, l1=args.l1, b1=s.b1, b2=s.b2)
      tl_ready = True
    host_state = jax.device_get(state)

    if do_cotrain:
      fns, labels, firsts = [], [], []
      for v in variants:
        step = train_default if v == variants[0] else jit_step("train", lm_update, v)
        run = _step_runner(step, {"state": jax.device_put(host_state, full_sh), "i": 0}, batches)
        firsts.append(_first_call(run))
        fns.append(run)
        labels.append(f"monojax co-trained[sparse_update={v}]" if v is not None else "monojax co-trained")
      lm_only = jit_step("lm", lm_update, sh_=lm_sh)
      run = _step_runner(lm_only, {"state": jax.device_put({k: host_state[k] for k in lm_sh}, lm_sh), "i": 0}, batches)
      firsts.append(_first_call(run))
      fns.append(run)
      labels.append("monojax LM alone")
      if tl_ready:
        tl = anchors_tl.cotrain_step(model, tl_buffer(), tl_sae(), lr=tc.lr, b1=tc.b1, b2=tc.b2, eps=tc.eps,
                                     weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
        run = _torch_runner(tl, tl_toks)
        firsts.append(_first_call(run))
        fns.append(run)
        labels.append("TL + hook + buffer + SAELens")
      res = sae_time(fns, args)
      log(f"part 3: co-trained job vocab {vocab:,} ({plan.per_step:,} activations/step into SAE {width:,}): "
          + _per_token_timings(labels, res, firsts, tokens))
      nv = len(variants)
      rates = [tokens / t for t, _ in res]
      consumed[vocab] = rates[0]
      ROWS.append(Row("cotrain", f"3 co-trained vs TL+SAELens V{vocab:,}", "tok/s", rates[0],
                      rates[1] if nv > 1 else None, rates[nv + 1] if tl_ready else None, T_COTRAIN_VS_TL,
                      flops_per_unit=lm_flops_tok + sae_flops_tok, sparse_sae=sparse_default()))
      ROWS.append(Row("cotrain", f"3 co-trained ÷ LM alone V{vocab:,}", "tok/s", rates[0],
                      rates[1] if nv > 1 else None, rates[nv], T_COTRAIN_OVER_LM, lower_is_better=True,
                      flops_per_unit=lm_flops_tok + sae_flops_tok, sparse_sae=sparse_default(),
                      note="anchor column = monojax LM alone (the 'lm' phase of the same make_step)"
                      if vocab == sh["vocabs"][0] else ""))
      del fns

    if do_frozen:
      fns, labels, firsts = [], [], []
      for v in variants:
        step = jit_step("train", lm_fwd_only, v)
        run = _step_runner(step, {"state": jax.device_put(host_state, full_sh), "i": 0}, batches)
        firsts.append(_first_call(run))
        fns.append(run)
        labels.append(f"monojax frozen[sparse_update={v}]" if v is not None else "monojax frozen")
      if tl_ready:
        tl = anchors_tl.frozen_step(model, tl_buffer(), tl_sae())
        run = _torch_runner(tl, tl_toks)
        firsts.append(_first_call(run))
        fns.append(run)
        labels.append("TL run_with_cache(stop_at_layer=1) + buffer + SAELens")
      res = sae_time(fns, args)
      log(f"part 4: frozen-LM SAE job vocab {vocab:,}: "
          + _per_token_timings(labels, res, firsts, tokens))
      nv = len(variants)
      rates = [tokens / t for t, _ in res]
      first = vocab == sh["vocabs"][0]
      ROWS.append(Row("frozen", f"4 frozen LM + SAE vs TL+SAELens V{vocab:,}", "tok/s", rates[0],
                      rates[1] if nv > 1 else None, rates[nv] if tl_ready else None, T_FROZEN,
                      flops_per_unit=fwd_flops_tok + sae_flops_tok, sparse_sae=sparse_default(),
                      note=frozen_note if first else ""))
      del fns
    del state, host_state
  return consumed


# ------------------------------------------------------------------------------ part 5: data pipeline

def part_pipeline(args, sh, consumed: dict) -> None:
  import tempfile
  from monojax.config import base_config
  from monojax.corpus import build_corpus
  from monojax.data import pipeline, sources
  _, _, _, _, seq, batch = sh["lm"]
  root = os.path.expanduser(sources.DEFAULT_CORPUS_DIR)
  default_ok = build_corpus.load_complete_manifest(root) is not None
  tmp = None
  if not default_ok:
    from pydoc_data.topics import topics
    from monojax.data import pile_io
    tmp = tempfile.TemporaryDirectory(prefix="monojax-pydoc-")
    texts = [topics[k] for k in sorted(topics) if len(topics[k]) > 200]
    recs = [{"text": t, "meta": {"pile_set_name": "Docs: Python", "id": i}} for i, t in enumerate(texts)]
    pile_io.write_shard(os.path.join(tmp.name, "train", "a.jsonl.zst"), recs)
    pile_io.write_shard(os.path.join(tmp.name, "val", "val.jsonl.zst"), recs[:8])
    root = tmp.name
  log(f"part 5: corpus {root}" + ("" if default_ok else " (the default corpus is not built: Python's pydoc topics)"))
  quiet = lambda *a, **k: None  # noqa: E731
  for vocab in sh["vocabs"]:
    cfg = base_config()
    cfg.data.path = root
    # the tokenizer an LM of this vocab reads: NeoX's 50k; the quickstart's corpus BPE for 8k
    cfg.data.tokenizer = "bpe:8192" if (vocab == 8192 and default_ok) else "gpt-neox-20b"
    cfg.data.seq_len, cfg.data.global_batch = seq, batch
    cfg.data.count_tokens = False
    t0 = time.perf_counter()
    tok = pipeline.get_tokenizer(cfg.data, root, log=quiet)
    it = iter(pipeline.host_batches(cfg.data, "train", tokenizer=tok, root=root, host_batch=batch, seed=0,
                                    process_index=0, process_count=1, log=quiet))
    next(it)  # start-up (index, tokenizer threads) is not throughput
    start_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < sh["pipeline_s"]:
      n += int(next(it)["tokens"][:, :-1].size)
    rate = n / (time.perf_counter() - t0)
    del it
    need = consumed.get(vocab)
    log(f"part 5: host_batches (raw, {cfg.data.tokenizer}, ctx {seq}, batch {batch}, workers {cfg.data.workers}, "
        f"{cfg.data.num_threads} read threads): {rate:,.0f} tok/s (first batch after {start_s:.1f}s)"
        + (f"; the co-trained step at vocab {vocab:,} consumes {need:,.0f} tok/s" if need else ""))
    ROWS.append(Row("pipeline", f"5 pipeline ({cfg.data.tokenizer}) vs co-trained V{vocab:,}", "tok/s", rate,
                    None, need, T_PIPELINE, anchor_name="co-trained step",
                    note=("anchor column = tokens/s the monojax co-trained step consumes (part 3); the pipeline "
                          "was measured alone, but in training it shares these cores with the step")
                    if vocab == sh["vocabs"][0] else ""))
  if tmp is not None:
    tmp.cleanup()


# ------------------------------------------------------------------------------------------- main

def main(argv) -> None:
  args, sh = parse_args(argv)
  t_start = time.perf_counter()
  if args.quick and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = QUICK_XLA_FLAGS   # cheaper code generation: a smoke check
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  import jax
  import jaxlib
  import sae_step  # noqa: F401  (defines its absl flags; parse them with their defaults, never used)
  flags.FLAGS(sys.argv[:1])
  import anchors_tl

  anchors_ok = False
  avail = {}
  if not args.no_anchor:
    t0 = time.perf_counter()
    avail = anchors_tl.available()
    anchors_ok = all(avail.values())
    import_s = time.perf_counter() - t0
  load0 = os.getloadavg()
  dev = jax.devices()[0]
  vers = {n: anchors_tl.version(n) or "not installed" for n in ("jax", "jaxlib", "flax", "torch", "sae-lens", "transformer-lens")}
  threads = "-"
  if avail.get("torch"):
    import torch
    vers["torch"] = torch.__version__  # with its build tag (+cpu, +cu130: a CUDA wheel runs on CPU the same)
    threads = f"torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}"
  print(f"versions: jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {vers['flax']}, torch {vers['torch']}, "
        f"sae_lens {vers['sae-lens']}, transformer_lens {vers['transformer-lens']}; python {sys.version.split()[0]} "
        f"({sys.executable})")
  print(f"CPU: {_cpu_model()}; os.cpu_count() = {os.cpu_count()}; {jax.device_count()} x {dev.device_kind} "
        f"({dev.platform}); threads: XLA every core, {threads}; load average {load0[0]:.2f}")
  print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or '(unset)'}"
        + ("  (set by this script's re-exec, docs/cpu-notes.md §1: both sides)"
           if os.environ.get("GLIBC_TUNABLES") == MALLOC_TUNABLES else ""))
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS') or '(unset)'}"
        + ("  (--quick: fast compiles, slower code)" if os.environ.get("XLA_FLAGS") == QUICK_XLA_FLAGS else ""))
  variants = sparse_variants()
  print("monojax SAE update: " + ("no sae.sparse_update option (one monojax column)" if variants == [None] else
                                 f"sae.sparse_update default {variants[0]!r} (column 'mj') and 'off' (column 'mj dense')"))
  if args.no_anchor:
    print("anchors: off (--no_anchor)")
  elif anchors_ok:
    print(f"anchors: torch, sae_lens, transformer_lens import here ({import_s:.1f}s)")
  else:
    print("anchor unavailable: " + ", ".join(k for k, v in avail.items() if not v) + " do not import in this "
          "interpreter: the monojax side only (bash benchmarks/setup_anchors.sh for a venv with them)")
  print(f"timing: median of {args.steps} timed steps after compile + {args.warmup} warm-up, round-robin per row",
        flush=True)
  log(measure_peak("at the start") + "\n")

  if "sae" in args.parts:
    part_sae(args, sh, anchors_ok)
    log(measure_peak("after part 1") + "\n")
  if "lm" in args.parts:
    part_lm(args, sh, anchors_ok)
    log(measure_peak("after part 2") + "\n")
  consumed = {}
  if "cotrain" in args.parts or "frozen" in args.parts or "pipeline" in args.parts:
    consumed = part_jobs(args, sh, anchors_ok, do_cotrain="cotrain" in args.parts or "pipeline" in args.parts,
                         do_frozen="frozen" in args.parts)
    log(measure_peak("after parts 3-4") + "\n")
  if "pipeline" in args.parts:
    part_pipeline(args, sh, consumed)
  log("\n" + measure_peak("at the end"))
  load1 = os.getloadavg()
  print_summary(args.quick, anchors_ok or args.no_anchor)
  print(f"\nload average {load0[0]:.2f} -> {load1[0]:.2f}"
        + ("  [shared machine: other processes were using the CPU; compare only ratios within this run]"
           if max(load0[0], load1[0]) > 0.5 else "")
        + f"; total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
  main(sys.argv[1:])
