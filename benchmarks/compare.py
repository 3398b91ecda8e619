"""monojax measured side by side with SAELens and TransformerLens, in one process (a benchmark, not a test).

  ~/.cache/monojax/anchors-venv/bin/python benchmarks/compare.py            # full run (~40 min on a shared 2-core machine)
  ~/.cache/monojax/anchors-venv/bin/python benchmarks/compare.py --quick    # tiny shapes, 2 timed steps (< 90 s)
  python benchmarks/compare.py --quick      # without torch: the monojax side only ("anchor unavailable")
  ... --lm_workdir=runs/quickstart           # part 1's SAEs trained on that LM's real MLP activations,
                                             # with λ and the recipe of that run's config (--sae picks one)
  ... --target_l0=20:40                      # part 1: sweep λ until the trained SAE's L0 mean is in range
  ... --compute=bf16                         # parts 1-2 in bf16 compute (fp32 master weights) vs torch autocast

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
   (benchmarks/sae_step.py's `synthetic_acts`; λ --l1, default 0.004, raw inputs), or, with
   --lm_workdir, on the MLP activations of that finished LM run (opened with monojax/run.py) on its
   corpus, with the sae config of that run (λ, recipe, lr, input normalisation, resampling; the
   first SAE of sae.saes or --sae's) over a run of --train_updates + the timed steps; --l1 /
   --sae_lr given override it. --target_l0=LO:HI sweeps λ (geometric bisection, a few trainings)
   until the L0 mean is in [LO, HI]. Then L0 mean / p99 / max and FVU are measured on held-out
   activations (the LM run's validation split; synthetic: another seed); an SAE with L0 mean < 5 or
   FVU > 0.5 is not timed ("not measured: the SAE is dead", no ratio, no anchor). Each row is also
   given as a fraction of its floor: the encoder GEMM alone, 2·B·d·m FLOPs at this run's best f32
   matmul probe (printed as floor ÷ step time).
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
sparse SAE update that is a dense-equivalent figure (it does fewer FLOPs). The header prints the CPU
model, core count and ISA flags (benchmarks/machine.py).

--compute=bf16: part 1 times monojax with sae.screen_bf16 "on" (the bf16-screened encoder GEMM with
f32 recheck; "unavail" where this monojax has no such option) against SAELens under
torch.autocast("cpu", bfloat16); part 2 times monojax's train.dtype "bfloat16" (fp32 master weights)
against TransformerLens under the same autocast. Both print whether this CPU has bf16 matrix units
(AVX512-BF16, AMX); parts 3-5 stay fp32. --profile adds which XLA CPU kernels the bf16 dots compile
to (YNNPACK fusions, oneDNN custom calls, XLA's own dots).
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
# --quick trains part 1's tiny SAE for 100 updates (< 1 s): 5 left it at FVU ~1.4, which the dead-SAE rule refuses.
QUICK = dict(lm=(32, 64, 2, 16, 16, 4), vocabs=(512,), d_in=64, widths=(256,), sae_batch=256,
             job_width=128, positions=8, buffer_steps=2, train_updates=100, sae_pretrain=2, cotrain_warm=1,
             pipeline_s=1.0)
DEFAULT_L1 = 0.004        # 2023 λ of the synthetic part 1 and of parts 3-4 (docs/paper-notes.md §3.4)
DEFAULT_SAE_LR = 1e-3     # quickstart's
SWEEP_TRIES = 8           # --target_l0: trainings at most per width


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
  p.add_argument("--sae", default="", help="with --lm_workdir: which SAE of the run's sae.saes gives λ and the recipe "
                                          "(index 0, name sae0; default the first)")
  p.add_argument("--target_l0", default="", help="LO:HI (e.g. 20:40): part 1 sweeps λ (geometric bisection, at most "
                                                 f"{SWEEP_TRIES} trainings per width) until the SAE's L0 mean is in range")
  p.add_argument("--l1", type=float, default=None, help=f"part 1 λ (default: the run's with --lm_workdir, else "
                                                        f"{DEFAULT_L1}); parts 3-4's 2023 λ (default {DEFAULT_L1})")
  p.add_argument("--sae_lr", type=float, default=None, help=f"SAE lr (default: the run's with --lm_workdir, else "
                                                            f"{DEFAULT_SAE_LR:g}, quickstart's)")
  p.add_argument("--compute", choices=("f32", "bf16"), default="f32",
                 help="parts 1-2: bf16 = monojax bf16 compute (train.dtype bfloat16, sae.screen_bf16 on) vs torch "
                      "CPU autocast bf16")
  p.add_argument("--profile", action="store_true", help="with --compute=bf16: which XLA CPU kernels the bf16 dots "
                                                        "compile to (from the compiled HLO)")
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
  a.l0_range = None
  if a.target_l0:
    try:
      lo, hi = (float(v) for v in a.target_l0.split(":"))
    except ValueError:
      lo = hi = -1.0
    if not 0 <= lo < hi:
      p.error(f"--target_l0={a.target_l0}: want LO:HI with 0 <= LO < HI (e.g. 20:40)")
    a.l0_range = (lo, hi)
  if a.sae and not a.lm_workdir:
    p.error("--sae names an SAE of the --lm_workdir run: give --lm_workdir too")
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
  mj_missing: str = ""               # why mj is None ("unavail": this monojax lacks the option)
  dead: str = ""                     # "not measured: the SAE is dead (...)": nothing timed, no ratio
  floor_flops: float | None = None   # SAE rows: the encoder GEMM alone, 2·B·d·m FLOPs per update
  batch: int = 0                     # SAE rows: activations per update
  anchor_rate_for_floor: bool = True  # the anchor column is an SAE update (its floor fraction is printed)

  def ratio(self, rate):
    if rate is None or self.anchor is None:
      return None
    return self.anchor / rate if self.lower_is_better else rate / self.anchor


ROWS: list[Row] = []
_peaks: list[tuple[str, float]] = []   # (library, FLOP/s) of every f32 matmul probe
_bf16_peaks: list[tuple[str, float]] = []   # (library, FLOP/s) of every bf16 probe (--compute=bf16)


def _fmt_rate(x, missing=""):
  return (missing or "-") if x is None else (f"{x / 1e6:.2f}M" if x >= 1e7 else f"{x:,.0f}")


def best_f32_peak():
  """The best f32 matmul probe of this run so far (FLOP/s), any library; None before the first."""
  return max((f for _, f in _peaks), default=None)


def _fmt_ratio(r, lower):
  return "-" if r is None else (f"{r:.3f}" if lower else f"{r:.2f}x")


def print_summary(quick: bool, anchors_ok: bool, compute: str = "f32") -> None:
  peak = max(f for _, f in _peaks) if _peaks else None
  xla_peak = max((f for n, f in _peaks if n == "XLA"), default=None)
  print("\n" + "=" * 30 + " summary " + "=" * 30)
  print("ratio = monojax ÷ anchor in throughput (higher is better); for 'co-trained ÷ LM alone' a step-time ratio "
        "(lower is better). mj = monojax with its default config"
        + ("; in the bf16 rows (--compute=bf16): train.dtype 'bfloat16', sae.screen_bf16 'on', anchors under torch "
           "CPU autocast bf16" if compute == "bf16" else "")
        + ("; mj dense = sae.sparse_update='off'" if any(r.mj_dense is not None for r in ROWS) else "")
        + (f"; %peak = achieved FLOP/s ÷ {peak / 1e9:.1f} GFLOP/s, this machine's f32 matmul peak (the best probe "
           f"of this run, any library; XLA's own best {xla_peak / 1e9:.1f}); * = dense-equivalent FLOPs of a "
           f"sparse SAE update (it does fewer), so it can exceed 100%" if peak else ""))
  head = (f"{'row':<46} {'unit':<6} {'mj':>9} {'mj dense':>9} {'anchor':>9} {'ratio':>7} {'r dense':>7} "
          f"{'target':>8} {'result':>7} {'%peak':>7} {'%pk dns':>7}")
  print(head)
  print("-" * len(head))
  for r in ROWS:
    if r.dead:
      print(f"{r.name:<46} {r.unit:<6} {r.dead}")
      continue
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
    print(f"{r.name:<46} {r.unit:<6} {_fmt_rate(r.mj, r.mj_missing):>9} {_fmt_rate(r.mj_dense):>9} {anc:>9} "
          f"{_fmt_ratio(rat, r.lower_is_better):>7} {_fmt_ratio(rat_d, r.lower_is_better):>7} {tgt:>8} {res:>7} "
          f"{pk(r.mj, '*' if r.sparse_sae else ''):>7} {pk(r.mj_dense):>7}")
  floors = [r for r in ROWS if r.floor_flops and not r.dead]
  if floors and peak:
    print(f"\nSAE floor = the encoder GEMM alone, 2·B·d·m FLOPs at {peak / 1e9:.1f} GFLOP/s (the best f32 matmul probe "
          "of this run); fraction = floor ÷ measured step time (1.0 = the step costs no more than its encoder GEMM)")
    for r in floors:
      fl = r.floor_flops / peak

      def frac(rate, fl=fl, r=r):
        return "-" if rate is None else f"{fl * rate / r.batch:.2f}"
      print(f"  {r.name}: floor {fl * 1e3:.2f} ms; fraction mj {frac(r.mj)}, mj dense {frac(r.mj_dense)}"
            + (f", {r.anchor_name or 'anchor'} {frac(r.anchor)}" if r.anchor_rate_for_floor else ""))
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


def measure_peak(when: str, bf16: bool = False) -> str:
  """f32 matmul FLOP/s of a 4096x512 @ 512x4096 product, best of 5 (benchmarks/lm_step.py's
  anchor shape), jitted in XLA and, when torch imports, in torch (MKL/oneDNN): on some CPUs the
  two libraries' GEMMs differ by 1.4-2x, and the machine's peak is the faster one. Every probe
  is kept; the summary uses the largest (a probe during load from other processes reads low).
  bf16: instead, the product with bf16 inputs and f32 accumulation in XLA, and under torch's CPU
  autocast (bf16), kept apart (never the f32 peak); on a CPU without bf16 matrix units at
  1024x512 @ 512x1024 (torch's autocast GEMM ran at ~0.3 GFLOP/s on an AVX2 EPYC: the full shape
  took a minute a call)."""
  import jax
  import jax.numpy as jnp
  import machine
  import numpy as np
  m, k, n = MATMUL if not bf16 or machine.has_bf16_matrix_units() else (1024, 512, 1024)
  a = np.random.default_rng(0).random((m, k), dtype=np.float32)
  b = np.random.default_rng(1).random((k, n), dtype=np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  try:
    import torch
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  except ImportError:
    torch = None
  if not bf16:
    f = jax.jit(lambda a, b: a @ b)
    runs = {"XLA": lambda: f(ja, jb).block_until_ready()}
    if torch is not None:
      runs["torch"] = lambda: torch.matmul(ta, tb)
  else:
    fb = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    ha, hb = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    runs = {"XLA bf16": lambda: fb(ha, hb).block_until_ready()}
    if torch is not None:
      def autocast_mm():
        with torch.autocast("cpu", dtype=torch.bfloat16):
          return torch.matmul(ta, tb)
      runs["torch autocast bf16"] = autocast_mm
  out = []
  for name, fn in runs.items():
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(5):
      time.sleep(0.005)
      t0 = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - t0)
      spent += time.perf_counter() - t0
      if spent > 5.0:  # a slow path (bf16 without matrix units): fewer repeats
        break
    flops = 2 * m * k * n / best
    (_bf16_peaks if bf16 else _peaks).append((name, flops))
    out.append(f"{name} {flops / 1e9:.1f}")
  return (f"{'' if bf16 else 'f32 '}matmul {m}x{k} @ {k}x{n}, best of {'<= ' if bf16 else ''}5, {when}: "
          + ", ".join(out) + " GFLOP/s"
          + (" (XLA bf16: bf16 inputs, f32 accumulation and output; torch: its autocast, bf16 output)" if bf16 else ""))


def sparse_variants() -> list:
  """[None] when the config has no sae.sparse_update; else [its default, "off"]."""
  from monojax.sae.config import sae_config
  c = sae_config()
  if "sparse_update" not in c:
    return [None]
  return [c.sparse_update] + (["off"] if c.sparse_update != "off" else [])


def screen_bf16_available() -> bool:
  """This monojax has sae.screen_bf16 (the bf16-screened encoder GEMM of monojax/sae/sparse)."""
  from monojax.sae.config import sae_config
  return "screen_bf16" in sae_config()


def screen_default() -> str:
  from monojax.sae.config import sae_config
  return str(sae_config().get("screen_bf16", ""))


def sae_variants(compute: str) -> list[tuple[str, dict]]:
  """Part 1's monojax runners as (label, sae config overrides): the default update (column mj) and
  sparse_update "off" (mj dense); with --compute=bf16, sae.screen_bf16 "on" first (the new mj),
  when this monojax has the option."""
  out = [(f"sparse_update={v}", {"sparse_update": v}) if v is not None else ("default", {})
         for v in sparse_variants()]
  if compute == "bf16" and screen_bf16_available():
    out.insert(0, ("screen_bf16=on", {"screen_bf16": "on"}))
  return out


LR_FIELD = {"2023": "lr", "2024": "lr_2024", "topk": "lr_topk"}   # the sae config field of each recipe's lr


def part1_cfg(base, width: int, l1: float, recipe: str, batch: int, overrides=None):
  """A copy of the sae config `base` training one SAE `width:l1:recipe` on batches of `batch`."""
  import ml_collections
  c = ml_collections.ConfigDict(base.to_dict())
  c.saes = f"{width}:{l1!r}:{recipe}"
  c.batch_size = batch
  for k, v in (overrides or {}).items():
    if k not in c:
      raise KeyError(f"sae.{k}: not an option of this monojax")
    c[k] = v
  return c


def sparse_default() -> bool:
  """monojax's default SAE update is the sparse one (its %peak is then dense-equivalent)."""
  v = sparse_variants()[0]
  return v is not None and v != "off"


