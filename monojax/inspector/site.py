"""`python -m monojax.inspect build`: the static inspector site of a run, RUN/inspector/.

  index.html, text.html   the FeatureInspector and the TextInspector (static/, copied as is)
  assets/                 their script and style (no library, nothing from the network)
  data/site.js            what the pages need first: run, units, proxies, histogram edges, samples
  data/vocab.js           token display strings
  data/<unit>/index.js    the feature list of a unit; data/<unit>/f/<i>.js one feature (dead ones too)
  data/samples/<k>.js     TextInspector documents: every unit's active features on every token
  site.json               schema and what the site was built from (marks the folder as ours)

Written into RUN/inspector.tmp-<pid>/ and renamed over the old site once complete, so a failed
build leaves the previous site as it was; a folder there that is not an inspector site is refused.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import time

import numpy as np

from monojax import errors, files
from monojax.analysis import database, stats
from monojax.analysis import explanations as explanations_lib
from monojax.inspector import export, live

SCHEMA = "monojax-inspector/1"
DIRNAME = "inspector"
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
SAMPLES_PER_SET = 2        # TextInspector documents per corpus set (the paper showed 25 texts)
SAMPLE_MAX_CHARS = 1500    # a document is cut (at a space) to about this many characters
SAMPLE_MAX_TOKENS = 256


def site_dir(workdir: str) -> str:
  return os.path.join(workdir, DIRNAME)


def check_writable(final: str) -> None:
  """The site may replace only an earlier site (or an empty folder): anything else is left alone."""
  why = files.replace_refusal(final, "site.json", "monojax-inspector/")
  if why == "foreign":
    raise errors.UserInputError(f"{final}: exists and is not an inspector site; choose another --out (nothing there is replaced)")
  if why:
    raise errors.UserInputError(f"{final}: exists and is not a folder; choose another --out")


def explanations(workdir: str, unit: str) -> tuple[dict[int, dict], dict | None]:
  """A unit's autointerp results when the run has them (analysis/explanations.py picks the label: a
  model's over the offline baseline): ({feature: record}, {"label", "backend", "model", "baseline",
  "prompt_version"}), or ({}, None) and the panels say how to make them."""
  doc = explanations_lib.load(workdir, unit)
  if doc is None:
    return {}, None
  source = {k: doc.get(k) for k in ("label", "backend", "model", "baseline", "prompt_version", "labels")}
  return {i: explanations_lib.feature_summary(r) for i, r in doc["features"].items()}, source


def _write(path: str, body: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(body)


def _sample_documents(run, log) -> list[dict]:
  """A few documents of each corpus set of the analysis split (non-English and code included when the
  corpus has them), cut to a readable length; without the corpus on this machine, the first
  sequences the analysis pass read."""
  from monojax.data import pipeline, sources
  try:  # never builds the default corpus: without it, the analysed sequences serve
    root = pipeline.corpus_root(run.cfg.data)
    src = pipeline.text_source(run.cfg.data, root, sources.ANALYSIS, logging.info)
  except errors.UserInputError as e:
    log(f"inspect: no analysis split to sample documents from ({e}); the TextInspector shows analysed sequences")
    return []
  by_set: dict[str, list[int]] = {}
  order = list(range(len(src)))
  random.Random(0).shuffle(order)
  for d in order:
    by_set.setdefault(src.set_name(d), []).append(d)
  docs = []
  for name in sorted(by_set):
    picked = [d for d in by_set[name] if len(src[d].strip()) >= 200][:SAMPLES_PER_SET] or by_set[name][:1]
    for d in picked:
      body = src[d]
      if len(body) > SAMPLE_MAX_CHARS:
        cut = body.rfind(" ", SAMPLE_MAX_CHARS // 2, SAMPLE_MAX_CHARS)
        body = body[:cut if cut > 0 else SAMPLE_MAX_CHARS]
      docs.append({"set": name, "doc": int(d), "text": body})
  return docs


def _fallback_documents(run, db, n: int = 6) -> list[dict]:
  toks = np.asarray(db.tokens[:n])
  return [{"set": "analysed sequences", "doc": int(k), "text": run.tokenizer.decode([int(t) for t in row])}
          for k, row in enumerate(toks)]


def build(workdir: str, *, out: str | None = None, samples: bool = True, run=None, log=print) -> str:
  """Builds the site of a run from its feature database; returns the path of index.html. `run`: the
  run already open (the end of a training job), else the run loader opens it."""
  from monojax.run import Run
  t0 = time.time()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  db = database.open_database(workdir)
  final = os.path.abspath(os.path.expanduser(out)) if out else site_dir(workdir)
  check_writable(final)
  run = run if run is not None else Run.open(workdir, log=logging.info)
  tmp = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    shutil.copytree(STATIC, tmp)
    n_files = _write_data(run, db, workdir, tmp, samples, log)
    files.atomic_write_json(os.path.join(tmp, "site.json"),
                            {"schema": SCHEMA, "run": workdir, "step": db.meta.get("step"), "files": n_files,
                             "built_seconds": round(time.time() - t0, 1)}, indent=1)
    files.replace_dir(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  index = os.path.join(final, "index.html")
  log(f"inspect: built the inspector ({n_files:,} data files, {_size_mb(final):.1f} MB) in {time.time() - t0:.1f}s; "
      f"open file://{index}")
  return index


def _size_mb(path: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6


def _write_data(run, db: database.FeatureDatabase, workdir: str, out: str, samples: bool, log) -> int:
  data = os.path.join(out, "data")
  proxy_names = [p["name"] for p in db.meta.get("proxies") or []]
  n_files = 0
  token_bytes = live.token_bytes(run.tokenizer)
  _write(os.path.join(data, "vocab.js"), export.script("vocab", token_bytes.vocab))
  units = []
  for info in db.meta["units"]:
    name = info["name"]
    unit = db.unit(name)
    expl, expl_source = explanations(workdir, name)
    index = export.unit_index(unit, proxy_names, expl)
    _write(os.path.join(data, name, "index.js"), export.script(f"{name}/index", index))
    families = export.family_links(db, name)
    universality = export.universality_links(workdir, name)
    fired = np.asarray(unit.array("fired"))
    for i in range(unit.width):
      if fired[i] > 0:
        rec = export.feature_record(unit, i, proxy_names, export.links_for(i, families, universality), token_bytes)
        if i in expl:
          rec["autointerp"] = expl[i]
      else:   # a few bytes, so a link to a dead feature loads like any other (no missing-file error)
        rec = {"i": i, "dead": True, "fired": 0}
      _write(os.path.join(data, name, "f", f"{i}.js"), export.script(f"{name}/f/{i}", rec))
      n_files += 1
    units.append({"name": name, "kind": info["kind"], "width": int(info["width"]), "label": info.get("label", name),
                  "dead": int(info.get("dead", 0)), "ultralow": int(info.get("ultralow", 0)),
                  "dense": int(info.get("dense", 0)), "explanations": bool(expl), "autointerp": expl_source,
                  "families": sorted(families), "universality": None if universality is None else {
                      "run_b": universality["run_b"], "unit_b": universality["unit_b"],
                      "n_tokens": universality["n_tokens"],
                      "site_b": _relative_site(out, universality["run_b"])}})
    log(f"inspect: {name}: {int((fired > 0).sum()):,} live features of {unit.width:,}")
  sample_list = _write_samples(run, db, data, log) if samples else []
  meta = db.meta
  site = {"schema": SCHEMA, "run": os.path.basename(workdir.rstrip(os.sep)), "workdir": workdir,
          "step": meta.get("step"), "n_tokens": db.n_tokens, "source": {k: meta.get("source", {}).get(k) for k in
                                                                       ("split", "documents", "bytes")},
          "units": units, "proxies": [{"name": p["name"], "description": p.get("description", "")} for p in
                                      meta.get("proxies") or []],
          "hist_edges": export._nums(stats.hist_edges()), "window": [stats.LEFT, stats.RIGHT],
          "ultralow": database.ULTRALOW, "dense": database.DENSE, "samples": sample_list,
          "vocab_size": int(run.tokenizer.vocab_size)}
  _write(os.path.join(data, "site.js"), export.script("site", site))
  return n_files + len(sample_list) + len(units) + 2


def _relative_site(out: str, run_b: str) -> str | None:
  """Run B's inspector page relative to this site's final place (a file:// link works when both
  sites are built); None when run B has no site."""
  if not run_b or not os.path.exists(os.path.join(run_b, DIRNAME, "index.html")):
    return None
  final = out.rsplit(".tmp-", 1)[0]
  return os.path.relpath(os.path.join(run_b, DIRNAME, "index.html"), final).replace(os.sep, "/")


def _write_samples(run, db, data: str, log) -> list[dict]:
  docs = _sample_documents(run, log) or _fallback_documents(run, db)
  names = [u["name"] for u in db.meta["units"]]
  listed = []
  for k, doc in enumerate(docs):
    acts = {name: live.text_activations(run, doc["text"], name, max_tokens=SAMPLE_MAX_TOKENS) for name in names}
    first = acts[names[0]]
    rec = {"set": doc["set"], "doc": doc["doc"], "tokens": first["tokens"], "pieces": first["pieces"],
           "truncated": first["truncated"], "seq_len": first["seq_len"],
           "units": {n: {"features": a["features"], "active": a["active"]} for n, a in acts.items()}}
    _write(os.path.join(data, "samples", f"{k}.js"), export.script(f"samples/{k}", rec))
    listed.append({"k": k, "set": doc["set"], "doc": doc["doc"], "n_tokens": first["n_tokens"],
                   "preview": first["pieces"][:12] and "".join(first["pieces"][:12])})
  log(f"inspect: {len(listed)} TextInspector documents from {len({d['set'] for d in docs})} corpus set(s)")
  return listed
