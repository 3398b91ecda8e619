"""monojax entry point: `python -m monojax.main --config=configs/<name>.py [--config.a.b=v] [--workdir=DIR]`.

Parses the config and hands it to the job: training (monojax/train: LM, LM + SAEs, or SAEs on a
frozen LM, resuming from the workdir's newest checkpoint) or the toy SAE run (monojax/sae/toy.py).
"""
from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config.name>).")
_MALLOC = flags.DEFINE_bool("cpu_malloc_tunables", True, "On CPU, re-execute once with glibc malloc tunables that "
                            "keep XLA's large buffers mapped (faster steps; BUILD_NOTES.md, \"Allocator tunables\").")


def _fail(message: str) -> None:
  """Bad input is the user's to fix: one clear line, no traceback, exit 2; nothing written is touched."""
  print(f"monojax: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  from monojax import errors
  try:
    _main(argv)
  except errors.UserInputError as e:
    _fail(str(e))


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from monojax import distributed

  from monojax import config_rules
  cfg = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", cfg.name)
  workdir = workdir if "://" in workdir else os.path.abspath(workdir)  # a URL is refused by validate
  config_rules.validate(cfg, workdir)  # every rule of the config, before anything is read or written
  distributed.maybe_initialize(cfg.distributed)
  import jax
  logging.info(f"monojax: config {cfg.name}, workdir {workdir}; {jax.process_count()} process(es), "
               f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  if cfg.mode == "toy":
    from monojax import config as config_lib
    from monojax.sae import toy
    config_lib.write_resolved(cfg, workdir)
    toy.run_toy(cfg, workdir, log=logging.info)
    return
  from monojax.train import loop
  try:
    last = loop.run(cfg, workdir)
  except loop.TrainingDiverged as e:
    print(f"monojax: {e}", file=sys.stderr)
    sys.exit(3)
  if last:
    keys = ["loss", "eval/loss", "eval/unigram_entropy", "eval/bits_per_byte"]
    keys += sorted(k for k in last if k.endswith("_eval/loss_recovered") or k.endswith("_eval/l0"))
    logging.info(f"monojax: done in {workdir}. " + ", ".join(f"{k} {last[k]:.4g}" for k in keys if k in last))


def _parse_flags(argv):
  """absl's parse plus loading the config file; any failure is one line (exit 2), not a traceback."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is None:
      raise flags.Error("--config: a configs/*.py file is required (e.g. --config=configs/quickstart.py)")
    _CONFIG.value.get("name")  # a config file that failed to load raises on first use: here, not later
  except Exception as e:  # noqa: BLE001 — absl and ml_collections raise many kinds for one bad flag
    _fail(_flag_error(e, argv))
  return _setup_logging(rest)


def _flag_error(e: Exception, argv) -> str:
  """One line naming the flag and what was wrong, from absl's / ml_collections' exception."""
  text = str(e).strip()
  suggestion = re.search(r"'(\w+)\\*'.*Did you mean \"(\w+)\"", text, re.S)
  if suggestion:
    bad, good = suggestion.groups()
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and f".{bad}" in a.split("=")[0]),
                f"--config...{bad}")
    return f"{flag}: unknown field (did you mean {good!r}?)"
  value = re.match(r"flag (--[^=]+)=(.*?): (.*)", text, re.S)
  if value:
    flag, got, why = value.groups()
    return f"{flag}: cannot use {got!r}: {why.splitlines()[0].split('. ')[0]}"
  unknown = re.match(r"Unknown command line flag '([^']+)'", text)
  if unknown:
    return f"--{unknown.group(1)}: unknown flag"
  if "Failed loading config file" in text or "earlier failure to load" in text:
    reason = next((line.strip() for line in reversed(text.splitlines()) if "Errno" in line or "Error" in line),
                  text.splitlines()[-1])
    return f"--config: cannot load the config file ({reason})"
  if isinstance(e, flags.Error):
    return text.splitlines()[0]
  return f"--config: the config file failed: {type(e).__name__}: {text.splitlines()[0] if text else ''}"


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


def run():
  if not ("--nocpu_malloc_tunables" in sys.argv or "--cpu_malloc_tunables=false" in sys.argv):
    from monojax import cpu_env  # before jax starts: glibc reads the tunables only at start-up
    cpu_env.reexec_with_malloc_tunables(
        ["-m", "monojax.main", *sys.argv[1:]],
        "monojax: CPU run: re-executing once with GLIBC_TUNABLES set for XLA's allocator (--nocpu_malloc_tunables "
        "turns this off)")
  jax_config_with_absl()
  app.run(main, flags_parser=_parse_flags)


def jax_config_with_absl():
  import jax
  jax.config.config_with_absl()


if __name__ == "__main__":
  run()