def sae_flops(batch: int, d: int, m: int) -> float:
  """Dense FLOPs of one 2023 SAE update's five GEMMs (encoder fwd, decoder fwd, dW_d, dL/df, dW_e)."""
  return 10.0 * batch * d * m


def encoder_flops(batch: int, d: int, m: int) -> float:
  """The encoder GEMM alone, [B, d] @ [d, m]: the floor of an exact SAE update."""
  return 2.0 * batch * d * m


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


# ------------------------------------------------------------------------------- part 1: SAE update

def open_lm_run(workdir: str):
  """The finished LM run in `workdir`, opened with the one run loader (monojax/run.py)."""
  from monojax.run import Run, check_workdir
  return Run.open(check_workdir(workdir, "--lm_workdir"), log=lambda *a, **k: None)


def run_sae_choice(run, which: str):
  """(SAESpec, layer, description) of the SAE of `run` that part 1 takes λ and the recipe from: the
  run's catalogue record `which` (index or name; default the first), its entry in the run's
  sae.saes; for a run that trained no SAE, the entry of its config's sae.saes."""
  import re
  from monojax import errors
  from monojax.sae import catalogue
  cfg = run.cfg
  specs = catalogue.parse_specs(cfg.sae.saes)
  which = which.strip()
  if run.saes:
    rec = run.sae(int(which) if which.isdigit() else which) if which else run.saes[0]
    idx, layer, note = rec.index, rec.layer, ""
  else:
    m = re.fullmatch(r"(?:sae)?(\d+)", which or "0")
    if not m or int(m.group(1)) >= len(specs):
      raise errors.UserInputError(f"--sae={which}: the run's sae.saes has {len(specs)} entries (sae0..)")
    idx, layer, note = int(m.group(1)), cfg.sae.layer, " (the run trained no SAE: the entry of its config)"
  spec = specs[idx]
  return spec, layer, (f"sae{idx} of {run.workdir}/config.json, sae.saes '{cfg.sae.saes}'{note}: λ {spec.l1:g}, "
                       f"recipe {spec.recipe}")


