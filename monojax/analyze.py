"""Feature analysis of a finished run: the feature database, the run report, universality.

  python -m monojax.analyze --workdir=RUN [--tokens=1000000] [--saes=sae0,sae1] [--split=analysis]
  python -m monojax.analyze --compare RUN_A RUN_B [--tokens=N]

The first form runs the run's LM and SAEs over held-out tokens never used for training (the
corpus's analysis split), writes RUN/analysis/ (analysis/database.py) and RUN/report.md with its
plots; an interrupted pass resumes when the same command is run again. The second analyses two
runs (seeds A and B) on the same tokens and writes how well each A feature (and neuron) is matched
by one of B (RUN_A/universality/ and a section of RUN_A's report).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from monojax import errors


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(prog="python -m monojax.analyze", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", help="the run to analyse (a directory written by monojax.main)")
  p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="universality: two runs on the same tokens")
  p.add_argument("--tokens", type=_positive_int, default=1_000_000, help="tokens to analyse (default 1,000,000)")
  p.add_argument("--saes", default="", help="comma-separated SAE names or indices (default: all of the run's)")
  p.add_argument("--split", default="analysis", choices=("analysis", "val", "train"),
                 help="where the tokens come from (default: the corpus's analysis split, never trained on)")
  p.add_argument("--out", default=None, help="where to write the feature database (default RUN/analysis; "
                 "report.md is written only for the default)")
  p.add_argument("--batch_size", type=_positive_int, default=64, help="sequences per batch (default 64)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step to open (default: the newest)")
  p.add_argument("--no_proxies", action="store_true", help="skip the text proxies (specificity/sensitivity)")
  p.add_argument("--no_report", action="store_true", help="write the database only, not report.md")
  p.add_argument("--save_every_s", type=float, default=120.0, help="seconds between resumable saves")
  return p


def _positive_int(s: str) -> int:
  try:
    v = int(float(s)) if "e" in s.lower() else int(s.replace("_", "").replace(",", ""))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
  if v <= 0:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
  return v


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if bool(args.workdir) == bool(args.compare):
    _parser().error("give either --workdir=RUN or --compare RUN_A RUN_B")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for name in ("absl", "jax", "orbax", "etils", "grain"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from monojax import run as run_lib
  from monojax.analysis import scan
  saes = tuple(s.strip() for s in args.saes.split(",") if s.strip()) or None
  opts = scan.Options(tokens=args.tokens, batch_size=args.batch_size, split=args.split,
                      save_every_s=args.save_every_s, proxies=not args.no_proxies, out=args.out,
                      saes=tuple(int(s) if s.isdigit() else s for s in saes) if saes else None)
  try:
    if args.compare:
      from monojax.analysis import universality
      a, b = (run_lib.Run.open(w, args.step) for w in args.compare)
      path = universality.run_compare(a, b, opts, log=logging.info)
      if not args.no_report:
        from monojax.analysis import report
        report.write_report(a.workdir, log=logging.info)
      logging.info(f"analyze: universality written to {path}")
      return 0
    run = run_lib.Run.open(args.workdir, args.step)
    if not run.saes and saes:
      raise errors.UserInputError(f"--saes: {run.workdir} has no SAEs")
    if opts.batch_size % run.mesh.devices.size:
      raise errors.UserInputError(f"--batch_size={opts.batch_size}: must be divisible by the {run.mesh.devices.size} "
                                  "devices of the data-parallel mesh")
    path = scan.run_pass(run, opts, log=logging.info)
    if not args.no_report and not args.out:
      from monojax.analysis import report
      report.write_report(run.workdir, log=logging.info)
    logging.info(f"analyze: done; database {path}")
    return 0
  except errors.UserInputError as e:
    print(f"monojax.analyze: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    print(f"monojax.analyze: interrupted ({e or 'Ctrl-C'}); run the same command again to resume", file=sys.stderr)
    return 130


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.exit(main())
