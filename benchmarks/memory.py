"""Peak memory per configuration, from XLA's buffer assignment (lower + compile only; nothing runs).

  python benchmarks/memory.py              # ~2-4 minutes of compiling on 2 cores
  python benchmarks/memory.py --quick      # fewer shapes (a smoke check)

For each configuration the jitted step is lowered on abstract inputs (jax.ShapeDtypeStruct with
their shardings, so no parameter or activation is ever allocated), compiled, and
`compiled.memory_analysis()` is read: per device, temp (XLA's scratch: activations, gradients,
fusion outputs), argument and output bytes. "peak" below is temp + argument + output, as the issue
asks. Arguments donated to the step (the LM and SAE states are) are aliased by outputs, so the
true high-water mark is nearer peak - aliased; the "alias" column shows how much that is. Both
numbers come from the CPU compiler: a GPU/TPU compiler fuses and schedules differently, so treat
them as an estimate of the same order, not as that device's exact figure.

1. LM step (`train.step.make_train_step`, the training loop's jit: state donated) at the quickstart
   shapes (ctx 128, batch 32, vocab 8,192, fp32) and the paper shapes of configs/transformer.py
   (ctx 256, batch 256, vocab 50,304, bf16 compute with fp32 master weights, and fp32), each with
   train.loss_chunk 0 (whole sequence) and 64. One device.
2. SAE update (`sae.core.update`, 2023 recipe, d_in 512, batch 8,192, state donated) at widths
   4,096 ... 131,072 with the feature axis sharded over a `model` mesh axis of 1, 2, 4 or 8 CPU
   devices (`sae.core.shardings`, `sharding.make_mesh` with mesh shape (1, k): the batch is
   replicated, every device holds width/k features). Per-device bytes.
3. The largest SAE width whose peak fits 16 / 32 / 80 GiB per device, per model-axis size: peak is
   linear in the width (fitted on part 2), the fitted answer is rounded down to a multiple of
   1,024·k and then checked by compiling at that width (and stepping down until it fits).

JAX_NUM_CPU_DEVICES=8 is set before jax is imported (8 virtual CPU devices; compiling for them
needs no memory).
"""
from __future__ import annotations

import functools
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import machine  # noqa: E402 (benchmarks/machine.py, beside this file)
from absl import app, flags, logging  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "fewer shapes: a smoke check")
_WIDTHS = flags.DEFINE_list("widths", ["4096", "8192", "16384", "32768", "65536", "131072"], "SAE widths (part 2)")
_MODEL = flags.DEFINE_list("model_axis", ["1", "2", "4", "8"], "model-axis sizes (part 2/3)")
_BUDGETS = flags.DEFINE_list("budgets_gib", ["16", "32", "80"], "per-device memory budgets (part 3)")
_D_IN = flags.DEFINE_integer("d_in", 512, "SAE input width")
_BATCH = flags.DEFINE_integer("batch", 8192, "SAE batch")

GIB = 2**30
TOTAL_SAE_STEPS = 1_000_000
_PROBE_WIDTH = 96  # the small width a real state is made at, then re-shaped abstractly (must not equal d_in)

# name -> (ctx, batch, vocab, dtype)
LM_SHAPES = {
    "quickstart": (128, 32, 8192, "float32"),
    "paper bf16": (256, 256, 50304, "bfloat16"),
    "paper fp32": (256, 256, 50304, "float32"),
}


def _mem(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("this backend's compiled executables report no memory_analysis()")
  out = {"temp": m.temp_size_in_bytes, "arg": m.argument_size_in_bytes, "out": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes}
  out["peak"] = out["temp"] + out["arg"] + out["out"]
  return out


def _fmt(b: float) -> str:
  return f"{b / GIB:.2f}G" if b >= GIB / 4 else f"{b / 2**20:.0f}M"


def _abstract(tree, shardings):
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------- LM step

def lm_memory(ctx: int, batch: int, vocab: int, dtype: str, loss_chunk: int) -> dict:
  import jax
  import jax.numpy as jnp
  from monojax import sharding
  from monojax.config import base_config
  from monojax.train import state as state_lib, step as step_lib
  cfg = base_config()
  cfg.data.seq_len, cfg.data.global_batch = ctx, batch
  cfg.model.vocab_size = vocab
  cfg.train.dtype, cfg.train.loss_chunk = dtype, loss_chunk
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  schedule = state_lib.make_schedule(cfg.train)
  tx = state_lib.make_optimizer(cfg.train, schedule)
  graphdef, state, shardings = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)  # a few MB: real is fine
  batch_sh = {"tokens": sharding.batch_sharding(mesh)}
  # ce_kernel "off": the pure-JAX loss, the one TPU/GPU and multi-device meshes run (this table
  # plans their memory); the CPU kernel path holds one chunk of logits too.
  step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, vocab_size=vocab, dtype=dtype, loss_chunk=loss_chunk,
                                          token_bytes=jnp.ones((vocab,), jnp.int32), ce_kernel="off"),
                 in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
  tokens = jax.ShapeDtypeStruct((batch, ctx + 1), jnp.int32, sharding=batch_sh["tokens"])
  return _mem(step.lower(_abstract(state, shardings), {"tokens": tokens}).compile())


