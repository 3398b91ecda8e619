"""Automated interpretability of a run's features (and MLP neurons): explain each from its examples,
then score the explanation by simulation (the paper's score), detection, fuzzing and logit prediction.

  python -m monojax.autointerp --workdir=RUN [--backend=offline|anthropic|openai] [--model=NAME]
      [--base_url=URL] [--features=live|all|0:200|1,5,9] [--units=sae0,...] [--neurons]
      [--scorers=simulation,detection,fuzzing,logits] [--max-cost=USD]

--backend=offline (the default) is a baseline that needs no model: explanations from the examples'
token statistics. anthropic reads ANTHROPIC_API_KEY; openai reads OPENAI_API_KEY and works with any
OpenAI-compatible server (--base_url=http://127.0.0.1:8000/v1 for vLLM, llama.cpp or Ollama; no key
needed on this machine). Replies are cached in RUN/autointerp/cache.sqlite: a re-run is free and an
interrupted run goes on where it stopped. Results: RUN/autointerp/<label>/<unit>.json, then the
report (RUN/report.md) and the inspector (RUN/inspector) are rebuilt to show them.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys

from monojax import errors, text

PROG = "python -m monojax.autointerp"


def _positive(kind):
  def parse(s: str):
    try:
      v = kind(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
      raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v
  return parse


def _price(s: str) -> float:
  try:
    v = float(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected USD per million tokens (≥ 0), got {s!r}") from None
  if not (v >= 0 and math.isfinite(v)):
    raise argparse.ArgumentTypeError(f"expected USD per million tokens (≥ 0), got {s!r}")
  return v


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the run (written by monojax.main and analysed)")
  p.add_argument("--backend", choices=("offline", "anthropic", "openai"), default="offline",
                 help="offline (a baseline, no model), anthropic, or openai (any OpenAI-compatible endpoint)")
  p.add_argument("--model", default=None, help="the model's name (needed for anthropic and openai)")
  p.add_argument("--base_url", "--base-url", default=None, help="the API's address (default: the vendor's)")
  p.add_argument("--features", default="live", help="live (default), all, a range A:B, or indices 1,5,9")
  p.add_argument("--units", default=None, help="the SAEs to explain, e.g. sae0,sae1 (default: every SAE)")
  p.add_argument("--neurons", action="store_true", help="explain the MLP neurons too (the paper's comparison)")
  p.add_argument("--scorers", default="simulation,detection,fuzzing,logits",
                 help="comma list of simulation, detection, fuzzing, logits")
  p.add_argument("--max_cost", "--max-cost", type=_positive(float), default=None,
                 help="stop before spending more than this many USD (default for a priced model: 10)")
  p.add_argument("--price_in", "--price-in", type=_price, default=None, help="USD per million input tokens")
  p.add_argument("--price_out", "--price-out", type=_price, default=None, help="USD per million output tokens")
  p.add_argument("--concurrency", type=_positive(int), default=8, help="requests in flight (default 8)")
  p.add_argument("--max_retries", "--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts")
  p.add_argument("--timeout", type=_positive(float), default=120.0, help="seconds per request (default 120)")
  p.add_argument("--seed", type=int, default=0, help="which examples are drawn (default 0)")
  p.add_argument("--no_site", "--no-site", action="store_true", help="do not rebuild RUN/inspector")
  p.add_argument("--no_report", "--no-report", action="store_true", help="do not rewrite RUN/report.md")
  p.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bar")
  return p


DEFAULT_MAX_COST = 10.0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for name in ("absl", "jax", "orbax", "etils", "grain", "httpx", "httpx2", "anthropic", "openai"):
    logging.getLogger(name).setLevel(logging.WARNING)
  log = logging.info
  if args.max_retries < 0:
    _parser().error(f"argument --max_retries: expected ≥ 0, got {args.max_retries}")
  scorers = tuple(s.strip() for s in args.scorers.split(",") if s.strip())
  try:
    from monojax import run as run_lib
    workdir = run_lib.check_workdir(args.workdir)
    max_cost = args.max_cost
    if args.backend != "offline" and max_cost is None:
      from monojax.autointerp import llm
      table = (0.0, 0.0) if llm.is_local_url(args.base_url) else (llm.price_for(args.model or "") or (None, None))
      p_in = args.price_in if args.price_in is not None else table[0]
      p_out = args.price_out if args.price_out is not None else table[1]
      if p_in is not None and p_out is not None and (p_in or p_out):
        max_cost = DEFAULT_MAX_COST
        log(f"autointerp: --max-cost not given: stopping at ${max_cost:.2f} (pass --max-cost to change)")
    from monojax.autointerp import runner
    runner.run_autointerp(
        workdir, backend=args.backend, model=args.model, base_url=args.base_url, features=args.features,
        units=args.units, neurons=args.neurons, scorers=scorers, seed=args.seed, concurrency=args.concurrency,
        max_retries=args.max_retries, timeout_s=args.timeout, max_cost=max_cost, price_in=args.price_in,
        price_out=args.price_out, progress=not args.no_progress, site=not args.no_site,
        report=not args.no_report, log=log)
  except errors.UserInputError as e:
    print(f"monojax.autointerp: {text.console(str(e))}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("monojax.autointerp: interrupted; finished replies are cached, run the same command to go on",
          file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
