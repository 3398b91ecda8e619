"""monojax entry point: `python -m monojax.main --config=configs/<name>.py [--config.a.b=v] [--workdir=DIR]`.

Parses the config, prepares the workdir and the data, and runs the job. (The LM and SAE training
loop arrives with the transformer issue; until then the job builds the data and reports exactly
what it would feed the model.)
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config.name>).")
flags.mark_flags_as_required(["config"])


def write_config(cfg, workdir: str) -> str:
  """Writes the resolved config as JSON (atomically) and returns its path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)
  return path


def main(argv):
  from monojax import errors
  try:
    _main(argv)
  except errors.UserInputError as e:
    # Bad input is the user's to fix: one clear line, no traceback; nothing written is touched.
    print(f"monojax: error: {e}", file=sys.stderr)
    sys.exit(2)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  import numpy as np
  from monojax import sharding
  from monojax.data import pipeline, summary

  cfg = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value or os.path.join("runs", cfg.name))
  log = logging.info
  log(f"monojax: config {cfg.name}, workdir {workdir}, config written to {write_config(cfg, workdir)}")
  mesh = sharding.make_mesh(cfg.mesh)
  log(f"monojax: {jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
      f"mesh {dict(mesh.shape)}")

  root = pipeline.corpus_root(cfg.data, log=log)
  tokenizer = pipeline.get_tokenizer(cfg.data, root, log=log)
  counts = summary.summarize(cfg, root, tokenizer, log=log)
  host_batch = pipeline.host_batch_size(cfg.data.global_batch, jax.process_count())
  ds = pipeline.host_batches(cfg.data, "train", tokenizer=tokenizer, root=root, host_batch=host_batch,
                             seed=cfg.data.seed, process_index=jax.process_index(),
                             process_count=jax.process_count(), log=log)
  ds = pipeline.to_global(ds, mesh, prefetch=cfg.data.device_prefetch)
  m = summary.measure_pipeline(ds, cfg.preview_batches, log=log)
  b = m["batch"]["tokens"]
  sample = tokenizer.decode(np.asarray(jax.device_get(b))[0, :48].tolist())
  log(f"data: pipeline ({cfg.data.format}) first batch after {m['first_batch_s']:.1f}s, then "
      f"{m['tokens_per_s'] / 1e6:.2f} M tokens/s on this host")
  log(f"data: the model would be fed tokens {b.dtype}{list(b.shape)} per step "
      f"({cfg.data.global_batch} x {cfg.data.seq_len} = {cfg.data.global_batch * cfg.data.seq_len:,} "
      f"predicted tokens), sharded {b.sharding.spec} over mesh {dict(mesh.shape)}")
  log(f"data: first window begins {sample!r}")
  if counts:
    log(f"data: train split holds {counts['train']['total']['tokens']:,} tokens "
        f"= {counts['train']['total']['tokens'] / (cfg.data.global_batch * cfg.data.seq_len):,.0f} steps per epoch")


def _setup_logging(argv):
  # Plain "HH:MM:SS message" lines: the console is read by people, not parsed.
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  return argv


def run():
  jax_config_with_absl()
  app.run(main, flags_parser=lambda argv: _setup_logging(flags.FLAGS(argv)))


def jax_config_with_absl():
  import jax
  jax.config.config_with_absl()


if __name__ == "__main__":
  run()
