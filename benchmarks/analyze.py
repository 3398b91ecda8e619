"""The feature-analysis pass (python -m monojax.analyze), a benchmark, not a test.

  python benchmarks/analyze.py --workdir=runs/quickstart                    # 262k and 1M tokens
  python benchmarks/analyze.py --workdir=runs/quickstart --sizes=1048576,10485760 --split=train

For a finished run (default: its first SAE): tokens/s of the plain LM + SAE forward on the same
batches (the anchor, measured in this run), tokens/s of the whole pass (statistics, proxies,
examples, logit effects, database writing) for each N in --sizes, the ratio pass ÷ forward, peak
host memory (ru_maxrss of a fresh process per N: it must stay flat as N grows), and the database's
size on disk. Targets (issue 15): 1M tokens in ≤ 10 minutes on a 2-core CPU, pass ≤ 3× the
forward, memory flat from 1M to 10M tokens. No ratio is printed for a degenerate case (an SAE
that never fires on the measured tokens, or no tokens).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from monojax import cpu_env  # noqa: E402 (imports nothing heavy)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402 (benchmarks/machine.py)

if __name__ == "__main__" and "--child" not in sys.argv:  # the allocator setting before jax starts
  cpu_env.reexec_with_malloc_tunables(sys.argv)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags, logging as absl_logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished run with at least one SAE")
_SIZES = flags.DEFINE_list("sizes", ["262144", "1048576"], "token counts N of the pass")
_SPLIT = flags.DEFINE_enum("split", "analysis", ["analysis", "val", "train"], "where the tokens come from")
_SAE = flags.DEFINE_string("sae", "sae0", "the SAE analysed (the pass and the anchor)")
_BATCH = flags.DEFINE_integer("batch_size", 64, "sequences per batch")
_ANCHOR_BATCHES = flags.DEFINE_integer("anchor_batches", 16, "batches timed for the forward anchor")
_CHILD = flags.DEFINE_bool("child", False, "internal: run one pass and print its JSON line")
_OUT = flags.DEFINE_string("out", None, "internal: the child's database folder")
_TOKENS = flags.DEFINE_integer("tokens", 0, "internal: the child's N")


def _cpu() -> str:
  return machine.cpu_line()


def _child() -> None:
  """One pass in this fresh process: prints {"seconds", "maxrss_mb", "fired", "n_tokens"}."""
  import resource
  import numpy as np
  from monojax.analysis import database, scan
  from monojax.run import Run
  run = Run.open(_WORKDIR.value, log=lambda *_: None)
  t0 = time.perf_counter()
  scan.run_pass(run, scan.Options(tokens=_TOKENS.value, batch_size=_BATCH.value, split=_SPLIT.value,
                                  saes=(_SAE.value,), out=_OUT.value, save_every_s=1e9), log=lambda *_: None)
  secs = time.perf_counter() - t0
  db = database.open_database(_OUT.value)
  fired = int(np.asarray(db.unit(_SAE.value).array("fired")).sum())
  print(json.dumps({"seconds": secs, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "fired": fired, "n_tokens": db.n_tokens}))


def _anchor() -> tuple[float, int]:
  """Tokens/s of the jitted LM (to the MLP) + SAE encoder alone on the same kind of batches."""
  import jax
  from monojax.corpus import build_corpus
  from monojax.data import pipeline
  from monojax.run import Run
  run = Run.open(_WORKDIR.value, log=lambda *_: None)
  root = build_corpus.ensure_data_root(run.cfg.data, log=lambda *_: None)
  batches = [b["tokens"][:, :-1] for b in pipeline.analysis_batches(
      run.cfg, run.tokenizer, root, run.mesh, split=_SPLIT.value, batch_size=_BATCH.value,
      n_batches=_ANCHOR_BATCHES.value, log=lambda *_: None)]
  sae = run.sae(_SAE.value)
  fired = 0
  for t in batches[:2]:  # compile + warm-up
    fired += int(jax.block_until_ready((run.features(t, sae) > 0).sum()))
  t0 = time.perf_counter()
  for t in batches:
    out = run.features(t, sae)
  jax.block_until_ready(out)
  secs = time.perf_counter() - t0
  return sum(t.size for t in batches) / secs, fired


def main(argv) -> None:
  absl_logging.set_verbosity(absl_logging.WARNING)
  if _CHILD.value:
    return _child()
  if not _WORKDIR.value:
    raise app.UsageError("--workdir: a finished run is required")
  print(f"CPU: {_cpu()}")
  print(f"run: {_WORKDIR.value}, SAE {_SAE.value}, split {_SPLIT.value}, batch {_BATCH.value} sequences")
  rate, fired = _anchor()
  print(f"anchor: LM + SAE forward {rate:,.0f} tokens/s ({_ANCHOR_BATCHES.value} batches; the SAE fired {fired:,} "
        "times on the 2 warm-up batches)")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in (int(s) for s in _SIZES.value):
      out = os.path.join(tmp, f"db{n}")
      cmd = [sys.executable, __file__, "--child", f"--workdir={_WORKDIR.value}", f"--tokens={n}", f"--out={out}",
             f"--split={_SPLIT.value}", f"--sae={_SAE.value}", f"--batch_size={_BATCH.value}"]
      res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
      if res.returncode:
        print(f"N={n:,}: the pass failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
        continue
      r = json.loads(res.stdout.strip().splitlines()[-1])
      size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
      r.update(n=n, size_mb=size / 2**20)
      rows.append(r)
      line = (f"N={r['n_tokens']:>10,}: pass {r['seconds']:7.1f} s = {r['n_tokens'] / r['seconds']:8,.0f} tokens/s; "
              f"peak RSS {r['maxrss_mb']:7.0f} MB; database {r['size_mb']:6.1f} MB")
      if r["fired"] == 0 or r["n_tokens"] == 0 or fired == 0:
        line += "; no ratio: the SAE never fired (a dead SAE measures nothing)"
      else:
        forward = r["n_tokens"] / rate
        line += (f"; ratio pass / forward {r['seconds'] / forward:.2f}x (target <= 3x; the pass includes compiling "
                 "and writing the database)")
      print(line, flush=True)
  for a, b in zip(rows, rows[1:]):  # the fixed costs (compiling, logit effects, writing) cancel
    if a["fired"] and fired and b["n_tokens"] > a["n_tokens"]:
      marginal = (b["seconds"] - a["seconds"]) / (b["n_tokens"] - a["n_tokens"])
      print(f"marginal, {a['n_tokens']:,} -> {b['n_tokens']:,} tokens: {1 / marginal:,.0f} tokens/s; ratio pass / "
            f"forward {marginal * rate:.2f}x (target <= 3x)")
  if len(rows) > 1:
    a, b = rows[0], rows[-1]
    print(f"memory: {a['maxrss_mb']:.0f} MB at {a['n_tokens']:,} tokens -> {b['maxrss_mb']:.0f} MB at "
          f"{b['n_tokens']:,} ({b['maxrss_mb'] / a['maxrss_mb']:.2f}x for {b['n_tokens'] / a['n_tokens']:.1f}x the tokens)")


if __name__ == "__main__":
  app.run(main)
