"""One autointerp job over a finished, analysed run: open it, explain and score the chosen features
of each unit with one backend, write RUN/autointerp/<label>/<unit>.json as it goes, then refresh
the run report and the inspector so both show the results."""
from __future__ import annotations

import os
import time

import numpy as np

from monojax import errors
from monojax.analysis import database
from monojax.analysis import explanations as results_lib
from monojax.analysis import report as report_lib
from monojax.autointerp import pipeline
from monojax.autointerp.sources import NEURONS, UnitSource

CACHE = "cache.sqlite"


def parse_features(spec: str, width: int, fired: np.ndarray) -> list[int]:
  """--features: "live" (every feature that fired), "all", "A:B" (a range), or "1,5,9"."""
  s = str(spec).strip()
  if s == "live":
    return [int(i) for i in np.nonzero(np.asarray(fired) > 0)[0]]
  if s == "all":
    return list(range(width))
  try:
    if ":" in s:
      a, b = s.split(":", 1)
      lo, hi = int(a or 0), int(b) if b else width
      if not 0 <= lo < hi:
        raise ValueError
      return list(range(lo, min(hi, width)))
    out = sorted({int(x) for x in s.split(",") if x.strip()})
  except ValueError:
    raise errors.UserInputError(f"--features={spec}: expected live, all, a range A:B (0 ≤ A < B) or indices 1,5,9") from None
  bad = [i for i in out if not 0 <= i < width]
  if bad or not out:
    raise errors.UserInputError(f"--features={spec}: indices must be in 0..{width - 1}")
  return out


def choose_units(db: database.FeatureDatabase, units: str | None, neurons: bool) -> list[str]:
  have = db.unit_names
  if units:
    names = [u.strip() for u in units.split(",") if u.strip()]
    bad = [u for u in names if u not in have]
    if bad:
      raise errors.UserInputError(f"--units={units}: this run's database has {', '.join(have)}")
  else:
    names = [u for u in have if u != NEURONS]
  if neurons and NEURONS in have and NEURONS not in names:
    names.append(NEURONS)
  return names


def make_judge(backend: str, run, workdir: str, *, model=None, base_url=None, concurrency=8, max_retries=5,
               timeout_s=120.0, max_cost=None, price_in=None, price_out=None, progress=True, log=print):
  from monojax.inspector import live
  tb = live.token_bytes(run.tokenizer)
  if backend == "offline":
    return pipeline.OfflineJudge(tb.pieces, tb.vocab), None
  from monojax.autointerp import llm
  if not model:
    raise errors.UserInputError(f"--backend={backend} needs --model (e.g. claude-haiku-4-5, gpt-4o-mini, or the "
                                "name your local server serves)")
  client = llm.LLMClient(backend, model, base_url=base_url,
                         cache_path=os.path.join(results_lib.autointerp_dir(workdir), CACHE),
                         concurrency=concurrency, max_retries=max_retries, timeout_s=timeout_s, max_cost=max_cost,
                         price_in=price_in, price_out=price_out, progress=progress, log=log)
  return pipeline.LLMJudge(client, tb.pieces, tb.vocab), client


def summary_lines(unit: str, summ: dict, baseline: bool) -> list[str]:
  what = "neurons" if unit == NEURONS else "features"
  tag = " [offline baseline]" if baseline else ""
  parts = []
  for name in pipeline.SCORERS:
    s = summ.get(name)
    if s and s["n"]:
      parts.append(f"{name} {s['median']:.3f}")
  errs = "; ".join(f"{stage}: " + ", ".join(f"{n} {k}" for k, n in kinds.items())
                   for stage, kinds in summ["errors"].items())
  return [f"autointerp{tag}: {unit}: {summ['explained']:,} of {summ['features']:,} {what} explained "
          f"({summ['excluded']:,} excluded: < 20 distinct examples; {summ['single_token']:,} single-token); "
          f"median scores: {', '.join(parts) or 'none'}" + (f"; not scored: {errs}" if errs else "")]


def run_autointerp(workdir: str, *, backend: str = "offline", model=None, base_url=None, features: str = "live",
                   units: str | None = None, neurons: bool = False, scorers=pipeline.SCORERS, seed: int = 0,
                   pool_sequences: int = 1024, concurrency: int = 8, max_retries: int = 5, timeout_s: float = 120.0,
                   max_cost=None, price_in=None, price_out=None, progress: bool = True, site: bool = True,
                   report: bool = True, run=None, log=print) -> dict:
  """Runs the job; returns {"label", "units": {unit: summary}, "usage": client summary or None, "paths"}."""
  from monojax.run import Run
  db = database.open_database(workdir)
  names = choose_units(db, units, neurons)
  bad = [s for s in scorers if s not in pipeline.SCORERS]
  if bad:
    raise errors.UserInputError(f"--scorers: unknown {', '.join(bad)}; choose from {', '.join(pipeline.SCORERS)}")
  # Parse every unit's --features before any model work, so a typo costs nothing.
  chosen = {u: parse_features(features, db.unit(u).width, db.unit(u).array("fired")) for u in names}
  if not any(chosen.values()):
    raise errors.UserInputError(f"--features={features}: no feature of {', '.join(names)} (widths "
                                f"{', '.join(str(db.unit(u).width) for u in names)}; live counts only features that fired)")
  run = run or Run.open(workdir, log=log)
  judge, client = make_judge(backend, run, workdir, model=model, base_url=base_url, concurrency=concurrency,
                             max_retries=max_retries, timeout_s=timeout_s, max_cost=max_cost, price_in=price_in,
                             price_out=price_out, progress=progress, log=log)
  label = results_lib.label_for(judge.backend, judge.model)
  out = {"label": label, "units": {}, "usage": None, "paths": []}
  t0 = time.time()
  job = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
  try:
    for unit in names:
      src = UnitSource(run, db, unit, pool_sequences=pool_sequences, seed=seed)
      def save(recs, src=src):
        path = pipeline.write(workdir, judge, src, recs, scorers, client.summary() if client else None, job)
        if path not in out["paths"]:
          out["paths"].append(path)
      recs = pipeline.run_unit(src, judge, chosen[unit], scorers=scorers, seed=seed, on_chunk=save, log=log)
      summ = pipeline.summarize(recs, scorers)
      out["units"][unit] = summ
      for line in summary_lines(unit, summ, judge.baseline):
        log(line)
      if client and client.summary().get("stopped_by_max_cost"):
        log("autointerp: stopped at --max-cost; what finished is saved and cached: run again with a higher "
            "--max-cost to go on")
        break
  finally:
    if client:
      out["usage"] = client.summary()
      log(client.summary_line())
      client.close()
  log(f"autointerp: {label}: results in {os.path.join(results_lib.autointerp_dir(workdir), label)} "
      f"({time.time() - t0:.0f}s)")
  if report:
    report_lib.write_report(workdir, log=log, tokenizer=run.tokenizer)
  if site:
    from monojax.inspector import site as site_lib
    site_lib.build(workdir, run=run, log=log)
  return out
