"""The FeatureInspector and TextInspector of a run: a static site, and a local server with live text.

  python -m monojax.inspect build --workdir=RUN [--out=DIR]
  python -m monojax.inspect serve --workdir=RUN [--port=8000] [--host=127.0.0.1] [--rebuild]

`build` writes RUN/inspector/ from the run's feature database (python -m monojax.analyze) and
prints the page to open: it works from disk (file://), offline, in a browser with default settings.
`serve` serves that site on 127.0.0.1 (building it first if missing) and adds the live endpoints:
the TextInspector runs the run's model and dictionaries on text you type.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from monojax import errors

PROG = "python -m monojax.inspect"


def _port(s: str) -> int:
  try:
    v = int(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {s!r}") from None
  if not 0 <= v <= 65535:
    raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {s!r}")
  return v


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="verb", parser_class=errors.ArgumentParser, metavar="{build,serve}")
  b = sub.add_parser("build", help="write the static site RUN/inspector/")
  b.add_argument("--workdir", required=True, help="the run (a directory written by monojax.main, analysed)")
  b.add_argument("--out", default=None, help="where to write the site (default RUN/inspector)")
  b.add_argument("--no_samples", action="store_true", help="skip the TextInspector's sample documents")
  s = sub.add_parser("serve", help="serve the site on this machine, with live text")
  s.add_argument("--workdir", required=True, help="the run (a directory written by monojax.main, analysed)")
  s.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
  s.add_argument("--host", default="127.0.0.1",
                 help="address to bind (default 127.0.0.1, this machine only; another address exposes the run)")
  s.add_argument("--rebuild", action="store_true", help="rebuild the site before serving")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if not args.verb:
    _parser().error("give a verb: build or serve")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for name in ("absl", "jax", "orbax", "etils", "grain"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from monojax import run as run_lib
  from monojax.inspector import site
  try:
    workdir = run_lib.check_workdir(args.workdir)
    if args.verb == "build":
      site.build(workdir, out=args.out, samples=not args.no_samples, log=logging.info)
      return 0
    from monojax.analysis import database
    database.open_database(workdir)   # the one-line error for a run never analysed, before anything else
    site_path = site.site_dir(workdir)
    if args.rebuild or not os.path.exists(os.path.join(site_path, "index.html")):
      site.build(workdir, log=logging.info)
    from monojax.inspector import server
    from monojax.run import Run
    server.serve(site_path, lambda: Run.open(workdir, log=logging.info), host=args.host, port=args.port,
                 log=logging.info)
    return 0
  except errors.UserInputError as e:
    print(f"monojax.inspect: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.exit(main())
