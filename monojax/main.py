"""monojax entry point: `python -m monojax.main --config=configs/<name>.py [--config.a.b=v] [--workdir=DIR]`.

Parses the config, prepares the workdir and the data, and runs the job. The job trains the language
model (resuming from the workdir's newest checkpoint if there is one).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config.name>).")
_MALLOC = flags.DEFINE_bool("cpu_malloc_tunables", True, "On CPU, re-execute once with glibc malloc tunables that "
                            "keep XLA's large buffers mapped (1.2-2x faster steps; see BUILD_NOTES.md).")

# glibc keeps freed memory instead of returning it to the OS, so XLA's large output buffers are not
# page-faulted in again on every step (measured in ../shared/docs/cpu-performance.md §1).
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
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
  from monojax import distributed
  from monojax.train import loop

  cfg = _CONFIG.value
  distributed.maybe_initialize(cfg.distributed)
  import jax
  workdir = os.path.abspath(_WORKDIR.value or os.path.join("runs", cfg.name))
  if jax.process_index() == 0:
    log_path = write_config(cfg, workdir)
  else:
    log_path = "(process 0 writes it)"
  logging.info(f"monojax: config {cfg.name}, workdir {workdir}, config written to {log_path}; "
               f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s)")
  if cfg.mode == "toy":
    from monojax.sae import toy
    toy.run_toy(cfg, workdir, log=logging.info)
    return
  try:
    last = loop.run(cfg, workdir)
  except loop.TrainingDiverged as e:
    print(f"monojax: {e}", file=sys.stderr)
    sys.exit(3)
  if last:
    keys = ["loss", "eval/loss", "eval/unigram_entropy", "eval/bits_per_byte"]
    keys += sorted(k for k in last if k.endswith("_eval/loss_recovered") or k.endswith("_eval/l0"))
    logging.info(f"monojax: done in {workdir}. " + ", ".join(f"{k} {last[k]:.4g}" for k in keys if k in last))


def _setup_logging(argv):
  # Plain "HH:MM:SS message" lines: the console is read by people, not parsed.
  absl_logging.set_verbosity(absl_logging.INFO)
  handler = absl_logging.get_absl_handler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  handler.addFilter(_OwnInfoFilter())
  return argv


class _OwnInfoFilter(logging.Filter):
  """INFO lines from monojax only; libraries (orbax logs every file it renames) only WARNING+."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or f"{os.sep}monojax{os.sep}" in record.pathname


def _on_accelerator_host() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return "cpu" not in platforms.split(",")[0]
  return (os.path.exists("/dev/nvidia0") or any(os.path.exists(f"/dev/accel{i}") for i in range(4))
          or bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_NAME")))


def _maybe_reexec_with_malloc_tunables() -> None:
  """Must run before the process allocates much: glibc reads GLIBC_TUNABLES only at start-up."""
  if "--nocpu_malloc_tunables" in sys.argv or "--cpu_malloc_tunables=false" in sys.argv:
    return
  if os.environ.get("GLIBC_TUNABLES") or os.environ.get("MONOJAX_REEXEC") or _on_accelerator_host():
    return
  if sys.platform != "linux":
    return
  env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, MONOJAX_REEXEC="1")
  sys.stderr.write("monojax: CPU run: re-executing once with GLIBC_TUNABLES set for XLA's allocator "
                   "(--nocpu_malloc_tunables turns this off)\n")
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", "monojax.main", *sys.argv[1:]], env)


def run():
  _maybe_reexec_with_malloc_tunables()
  jax_config_with_absl()
  app.run(main, flags_parser=lambda argv: _setup_logging(flags.FLAGS(argv)))


def jax_config_with_absl():
  import jax
  jax.config.config_with_absl()


if __name__ == "__main__":
  run()