# -------------------------------------------------------------------------------------- SAE update

@functools.lru_cache(maxsize=None)
def _probe_state(d_in: int):
  """A real (tiny) 2023 SAE state at _PROBE_WIDTH, as host arrays: its tree structure and dtypes."""
  import jax
  import numpy as np
  from monojax.sae import core
  cfg = _sae_cfg(_PROBE_WIDTH)
  x = np.random.default_rng(0).random((64, d_in), dtype=np.float32)
  return jax.device_get(core.init_state(cfg, d_in, jax.random.key(0), x, TOTAL_SAE_STEPS))


def _sae_cfg(width: int, sparse_update: str | None = None):
  from monojax.sae.config import sae_config
  cfg = sae_config()
  cfg.saes = f"{width}:0.004:2023"
  cfg.batch_size = _BATCH.value
  if sparse_update is not None:
    cfg.sparse_update = sparse_update
  return cfg


def sparse_variants() -> list[str | None]:
  """[None] without a sae.sparse_update option; else its default and "off" (dense), the default first."""
  from monojax.sae.config import sae_config
  cfg = sae_config()
  if "sparse_update" not in cfg:
    return [None]
  return [cfg.sparse_update] + (["off"] if cfg.sparse_update != "off" else [])


def sae_abstract_state(width: int, d_in: int):
  """The state `core.init_state` would make at `width`, as ShapeDtypeStructs (nothing allocated):
  the probe state with every width-sized axis resized and the group key renamed."""
  import jax
  from monojax.sae import core
  probe = _probe_state(d_in)

  def resize(x):
    return jax.ShapeDtypeStruct(tuple(width if s == _PROBE_WIDTH else s for s in x.shape), x.dtype)

  (old_key,) = probe["groups"]
  (group,) = core.groups_from_config(_sae_cfg(width))
  state = dict(probe, groups={group.key(_sae_cfg(width)): probe["groups"][old_key]})
  return jax.tree.map(resize, state)


def sae_memory(width: int, model_axis: int, sparse_update: str | None = None) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ml_collections import config_dict
  from monojax import sharding
  from monojax.sae import core
  d_in, batch = _D_IN.value, _BATCH.value
  mesh_cfg = config_dict.ConfigDict({"shape": (1, model_axis), "axes": ("data", "model")})
  mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:model_axis])
  cfg = _sae_cfg(width, sparse_update)
  groups = core.groups_from_config(cfg)
  abstract = sae_abstract_state(width, d_in)
  state_sh = core.shardings(abstract, mesh)
  x_sh = NamedSharding(mesh, P("data", None))
  fn = jax.jit(functools.partial(core.update, core.frozen(cfg), tuple(groups), TOTAL_SAE_STEPS),
               in_shardings=(state_sh, x_sh, None), out_shardings=(state_sh, None), donate_argnums=0)
  x = jax.ShapeDtypeStruct((batch, d_in), jnp.float32, sharding=x_sh)
  return _mem(fn.lower(_abstract(abstract, state_sh), x, jax.random.key(0)).compile())