def lm_activations(run, n_rows: int, *, layer: int, split: str = "train", seed: int = 1):
  """[n_rows, d_mlp] float32 MLP post-ReLU activations at `layer` of the run's LM on its corpus,
  computed by the run loader (run.mlp_acts: the run's tokenizer, config, newest checkpoint, its
  train.dtype). split "train": the train split in data seed `seed` (another order than the run's),
  rows shuffled; "val": the run's held-out batches (run.held_out_batches, the rows every evaluation
  of the run reads; cycled when the split has fewer). Returns (acts, description)."""
  import numpy as np
  from monojax.corpus import build_corpus
  from monojax.data import pipeline
  cfg = run.cfg
  per_batch = cfg.data.global_batch * cfg.data.seq_len
  if split == "val":
    batches = run.held_out_batches(-(-n_rows // per_batch))
  else:
    root = build_corpus.ensure_data_root(cfg.data, log=lambda *a, **k: None)
    batches = pipeline.host_batches(cfg.data, "train", tokenizer=run.tokenizer, root=root,
                                    host_batch=cfg.data.global_batch, seed=seed, process_index=0, process_count=1,
                                    log=lambda *a, **k: None)
  rows, n = [], 0
  for batch in batches:
    a = np.asarray(run.mlp_acts(batch["tokens"][:, :-1], layer=layer))
    rows.append(a.reshape(-1, a.shape[-1]))
    n += rows[-1].shape[0]
    if n >= n_rows:
      break
  acts = np.concatenate(rows)
  note = ""
  if len(acts) < n_rows:
    note = f", {len(acts):,} rows cycled to {n_rows:,}"
    acts = np.resize(acts, (n_rows, acts.shape[1]))
  acts = acts[:n_rows]
  if split == "train":
    acts = acts[np.random.default_rng(seed).permutation(len(acts))]
  return acts, (f"LM {run.workdir} (step {run.step}, {cfg.model.d_model}x{cfg.model.d_mlp}, layer {layer}, "
                f"{run.tokenizer.spec}), ctx {cfg.data.seq_len}, {split} split{note}")


def pretrain_sae(cfg, d: int, train_xs, init_acts, updates: int, total: int, resample_acts=None):
  """A fresh state of cfg's one SAE (seeded by its width) after `updates` updates cycling through
  train_xs, in a run of `total` SAE steps; with resample_acts, the recipe's dead-feature resampling
  at its resample_at fractions of `total`, as train/loop.py calls it. Returns (host state, last
  metrics or None, [dead count at each resampling])."""
  import jax
  import jax.numpy as jnp
  from monojax.sae import core
  width = catalogue_width(cfg)
  groups = core.groups_from_config(cfg)
  key = jax.random.key(0)
  state = core.init_state(cfg, d, jax.random.key(width), init_acts, total)
  update = core.make_update_fn(cfg, groups, total)
  at = set(core.resample_steps(cfg, total)) if resample_acts is not None else set()
  resample = core.make_resample_fn(cfg, groups, total) if at else None
  sample = jnp.asarray(resample_acts) if at else None
  metrics, dead = None, []
  for i in range(updates):
    state, metrics = update(state, train_xs[i % len(train_xs)], key)
    if i + 1 in at:
      state, info = resample(state, sample, jax.random.fold_in(key, i + 1))
      dead.append(int(jax.device_get(info["dead"])[0]))
  jax.block_until_ready(state)
  out = jax.device_get(state)
  del state
  return out, (jax.device_get(metrics) if metrics is not None else None), dead


def catalogue_width(cfg) -> int:
  from monojax.sae import catalogue
  return catalogue.parse_specs(cfg.saes)[0].width


def fit_l1(train, l1: float, l0_range, width: int):
  import sae_step
  """Trains with λ l1, then (with l0_range = (LO, HI)) sweeps λ by geometric bisection until the
  held-out L0 mean is in [LO, HI] (×/÷ 4 until the target is bracketed), at most SWEEP_TRIES
  trainings; train(λ) -> (cfg, state, quality, info). Returns the try closest to the range (all
  when none got there): (λ, cfg, state, quality, info, tries)."""
  import math
  best, too_small, too_large = None, None, None   # too_small: a λ whose L0 was above HI
  tries = 1 if l0_range is None else SWEEP_TRIES
  for t in range(tries):
    cfg, state, q, info = train(l1)
    l0 = q["l0_mean"]
    if l0_range is None:
      return l1, cfg, state, q, info, 1
    lo, hi = l0_range
    dist = 0.0 if lo <= l0 <= hi else (math.log(l0 / hi) if l0 > hi else math.log(lo / max(l0, 1e-3)))
    verdict = "in range" if dist == 0 else ("too dense: λ up" if l0 > hi else "too sparse: λ down")
    log(f"part 1: width {width:,}: λ try {t + 1}: λ {l1:.4g} -> held-out L0 mean {l0:.1f}, FVU {q['fvu']:.3f} "
        f"({verdict}, target {lo:g}-{hi:g}){info}")
    # In range wins (dead or not: the guard then says so); else a live SAE first, then the nearest L0.
    rank = (0, False, 0.0) if dist == 0 else (1, sae_step.dead_reason(q) is not None, dist)
    if best is None or rank < best[0]:
      best = (rank, l1, cfg, state, q, info)
    del state
    if dist == 0:
      break
    if l0 > hi:
      too_small = l1
    else:
      too_large = l1
    l1 = math.sqrt(too_small * too_large) if too_small and too_large else (l1 * 4 if l0 > hi else l1 / 4)
  (_, _, dist), l1, cfg, state, q, info = best
  if dist > 0:
    log(f"part 1: width {width:,}: L0 target {l0_range[0]:g}-{l0_range[1]:g} not reached in {t + 1} trainings; "
        f"closest (a live SAE first): λ {l1:.4g} (L0 mean {q['l0_mean']:.1f}, FVU {q['fvu']:.3f})")
  return l1, cfg, state, q, info, t + 1


def part_sae(args, sh, anchors_ok: bool) -> None:
  import jax
  import jax.numpy as jnp
  import machine
  import numpy as np
  import sae_step
  from monojax.sae import catalogue, core
  from monojax.sae.config import sae_config
  d, B = sh["d_in"], sh["sae_batch"]
  widths = sh["widths"]
  train_batch = B
  n_train = train_batch * 16
  n_timed = 4 * B
  bf16 = args.compute == "bf16"
  variants = sae_variants(args.compute)
  screen = bf16 and screen_bf16_available()
  t0 = time.perf_counter()
  if args.lm_workdir:
    run = open_lm_run(args.lm_workdir)
    spec, layer, where = run_sae_choice(run, args.sae)
    base = run.cfg.sae
    recipe, l1 = spec.recipe, spec.l1
    pool, src = lm_activations(run, n_train, layer=layer, split="train")
    timed_pool, held_src = lm_activations(run, n_timed, layer=layer, split="val")
    d = pool.shape[1]
    src += f"; held-out: {held_src.split(', ')[-1]}"
    # The recipe's step fractions (resampling, windows, 2024's λ warm-up and lr decay) apply to a
    # run of the pre-training plus the timed steps, as to the run's own SAE steps.
    total = sh["train_updates"] + 2 + args.warmup + args.steps
    resample = True
    l1_src = f"the LM run: {where}"
    del run
  else:
    base = sae_config()
    base.normalize_inputs = False  # raw activations on both sides, as SAELens' standard SAE trains
    base.lr = DEFAULT_SAE_LR
    recipe, l1 = "2023", DEFAULT_L1
    pool = sae_step.synthetic_acts(n_train, d, seed=0, scale=args.act_scale)
    timed_pool = sae_step.synthetic_acts(n_timed, d, seed=1, scale=args.act_scale)
    src = f"synthetic heavy-tailed activations (benchmarks/sae_step.py synthetic_acts, scale {args.act_scale:g})"
    total, resample = TOTAL_SAE_STEPS, False
    l1_src = "the synthetic default (2023 recipe on raw inputs; --lm_workdir takes a run's, --l1 sets one)"
  base = part1_cfg(base, widths[0], l1, recipe, train_batch)   # an unlocked copy
  if args.l1 is not None:
    l1, l1_src = args.l1, "--l1"
  if args.sae_lr is not None:
    base[LR_FIELD[recipe]] = args.sae_lr
  lr = base[LR_FIELD[recipe]]
  log(f"part 1: {n_train:,} + {n_timed:,} activation rows x {d} from {src} in {time.perf_counter() - t0:.1f}s "
      f"(mean row norm {float((pool ** 2).sum(1).mean() ** 0.5):.2f}, {100 * float((pool > 0).mean()):.0f}% non-zero)")
  log(f"part 1: λ {l1:g} from {l1_src}; recipe {recipe}, lr {lr:g}, normalize_inputs {base.normalize_inputs}, "
      + (f"a run of {total:,} SAE steps ({sh['train_updates']} pre-training + the timed ones; resampling at "
         f"{catalogue_resample(base, total)})" if resample else "no resampling (run length 1M)")
      + (f"; --target_l0 {args.l0_range[0]:g}-{args.l0_range[1]:g}: λ swept per width" if args.l0_range else ""))
  if bf16:
    log(f"part 1 [bf16]: {machine.bf16_units_line()}")
    log("part 1 [bf16]: monojax " + ("sae.screen_bf16 'on' (bf16-screened encoder GEMM, f32 recheck; column mj)"
                                     if screen else "bf16 SAE update: unavailable (this monojax has no sae.screen_bf16 "
                                     "option; the f32 runners are timed for reference)")
        + "; SAELens under torch.autocast('cpu', bfloat16)")
  train_xs = [jnp.asarray(pool[i:i + train_batch]) for i in range(0, n_train, train_batch)]
  init_acts = pool[:min(len(pool), int(base.init_inputs) if args.lm_workdir else 16_384)]  # the recipe's init sample
  resample_acts = pool[:int(base.resample_inputs)] if resample else None
  xs_np = [timed_pool[i * B:(i + 1) * B] for i in range(4)]
  xs = [jnp.asarray(x) for x in xs_np]
  anchor_desc = ""
  for width in widths:
    t0 = time.perf_counter()

    def train(lam, width=width):
      cfg = part1_cfg(base, width, lam, recipe, train_batch)
      state, metrics, dead = pretrain_sae(cfg, d, train_xs, init_acts, sh["train_updates"], total, resample_acts)
      q = sae_step.sae_quality(state, xs, catalogue.build(cfg, d)[0])
      info = (f"; last training fvu {float(metrics['fvu'][0]):.3f}" if metrics is not None else "") + (
          f"; dead at the resamplings {dead}" if dead else "")
      return cfg, state, q, info
    l1_w, cfg, trained, q, info, n_tries = fit_l1(train, l1, args.l0_range, width)
    if args.l0_range:
      l1 = l1_w   # the next width's sweep starts here
    sae = catalogue.build(cfg, d)[0]
    l0m, l0p, l0x = q["l0_mean"], q["l0_p99"], q["l0_max"]
    log(f"part 1: width {width:,}: {n_tries} x {sh['train_updates']} training updates of {train_batch:,} in "
        f"{time.perf_counter() - t0:.1f}s (lr {lr:g}, λ {l1_w:.4g}){info}; on the held-out (timed) batches "
        f"L0 mean {l0m:.1f}, p99 {l0p:.0f}, max {l0x}, FVU {q['fvu']:.3f}")
    name = f"1 SAE {'bf16' if bf16 else 'update'} w{width:,} B{B:,} (L0 {l0m:.0f}/{l0p:.0f}/{l0x})"
    dead = sae_step.dead_reason(q)
    if dead:
      log(f"part 1: width {width:,} batch {B:,}: {dead}")
      ROWS.append(Row("sae", name, "act/s", None, dead=dead))
      del trained
      continue
    fns, labels, firsts = [], [], []
    groups = core.groups_from_config(cfg)
    key = jax.random.key(0)
    for label, overrides in variants:
      upd = core.make_update_fn(part1_cfg(base, width, l1_w, recipe, B, overrides), groups, total)
      box = {"state": sae_step.fresh_copy(trained), "i": 0}
      run_ = _step_runner(lambda s, x, upd=upd, key=key: upd(s, x, key), box, xs)
      firsts.append(_first_call(run_))
      fns.append(run_)
      labels.append(f"monojax[{label}]")
    anchor_ok = anchors_ok and recipe in ("2023", "2024")
    if anchor_ok:
      import torch
      import torch_sae_anchor as tsa
      scale = float(trained["input_scale"]) if sae.scaled else 1.0   # the anchor trains on what monojax's SAE sees
      anchor = tsa.sae_lens_standard(sae_step.member0_params(trained), lr=lr, l1=l1_w, b1=cfg.b1, b2=cfg.b2,
                                     autocast_bf16=bf16)
      anchor_desc = anchor.describe + (f"; fed the inputs times the SAE's input scale {scale:.4g}"
                                       if scale != 1 else "")
      run_ = _torch_runner(anchor.step, [torch.from_numpy(np.ascontiguousarray(x * np.float32(scale))) for x in xs_np])
      firsts.append(_first_call(run_))
      fns.append(run_)
      labels.append("SAELens" + (" autocast bf16" if bf16 else ""))
    elif anchors_ok:
      anchor_desc = f"no SAELens anchor is wired for the {recipe} recipe"
    res = sae_step.time_round_robin(fns, args.steps, args.warmup)
    peak = best_f32_peak()
    floor_s = encoder_flops(B, d, width) / peak if peak else None
    log(f"part 1: width {width:,} batch {B:,}: " + "; ".join(
        f"{lab} {t * 1e3:.1f} ms/update ({B / t:,.0f} act/s, spread {100 * s:.0f}%, 1st call {f:.1f}s"
        + (f", floor ÷ step {floor_s / t:.2f}" if floor_s else "") + ")"
        for lab, (t, s), f in zip(labels, res, firsts)))
    if floor_s:
      log(f"part 1: width {width:,}: floor = the encoder GEMM alone, 2·B·d·m = "
          f"{encoder_flops(B, d, width) / 1e9:.2f} "
          f"GFLOP at {peak / 1e9:.1f} GFLOP/s (best f32 matmul probe so far) = {floor_s * 1e3:.2f} ms")
    rates = [B / t for t, _ in res]
    nv = len(variants)
    by_label = {lab: r for (lab, _), r in zip(variants, rates)}
    if bf16:
      mj = by_label.get("screen_bf16=on")
      note = ("mj = sae.screen_bf16 'on'" if screen else "mj unavailable: no sae.screen_bf16 in this monojax")
      note += "; mj dense = f32 dense; " + ", ".join(f"f32 {lab} {r:,.0f} act/s" for lab, r in by_label.items()
                                                      if lab.startswith("sparse_update="))
      note += f"; anchor = SAELens under autocast bf16; {machine.bf16_units_line(short=True)}"
    else:
      mj, note = rates[0], ""
    ROWS.append(Row("sae", name, "act/s", mj, by_label.get("sparse_update=off"), rates[nv] if anchor_ok else None,
                    T_SAE.get(width, T_SAE[4096] if width <= 4096 else T_SAE[16384]),
                    flops_per_unit=sae_flops(1, d, width), sparse_sae=sparse_default() or screen,
                    mj_missing="unavail" if mj is None else "", floor_flops=encoder_flops(B, d, width), batch=B,
                    anchor_name="SAELens", note=note))
    del trained, fns
  if anchor_desc:
    log(f"part 1 anchor: {anchor_desc}")
  log("part 1: L0 in the row names is mean/p99/max features firing per row of the held-out (timed) batches")


def catalogue_resample(cfg, total: int) -> str:
  from monojax.sae import core
  steps = core.resample_steps(cfg, total)
  return ", ".join(map(str, steps)) if steps else "none (not a 2023 SAE)"


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


def loss_check(sh, vocab, graphdef, params, model, tokens, bf16: bool = False) -> str:
  """monojax's lm_forward loss vs TL's built-in loss on the same tokens[:, :ctx] (both: ctx-1 targets).
  bf16: monojax in bf16 compute vs TL under torch's CPU autocast (equal to rounding: 2e-2)."""
  import jax.numpy as jnp
  import anchors_tl
  from monojax.train import step as step_lib
  seq = sh["lm"][4]
  t = tokens[:, :seq]
  ours = float(step_lib.lm_forward(graphdef, params, jnp.asarray(t), vocab_size=vocab,
                                   dtype=jnp.bfloat16 if bf16 else jnp.float32, loss_chunk=0)[0])
  theirs = anchors_tl.loss_on(model, t, autocast_bf16=bf16)
  if bf16:
    ok = abs(ours - theirs) < 2e-2 * max(1.0, abs(ours))
    return (f"bf16: monojax loss {ours:.4f}, TransformerLens autocast loss {theirs:.4f} -> "
            + ("equal to bf16 rounding" if ok else "DIFFERENT beyond bf16 rounding"))
  ok = abs(ours - theirs) < 1e-4 * max(1.0, abs(ours))
  return (f"same weights, same tokens: monojax loss {ours:.6f}, TransformerLens loss {theirs:.6f} -> "
          + ("same model" if ok else "MISMATCH: the TL anchor is not the same model"))


# ------------------------------------------------------------------------------- part 2: LM step

def make_lm(sh, vocab: int, dtype: str = "float32"):
  """monojax's LM at part 2's shapes: (graphdef, state, shardings, jitted train step, batch sharding,
  FLOPs per token, loss_chunk). dtype: train.dtype (bfloat16: bf16 compute, fp32 master weights)."""
  import jax
  import jax.numpy as jnp
  from monojax import sharding
  from monojax.train import metrics as metrics_lib, state as state_lib, step as step_lib
  seq = sh["lm"][4]
  cfg = base_lm_config(sh, vocab)
  cfg.train.dtype = dtype
  mesh = sharding.make_mesh(cfg.mesh)
  schedule = state_lib.make_schedule(cfg.train)
  tx = state_lib.make_optimizer(cfg.train, schedule)
  graphdef, state, shardings = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)
  flops_tok = metrics_lib.lm_flops_per_token(cfg.model, seq, state_lib.count_params(state["params"]))
  batch_sh = {"tokens": sharding.batch_sharding(mesh)}
  step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, vocab_size=vocab, dtype=dtype,
                                          loss_chunk=cfg.train.loss_chunk, token_bytes=jnp.ones((vocab,), jnp.int32)),
                 in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
  return cfg, graphdef, state, shardings, step, batch_sh, flops_tok


