"""Export a run's SAEs to SAELens or its LM to TransformerLens.

  python -m monojax.export --workdir=RUN --to=saelens --out=DIR [--sae=sae0,sae1] [--step=N]
  python -m monojax.export --workdir=RUN --to=transformerlens --out=DIR [--step=N]

saelens: DIR/<sae name>/{cfg.json, sae_weights.safetensors}, for `sae_lens.SAE.load_from_disk`.
transformerlens: DIR/{config.json, model.safetensors, tokenizer.json}, for
`monojax.export.transformerlens.load_hooked_transformer(DIR)`. DIR is written whole (a temporary
folder renamed into place); an existing DIR must be empty or an earlier export.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from monojax import errors

PROG = "python -m monojax.export"


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="the run (a directory written by monojax.main)")
  p.add_argument("--to", required=True, choices=("saelens", "transformerlens"), help="the format")
  p.add_argument("--out", required=True, help="the folder to write (new, empty, or an earlier export)")
  p.add_argument("--sae", default=None, help="saelens: comma-separated SAE names (default: every SAE of the run)")
  p.add_argument("--step", type=int, default=None, help="the checkpoint to export (default: the newest)")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  saes = [s.strip() for s in args.sae.split(",") if s.strip()] if args.sae is not None else None
  if args.sae is not None and args.to != "saelens":
    _parser().error("--sae applies to --to=saelens only")
  if saes == []:
    _parser().error("--sae: give SAE names, e.g. --sae=sae0,sae1")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for name in ("absl", "jax", "orbax", "etils", "grain"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from monojax import export, run as run_lib
  try:
    out = export.check_out(args.out)  # before the (slow) open: nothing is read or written for a refused --out
    workdir = run_lib.check_workdir(args.workdir)
    from monojax.run import Run
    run = Run.open(workdir, step=args.step, log=logging.info)
    out = export.export_run(run, args.to, out, saes)
  except errors.UserInputError as e:
    print(f"monojax.export: {e}", file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.exit(main())