def largest_fitting(budget: float, k: int, points: list[tuple[int, float]], log,
                    sparse_update: str | None = None) -> tuple[int, float, int]:
  """(largest width, its peak, compiles used) with peak <= budget at model axis k: linear fit on
  `points` [(width, peak)], rounded down to a multiple of 1,024·k, checked (and stepped down) by
  compiling."""
  (w0, p0), (w1, p1) = points[-2], points[-1]
  slope = (p1 - p0) / (w1 - w0)
  grain_ = 1024 * k
  w = int((budget - (p1 - slope * w1)) / slope) // grain_ * grain_
  compiles = 0
  while w > 0:
    peak = sae_memory(w, k, sparse_update)["peak"]
    compiles += 1
    if peak <= budget:
      return w, peak, compiles
    log(f"    (width {w:,} at model axis {k}, sparse_update {sparse_update}: peak {_fmt(peak)} > {_fmt(budget)}; stepping down)")
    w -= max(grain_, int((peak - budget) / slope) // grain_ * grain_)
  return 0, float("nan"), compiles


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import warnings
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  import jax
  import jaxlib
  t_start = time.perf_counter()
  quick = _QUICK.value
  print(f"machine: {machine.cpu_line()} (compiled for this host; the byte counts do not depend on it)")
  print(f"jax {jax.__version__} / jaxlib {jaxlib.__version__}; {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"(JAX_NUM_CPU_DEVICES={os.environ.get('JAX_NUM_CPU_DEVICES')}); lower + compile only, nothing executed")
  print("bytes per device from compiled.memory_analysis(); peak = temp + argument + output; alias = output bytes "
        "that reuse a donated argument (so the real high-water mark is ~ peak - alias); CPU compiler's buffer "
        "assignment")

  # 1. LM step
  print("\n1. LM step (make_train_step, state donated), d 128, MLP 512, 1 layer, one device")
  head = (f"{'shape':<11} {'ctx':>4} {'batch':>5} {'vocab':>6} {'dtype':>8} {'loss_chunk':>10} | {'temp':>8} {'args':>8} "
          f"{'outputs':>8} {'alias':>8} | {'peak':>8} {'compile s':>9}")
  print(head)
  print("-" * len(head))
  shapes = {"quickstart": LM_SHAPES["quickstart"]} if quick else LM_SHAPES
  for name, (ctx, batch, vocab, dtype) in shapes.items():
    for chunk in (0, 64):
      t0 = time.perf_counter()
      m = lm_memory(ctx, batch, vocab, dtype, chunk)
      print(f"{name:<11} {ctx:>4} {batch:>5} {vocab:>6} {dtype:>8} {chunk:>10} | {_fmt(m['temp']):>8} "
            f"{_fmt(m['arg']):>8} {_fmt(m['out']):>8} {_fmt(m['alias']):>8} | {_fmt(m['peak']):>8} "
            f"{time.perf_counter() - t0:>9.1f}", flush=True)

  # 2. SAE update
  widths = [4096, 16384] if quick else [int(w) for w in _WIDTHS.value]
  model_axes = [1, 2] if quick else [int(k) for k in _MODEL.value]
  if max(model_axes) > jax.device_count():
    raise app.UsageError(f"--model_axis up to {max(model_axes)} needs that many devices; have {jax.device_count()}")
  variants = sparse_variants()
  vname = lambda v: "-" if v is None else v  # noqa: E731
  print(f"\n2. SAE update (core.update, 2023 recipe, state donated), d_in {_D_IN.value}, batch {_BATCH.value:,}; "
        f"feature axis over a model axis of k devices (mesh (1, k)); per-device bytes"
        + ("" if variants == [None] else f"; sae.sparse_update {' and '.join(map(vname, variants))} (default first)"))
  head = (f"{'width':>8} {'k':>2} {'sparse':>6} | {'temp':>8} {'args':>8} {'outputs':>8} {'alias':>8} | {'peak':>8} "
          f"{'peak-alias':>10} {'compile s':>9}")
  print(head)
  print("-" * len(head))
  points: dict[tuple, list] = {(k, v): [] for k in model_axes for v in variants}
  for width in widths:
    for k in model_axes:
      for v in variants:
        t0 = time.perf_counter()
        m = sae_memory(width, k, v)
        points[k, v].append((width, m["peak"]))
        print(f"{width:>8,} {k:>2} {vname(v):>6} | {_fmt(m['temp']):>8} {_fmt(m['arg']):>8} {_fmt(m['out']):>8} "
              f"{_fmt(m['alias']):>8} | {_fmt(m['peak']):>8} {_fmt(m['peak'] - m['alias']):>10} "
              f"{time.perf_counter() - t0:>9.1f}", flush=True)

  # 3. largest width per budget
  budgets = [16.0] if quick else [float(b) for b in _BUDGETS.value]
  print(f"\n3. largest SAE width whose peak (temp + args + outputs, per device) fits the budget; d_in {_D_IN.value}, "
        f"batch {_BATCH.value:,}, 2023 recipe; linear fit on part 2, checked by compiling")
  for (k, v), pts in points.items():
    (w0, p0), (w1, p1) = pts[-2:]
    print(f"  model axis {k}, sparse_update {vname(v)}: peak ~ {_fmt(p1 - (p1 - p0) / (w1 - w0) * w1)} + "
          f"{(p1 - p0) / (w1 - w0) / 1024:.1f} KiB x width")
  head = f"{'model axis':>10} {'sparse':>6} | " + " | ".join(f"{f'{b:g} GiB':>22}" for b in budgets)
  print(head)
  print("-" * len(head))
  msgs = []
  for (k, v), pts in points.items():
    cells = []
    for b in budgets:
      w, peak, _ = largest_fitting(b * GIB, k, pts, msgs.append, v)
      cells.append(f"{w:>11,} ({_fmt(peak):>7})" if w else f"{'none':>22}")
    print(f"{k:>10} {vname(v):>6} | " + " | ".join(f"{c:>22}" for c in cells), flush=True)
  for m in msgs:
    print(m)
  print("(cell: largest width, a multiple of 1,024 x k, and its compiled peak per device; the batch is replicated on "
        "each device, so data parallelism on top divides the [batch, width] activations further)")
  print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