def xla_kernels(hlo: str) -> str:
  """What a compiled XLA CPU program's products run on, counted in its HLO text: YNNPACK fusions
  (XLA 0.10's CPU backend hands dots to YNNPACK), oneDNN custom calls, XLA's own dot instructions."""
  import collections
  import re
  kinds = collections.Counter(re.findall(r'"kind":"(__\w+)"', hlo))
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
  onednn = sum(n for t, n in targets.items() if "onednn" in t.lower() or "mkl" in t.lower())
  return (f"{len(re.findall(r' dot[(]', hlo))} dot instructions, "
          + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no custom fusions")
          + f", {onednn} oneDNN custom calls"
          + (f", other custom calls {dict(targets)}" if targets and not onednn else ""))


def xla_bf16_profile(sh) -> str:
  """--profile: the compiled HLO of a bf16 matmul (bf16 in, f32 out) and of part 2's bf16 LM step
  (first vocab), f32 beside them: which kernels XLA uses. Whether YNNPACK's bf16 kernels use
  AVX512-BF16 / AMX is its run-time CPU dispatch, not visible in the HLO; the bf16 matmul probe
  says whether they are faster than f32 here."""
  import jax
  import jax.numpy as jnp
  import machine
  out = []
  m, k, n = MATMUL
  for dt in (jnp.float32, jnp.bfloat16):
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    hlo = f.lower(jax.ShapeDtypeStruct((m, k), dt), jax.ShapeDtypeStruct((k, n), dt)).compile().as_text()
    out.append(f"matmul {jnp.dtype(dt).name}: {xla_kernels(hlo)}")
  vocab = sh["vocabs"][0]
  for dtype in ("float32", "bfloat16"):
    _, _, state, _, step, _, _ = make_lm(sh, vocab, dtype)
    _, _, _, _, seq, batch = sh["lm"]
    hlo = step.lower(state, {"tokens": jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)}).compile().as_text()
    out.append(f"LM step V{vocab:,} {dtype}: {xla_kernels(hlo)}")
    del state, step
  flags = os.environ.get("XLA_FLAGS") or "(unset)"
  return ("--profile (compiled HLO, XLA_FLAGS " + flags + "): " + "; ".join(out)
          + ". oneDNN custom calls would show XLA routing dots to oneDNN (which uses AMX/AVX512-BF16 where "
          "present); YNNPACK fusions dispatch on the CPU's ISA at run time, which the HLO does not show: compare "
          f"the bf16 and f32 matmul probes. {machine.bf16_units_line()}")


