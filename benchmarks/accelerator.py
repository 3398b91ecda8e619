"""The paper-scale step on an accelerator (GPU/TPU): one short run (a benchmark, not a test).

  bash benchmarks/accelerator.sh            # on the accelerator machine: the paper shapes, ~3-5 min
  python benchmarks/accelerator.py --smoke  # anywhere (CPU too): tiny shapes, checks the script runs

Measures, on the first device, with the job's own step functions (train/step.py, sae/core.py,
train/cotrain.py), each the median of --steps timed calls after the compile and 2 warm-ups:
  1. the LM training step at the paper shapes (configs/transformer.py: d 128, MLP 512, 1 layer,
     ctx 256, batch 256, vocab 50,304, bf16 compute with fp32 master weights, loss chunked by 64):
     tokens/s and MFU (6N + attention FLOPs per token, train/metrics.py; peak from its device table);
  2. the dense SAE update (2023 recipe, f32, sae.sparse_update="off": the kernels are CPU-only) at
     width 131,072 on batch 8,192 (the paper's largest run), in updates/s and FLOP/s (10·B·d·m);
  3. the co-trained step (configs/transformer.py's SAE: width 4,096, batch 8,192, 128 positions of
     each context) ÷ the LM step alone (the "lm" phase of the same make_step).
The device name, jax version and every figure are printed as one block to paste into BUILD_NOTES.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                     # machine.py
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's monojax

PAPER = dict(d=128, mlp=512, heads=4, d_head=32, seq=256, batch=256, vocab=50_304, loss_chunk=64,
             sae_width=131_072, sae_batch=8192, job_width=4096, positions=128)
SMOKE = dict(d=32, mlp=64, heads=2, d_head=16, seq=16, batch=8, vocab=256, loss_chunk=8,
             sae_width=512, sae_batch=128, job_width=128, positions=4)


def _time(fn, state, batch, steps: int):
  """(median seconds per call, state): fn(state, batch) -> (state, metrics), state donated."""
  import jax
  import numpy as np
  state, m = fn(state, batch)  # compile
  for _ in range(2):
    state, m = fn(state, batch)
  jax.block_until_ready((state, m))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = fn(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), state


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (any backend): checks the script runs")
  ap.add_argument("--steps", type=int, default=10, help="timed calls per measurement (median reported)")
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from machine import cpu_line
  from monojax import sharding
  from monojax.config import base_config
  from monojax.sae import core
  from monojax.train import cotrain, metrics as metrics_lib, state as state_lib, step as step_lib
  sh = SMOKE if args.smoke else PAPER
  dev = jax.devices()[0]
  if dev.platform == "cpu" and not args.smoke:
    print("benchmarks/accelerator.py: no accelerator (jax sees only the CPU); run it on a GPU/TPU machine, "
          "or with --smoke to check the script", file=sys.stderr)
    return 2
  print(f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} device(s), timing device 0); jax "
        f"{jax.__version__}; host {cpu_line()}")

  cfg = base_config()
  m = cfg.model
  m.d_model, m.d_mlp, m.n_heads, m.d_head, m.n_layers = sh["d"], sh["mlp"], sh["heads"], sh["d_head"], 1
  m.vocab_size = sh["vocab"]
  cfg.data.seq_len, cfg.data.global_batch = sh["seq"], sh["batch"]
  cfg.train.dtype, cfg.train.loss_chunk = "bfloat16", sh["loss_chunk"]
  cfg.mesh.shape = (1, 1)  # one device: the per-chip figure
  cfg.sae.sparse_update = "off"
  mesh = sharding.make_mesh(cfg.mesh, devices=[dev])
  schedule = state_lib.make_schedule(cfg.train)
  tx = state_lib.make_optimizer(cfg.train, schedule)
  graphdef, lm_state, lm_sh = state_lib.init_state(cfg.model, tx, cfg.seed, mesh)
  flops_tok = metrics_lib.lm_flops_per_token(cfg.model, sh["seq"], state_lib.count_params(lm_state["params"]))
  peak, peak_src = metrics_lib.peak_flops(cfg.train.peak_flops)
  peak /= jax.device_count()
  batch_sh = {"tokens": sharding.batch_sharding(mesh)}
  rng = np.random.default_rng(0)
  ranks = rng.zipf(1.2, size=(sh["batch"], sh["seq"] + 1)) % sh["vocab"]  # Zipf-like tokens, as real text
  batch = {"tokens": jax.device_put(ranks.astype(np.int32), batch_sh["tokens"])}
  kw = dict(vocab_size=sh["vocab"], dtype="bfloat16", loss_chunk=sh["loss_chunk"],
            token_bytes=jnp.ones((sh["vocab"],), jnp.int32))
  lm_step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, **kw), in_shardings=(lm_sh, batch_sh),
                    out_shardings=(lm_sh, None), donate_argnums=0)
  t_lm, lm_state = _time(lm_step, lm_state, batch, args.steps)
  tokens = sh["batch"] * sh["seq"]
  rows = [("LM step (bf16, chunked loss)", f"{t_lm * 1e3:.2f} ms", f"{tokens / t_lm / 1e6:.3f} M tok/s",
           f"MFU {flops_tok * tokens / t_lm / peak:.1%} of {peak / 1e12:.0f} TFLOP/s ({peak_src})")]

  # 2. The dense SAE update at the paper's largest width.
  s = cfg.sae
  s.saes = f"{sh['sae_width']}:0.004:2023"
  s.batch_size = sh["sae_batch"]
  groups = core.groups_from_config(s)
  x = jnp.asarray(np.maximum(rng.standard_normal((sh["sae_batch"], sh["mlp"])), 0).astype(np.float32))
  sae_state = core.init_state(s, sh["mlp"], jax.random.key(0), x, 10**6)
  update = core.make_update_fn(s, groups, 10**6)
  key = jax.random.key(1)
  t_sae, sae_state = _time(lambda st, xb: update(st, xb, key), sae_state, x, args.steps)
  sae_fl = 10.0 * sh["sae_batch"] * sh["mlp"] * sh["sae_width"]
  rows.append((f"dense SAE update, width {sh['sae_width']:,}", f"{t_sae * 1e3:.2f} ms",
               f"{sh['sae_batch'] / t_sae / 1e6:.3f} M act/s", f"{sae_fl / t_sae / 1e12:.1f} TFLOP/s (f32 GEMMs, 10·B·d·m)"))
  del sae_state

  # 3. Co-trained ÷ LM alone, both phases of the job's make_step.
  s.saes = f"{sh['job_width']}:0.004:2023"
  s.positions_per_context, s.start_step, s.buffer_steps = sh["positions"], 0, 4
  s.batch_size = sh["batch"] * sh["positions"] // 4
  plan = cotrain.make_plan(cfg, cfg.train.steps)
  groups = core.groups_from_config(s)
  state, full_sh = cotrain.with_sae_and_buffer(cfg, *state_lib.init_state(cfg.model, tx, cfg.seed, mesh)[1:],
                                               sh["mlp"], plan, mesh)
  lm_update = step_lib.make_lm_update(graphdef, tx, schedule, **kw)

  def jit_step(phase):
    return jax.jit(cotrain.make_step(cfg, phase, plan, lm_update, groups, mesh, s.layer),
                   in_shardings=(full_sh, batch_sh), out_shardings=(full_sh, None), donate_argnums=0)

  fill = jit_step("fill")
  for _ in range(plan.init_step):
    state, _ = fill(state, batch)
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 10**9 + plan.init_step)
  state["sae"] = cotrain.make_init_from_buffer(cfg, sh["mlp"], plan, full_sh["sae"])(state["buffer"]["acts"], key)
  t_co, state = _time(jit_step("train"), state, batch, args.steps)
  t_alone, state = _time(jit_step("lm"), state, batch, args.steps)
  rows.append((f"co-trained step (SAE {sh['job_width']:,}, {plan.per_step:,} acts/step)", f"{t_co * 1e3:.2f} ms",
               f"{tokens / t_co / 1e6:.3f} M tok/s", f"÷ LM alone ({t_alone * 1e3:.2f} ms): {t_co / t_alone:.3f}"))

  print(f"\n{'measurement':<52} {'time':>10} {'throughput':>16}  notes")
  for name, t, r, note in rows:
    print(f"{name:<52} {t:>10} {r:>16}  {note}")
  if args.smoke:
    print("(--smoke: tiny shapes; these figures say nothing about speed)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
