"""The inspector site (python -m monojax.inspect build), a benchmark, not a test.

  python benchmarks/inspector.py --workdir=runs/quickstart [--features=40] [--unit=sae0]

For an analysed run (the README's main command writes one with a 4,096-feature SAE): the build
time, the site's size (total, files, largest file, per-feature files) and, in headless Chromium
(Debian's, via playwright), the time from navigation to a feature's panels being drawn, for
--features live features picked at random, each a fresh page load from file://. The anchor,
measured in the same run: navigation to a page with the same script and style and no data. Also
the time until the example lists below the fold are drawn too, and the time to switch feature
within a loaded page. Targets (issue 16): ≤ 50 MB for 4,096 features,
no giant file, < 200 ms median to a drawn feature on a 2-core CPU. A unit without live features
prints no figures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402 (benchmarks/machine.py)

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _chromium() -> str:
  path = os.environ.get("MONOJAX_CHROMIUM") or "/usr/bin/chromium"
  if not os.path.exists(path):
    sys.exit(f"benchmarks/inspector.py: no Chromium at {path} (apt-get install chromium, or set MONOJAX_CHROMIUM)")
  return path


def _sizes(site: str, unit: str) -> dict:
  sizes = {}
  for d, _, fs in os.walk(site):
    for f in fs:
      p = os.path.join(d, f)
      sizes[os.path.relpath(p, site)] = os.path.getsize(p)
  feat = [v for k, v in sizes.items() if k.startswith(os.path.join("data", unit, "f") + os.sep)]
  largest = max(sizes.items(), key=lambda kv: kv[1])
  return {"total_mb": sum(sizes.values()) / 1e6, "files": len(sizes), "largest": largest[0],
          "largest_mb": largest[1] / 1e6, "feature_files": len(feat),
          "feature_kb_median": statistics.median(feat) / 1e3 if feat else 0.0,
          "unit_mb": sum(feat) / 1e6}


def _browser_times(site: str, unit: str, picks: list[int]) -> dict:
  from playwright.sync_api import sync_playwright
  index = "file://" + os.path.join(site, "index.html")
  blank = os.path.join(site, "blank-anchor.html")
  with open(blank, "w") as f:   # the same script and style, no data: what any page costs to open
    f.write('<!doctype html><html><head><meta charset="utf-8"><link rel="stylesheet" href="assets/inspector.css">'
            '<script src="assets/common.js"></script><script src="assets/panels.js"></script>'
            '<script src="assets/anchor-ready.js"></script></head><body></body></html>')
  with open(os.path.join(site, "assets", "anchor-ready.js"), "w") as f:
    f.write('document.addEventListener("DOMContentLoaded",function(){window.monojaxReadyAt=performance.now();'
            'document.body.setAttribute("data-ready","anchor");});')
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 800})

    def load(url: str, want: str, complete: list | None = None) -> float:
      page.goto("about:blank")   # a fresh document each time (a hash change alone would not reload)
      page.goto(url)
      page.wait_for_selector(f"body[data-ready={json.dumps(want)}]", state="attached", timeout=30000)
      if complete is not None:   # the example panels, drawn a frame after the first paint
        page.wait_for_selector(f"body[data-complete={json.dumps(want)}]", state="attached", timeout=30000)
        complete.append(float(page.evaluate("window.monojaxCompleteAt")))
      return float(page.evaluate("window.monojaxReadyAt"))

    load(f"{index}#sae={unit}&feature={picks[0]}", f"{unit}/{picks[0]}")  # warm the disk cache
    anchor = [load("file://" + blank, "anchor") for _ in range(len(picks))]
    full: list = []
    cold = [load(f"{index}#sae={unit}&feature={i}", f"{unit}/{i}", full) for i in picks]
    switch = []
    for i in reversed(picks):
      t0 = page.evaluate("performance.now()")
      page.evaluate(f"location.hash = 'sae={unit}&feature={i}'")
      page.wait_for_selector(f'body[data-ready="{unit}/{i}"]', state="attached", timeout=30000)
      switch.append(float(page.evaluate("window.monojaxReadyAt")) - t0)
    browser.close()
  os.remove(blank)
  os.remove(os.path.join(site, "assets", "anchor-ready.js"))
  med = statistics.median
  return {"anchor_ms": med(anchor), "load_ms": med(cold), "complete_ms": med(full), "load_p90_ms": sorted(cold)[int(0.9 * (len(cold) - 1))],
          "switch_ms": med(switch)}


def browse_all(site: str, unit: str, n: int) -> dict:
  """Opens every feature of `unit` in turn (hash changes in one page) and counts what went wrong:
  console or page errors, a live feature without its logit panel or top examples."""
  from playwright.sync_api import sync_playwright
  problems, t0 = [], time.perf_counter()
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.goto("file://" + os.path.join(site, "index.html") + f"#sae={unit}&feature=0")
    page.wait_for_selector(f'body[data-complete="{unit}/0"]', state="attached", timeout=30000)
    # the loop runs in the page (one round trip per feature would measure the driver)
    counts = page.evaluate("""async (n) => {
      const unit = new URLSearchParams(location.hash.slice(1)).get('sae');
      const out = {features: 0, dead_pages: 0, examples: 0, bad: []};
      const complete = (want) => new Promise((resolve) => {
        if (document.body.getAttribute('data-complete') === want) return resolve();
        const obs = new MutationObserver(() => {
          if (document.body.getAttribute('data-complete') === want) { obs.disconnect(); resolve(); }
        });
        obs.observe(document.body, {attributes: true});
      });
      for (let i = 0; i < n; i++) {
        if (i) { location.hash = 'sae=' + unit + '&feature=' + i; }
        await complete(unit + '/' + i);
        const dead = document.querySelectorAll('.dead-note').length;
        const bars = document.querySelectorAll('[data-panel=logits] rect.bar').length;
        const top = document.querySelectorAll('[data-panel=top] .ex').length;
        out.features++; out.examples += document.querySelectorAll('.ex').length;
        if (dead) out.dead_pages++; else if (!(bars && top)) out.bad.push(unit + '/' + i + ': logit bars ' + bars + ', top examples ' + top);
      }
      return out;
    }""", n)
    problems.extend(counts.pop("bad"))
    browser.close()
  return dict(counts, problems=problems, seconds=time.perf_counter() - t0)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="an analysed run (RUN/analysis exists)")
  ap.add_argument("--unit", default="sae0")
  ap.add_argument("--features", type=int, default=40, help="live features timed (random, seed 0)")
  ap.add_argument("--browse_all", action="store_true", help="also open every feature of the unit and count problems")
  args = ap.parse_args()
  import numpy as np
  from monojax.analysis import database
  from monojax.inspector import site as site_lib
  print(f"machine: {machine.cpu_line()}")
  db = database.open_database(args.workdir)
  unit = db.unit(args.unit)
  live = np.flatnonzero(np.asarray(unit.array("fired")) > 0)
  print(f"unit {args.unit}: {unit.width:,} features, {live.size:,} live, {db.n_tokens:,} analysed tokens")
  if live.size == 0:
    print("no live feature: nothing to time, no figures printed")
    return 1
  with tempfile.TemporaryDirectory(prefix="monojax-inspector-bench-") as tmp:
    out = os.path.join(tmp, "site")
    t0 = time.perf_counter()
    site_lib.build(args.workdir, out=out, log=lambda *_: None)
    build_s = time.perf_counter() - t0
    sz = _sizes(out, args.unit)
    picks = [int(i) for i in random.Random(0).sample(list(live), min(args.features, live.size))]
    t = _browser_times(out, args.unit, picks)
    every = browse_all(out, args.unit, unit.width) if args.browse_all else None
  per4096 = sz["unit_mb"] / live.size * 4096
  print(f"build: {build_s:.1f} s (samples included)")
  print(f"size: {sz['total_mb']:.1f} MB in {sz['files']:,} files (target <= 50 MB for 4,096 features); "
        f"{args.unit}: {sz['feature_files']:,} feature files, median {sz['feature_kb_median']:.1f} kB, "
        f"{sz['unit_mb']:.1f} MB ({per4096:.1f} MB per 4,096 live features); "
        f"largest file {sz['largest']} {sz['largest_mb']:.2f} MB")
  print(f"navigation to drawn panels, {len(picks)} features, fresh loads from file://: median {t['load_ms']:.0f} ms, "
        f"p90 {t['load_p90_ms']:.0f} ms (target < 200 ms); anchor page (same assets, no data) {t['anchor_ms']:.0f} ms; "
        f"ratio {t['load_ms'] / max(t['anchor_ms'], 1e-3):.2f}x the anchor")
  print(f"  all panels drawn (the example lists, below the fold at 1280x800, a frame later): median "
        f"{t['complete_ms']:.0f} ms")
  print(f"switch feature within the page: median {t['switch_ms']:.0f} ms")
  if every is not None:
    print(f"every feature opened: {every['features']:,} pages ({every['dead_pages']:,} dead), {every['examples']:,} "
          f"example rows drawn, {len(every['problems'])} problems in {every['seconds']:.0f} s"
          + "".join(f"\n  {p}" for p in every["problems"][:20]))
  return 0 if every is None or not every["problems"] else 1


if __name__ == "__main__":
  sys.exit(main())