def part_lm(args, sh, anchors_ok: bool) -> None:
  import jax
  import machine
  _, _, _, _, seq, batch = sh["lm"]
  bf16 = args.compute == "bf16"
  dtype = "bfloat16" if bf16 else "float32"
  if bf16:
    log(f"part 2 [bf16]: monojax train.dtype 'bfloat16' (fp32 master weights and loss) vs TransformerLens under "
        f"torch.autocast('cpu', bfloat16); {machine.bf16_units_line()}")
  for vocab in sh["vocabs"]:
    cfg, graphdef, state, shardings, step, batch_sh, flops_tok = make_lm(sh, vocab, dtype)
    toks = token_batches(sh, vocab)
    batches = [{"tokens": jax.device_put(t, batch_sh["tokens"])} for t in toks]
    fns, labels, firsts = [], [], []
    check = ""
    if anchors_ok:
      import torch
      import anchors_tl
      model = tl_model_like(sh, vocab, state["params"])
      check = loss_check(sh, vocab, graphdef, state["params"], model, toks[0])
      if bf16:
        check += "; " + loss_check(sh, vocab, graphdef, state["params"], model, toks[0], bf16=True)
      tc = cfg.train
      tl = anchors_tl.lm_step(model, lr=tc.lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                              grad_clip=tc.grad_clip, autocast_bf16=bf16)
    box = {"state": state, "i": 0}
    run = _step_runner(step, box, batches)
    firsts.append(_first_call(run))
    fns.append(run)
    labels.append("monojax" + (" bf16" if bf16 else ""))
    if anchors_ok:
      run = _torch_runner(tl, [torch.from_numpy(t[:, :seq].astype("int64")) for t in toks])
      firsts.append(_first_call(run))
      fns.append(run)
      labels.append("TransformerLens" + (" autocast bf16" if bf16 else ""))
    res = sae_time(fns, args)
    tokens = batch * seq
    log(f"part 2: LM step vocab {vocab:,} (ctx {seq}, batch {batch}, loss_chunk {cfg.train.loss_chunk}, "
        f"{'bf16 compute' if bf16 else 'fp32'}): "
        + "; ".join(f"{lab} {t * 1e3:.1f} ms ({tokens / t:,.0f} tok/s, spread {100 * s:.0f}%, 1st call {f:.1f}s)"
                    for lab, (t, s), f in zip(labels, res, firsts)))
    if check:
      log(f"part 2: vocab {vocab:,}: {check}")
    ROWS.append(Row("lm", f"2 LM step{' bf16' if bf16 else ''} V{vocab:,}", "tok/s", tokens / res[0][0], None,
                    tokens / res[1][0] if anchors_ok else None, T_LM, flops_per_unit=flops_tok,
                    note=(f"bf16 compute vs TL under autocast bf16; {machine.bf16_units_line(short=True)}"
                          if bf16 and vocab == sh["vocabs"][0] else "")))
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
    job_l1 = args.l1 if args.l1 is not None else DEFAULT_L1
    s.saes = f"{width}:{job_l1}:2023"
    s.positions_per_context = positions
    s.batch_size = batch * positions       # one SAE update of all sampled vectors per step
    s.start_step = 0
    s.buffer_steps = sh["buffer_steps"]
    s.lr = args.sae_lr if args.sae_lr is not None else DEFAULT_SAE_LR
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
    q = sae_step.sae_quality(state["sae"], [acts[i * s.batch_size:(i + 1) * s.batch_size] for i in range(nb)],
                             catalogue.build(s, mlp)[0])
    l0m, l0p, l0x = q["l0_mean"], q["l0_p99"], q["l0_max"]
    dead = sae_step.dead_reason(q, on="buffered activations")
    log(f"parts 3-4 vocab {vocab:,}: {plan.init_step} fill steps + SAE init from the buffer + {sh['sae_pretrain']} "
        f"SAE updates on it + {sh['cotrain_warm']} co-trained steps in {time.perf_counter() - t0:.1f}s (incl. compiles)"
        + (f"; LM loss {float(m['loss']):.3f}, SAE fvu {float(sae_m['fvu'][0]):.3f}" if m is not None else "")
        + f"; SAE on buffered activations: L0 mean {l0m:.1f}, p99 {l0p:.0f}, max {l0x}, FVU {q['fvu']:.3f}")
    tokens = batch * seq
    sae_flops_tok = sae_flops(plan.per_step, mlp, width) / tokens
    # forward to the tap: attention (4 d^2 MACs + 2 T d_attn) + W_in (d x mlp), 2 FLOPs per MAC
    fwd_flops_tok = 2.0 * (4 * d * d + d * mlp) + 4.0 * seq * cfg.model.n_heads * cfg.model.d_head
    job_note = ""
    if dead:  # timed all the same: these rows time a job, of which the SAE update is one part
      job_note = (f"its SAE is {dead.replace('not measured: the SAE is ', '')} by part 1's rule (a fresh LM's MLP "
                  "outputs on synthetic tokens): the SAE update's share here is a low estimate")
      log(f"parts 3-4 vocab {vocab:,}: note: {job_note}")
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
        return tsa.sae_lens_standard(sae_params, lr=s.lr, l1=job_l1, b1=s.b1, b2=s.b2)
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
                      flops_per_unit=lm_flops_tok + sae_flops_tok, sparse_sae=sparse_default(), note=job_note))
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
                      note="; ".join(x for x in (frozen_note if first else "", job_note) if x)))
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
  import machine

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
  print(f"CPU: {machine.cpu_line()}; {jax.device_count()} x {dev.device_kind} "
        f"({dev.platform}); threads: XLA every core, {threads}; load average {load0[0]:.2f}")
  print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or '(unset)'}"
        + ("  (set by this script's re-exec, docs/cpu-notes.md §1: both sides)"
           if os.environ.get("GLIBC_TUNABLES") == MALLOC_TUNABLES else ""))
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS') or '(unset)'}"
        + ("  (--quick: fast compiles, slower code)" if os.environ.get("XLA_FLAGS") == QUICK_XLA_FLAGS else ""))
  variants = sparse_variants()
  print("monojax SAE update: " + ("no sae.sparse_update option (one monojax column)" if variants == [None] else
                                 f"sae.sparse_update default {variants[0]!r} (column 'mj') and 'off' (column 'mj dense')")
        + (f"; sae.screen_bf16 default {screen_default()!r} (the sparse update's encoder GEMM in bf16 with an f32 "
           "recheck" + (f"; auto is {'on' if machine.has_bf16_matrix_units() else 'off'} here: it follows the CPU's "
                        "bf16 matrix units" if screen_default() == "auto" else "") + ")"
           if screen_bf16_available() else ""))
  if args.no_anchor:
    print("anchors: off (--no_anchor)")
  elif anchors_ok:
    print(f"anchors: torch, sae_lens, transformer_lens import here ({import_s:.1f}s)")
  else:
    print("anchor unavailable: " + ", ".join(k for k, v in avail.items() if not v) + " do not import in this "
          "interpreter: the monojax side only (bash benchmarks/setup_anchors.sh for a venv with them)")
  print(f"timing: median of {args.steps} timed steps after compile + {args.warmup} warm-up, round-robin per row",
        flush=True)
  bf16 = args.compute == "bf16"
  if bf16:
    print(f"compute: bf16 in parts 1-2 (monojax train.dtype 'bfloat16' with fp32 master weights, sae.screen_bf16 "
          f"{'on' if screen_bf16_available() else 'unavailable'}; torch.autocast('cpu', bfloat16) on the anchors); "
          f"parts 3-5 fp32. {machine.bf16_units_line()}")
  log(measure_peak("at the start") + "\n")
  if bf16:
    log(measure_peak("at the start", bf16=True) + "\n")
    slow = {n: f for n, f in _bf16_peaks}
    if not machine.has_bf16_matrix_units() and not args.quick and "torch autocast bf16" in slow and _peaks:
      f32_torch = max((f for n, f in _peaks if n == "torch"), default=max(f for _, f in _peaks))
      ac = slow["torch autocast bf16"]
      log(f"WARNING: no bf16 matrix units here, and torch's autocast GEMM ran at {ac / 1e9:.2f} GFLOP/s vs "
          f"{f32_torch / 1e9:.1f} f32: the autocast anchors will take ~{f32_torch / ac:.0f}x their fp32 time (hours at "
          "full shapes). --compute=bf16 is for CPUs with AVX512-BF16 or AMX; here, --quick.\n")
  if bf16 and args.profile:
    log(xla_bf16_profile(sh) + "\n")

  if "sae" in args.parts:
    part_sae(args, sh, anchors_ok)
    log(measure_peak("after part 1") + "\n")
  if "lm" in args.parts:
    part_lm(args, sh, anchors_ok)
    log(measure_peak("after part 2") + "\n")
  consumed = {}
  if bf16 and set(args.parts) & {"cotrain", "frozen", "pipeline"}:
    log("parts 3-5: fp32 (--compute=bf16 covers parts 1-2)")
  if "cotrain" in args.parts or "frozen" in args.parts or "pipeline" in args.parts:
    consumed = part_jobs(args, sh, anchors_ok, do_cotrain="cotrain" in args.parts or "pipeline" in args.parts,
                         do_frozen="frozen" in args.parts)
    log(measure_peak("after parts 3-4") + "\n")
  if "pipeline" in args.parts:
    part_pipeline(args, sh, consumed)
  log("\n" + measure_peak("at the end"))
  if bf16:
    log(measure_peak("at the end", bf16=True))
  load1 = os.getloadavg()
  print_summary(args.quick, anchors_ok or args.no_anchor, args.compute)
  if bf16:
    print(f"--compute=bf16: {machine.bf16_units_line()}; %peak is against the f32 matmul peak"
          + (f"; best bf16 probes: " + ", ".join(f"{n} {max(f for m, f in _bf16_peaks if m == n) / 1e9:.1f}"
                                                 for n in dict(_bf16_peaks)) + " GFLOP/s" if _bf16_peaks else ""))
  print(f"\nload average {load0[0]:.2f} -> {load1[0]:.2f}"
        + ("  [shared machine: other processes were using the CPU; compare only ratios within this run]"
           if max(load0[0], load1[0]) > 0.5 else "")
        + f"; total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
  from monojax import errors
  try:
    main(sys.argv[1:])
  except errors.UserInputError as e:  # a bad --lm_workdir / --sae: one line, as the verbs print it
    sys.exit(f"compare.py: {e}")
