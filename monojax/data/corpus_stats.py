"""Documents, bytes and tokens per Pile set of a corpus, for the main job's summary and for bits per
byte. Counted once per (files, tokenizer) and cached; files are counted in parallel processes.

Tokenizing the whole of a large corpus just to print a table is not worth hours, so past
`max_tokenized_bytes` per file only documents and bytes are counted and tokens are extrapolated
from the file's measured bytes/token (the row is then marked estimated).
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import multiprocessing
import os

from monojax import files
from monojax.data import pile_io, sources, tokenizer as tokenizer_lib


def _count_file(path: str, tok: tokenizer_lib.TextTokenizer, on_error: str, max_tokenized_bytes: int,
                batch_docs: int = 64, max_line_bytes: int = pile_io.MAX_LINE_BYTES) -> dict:
  per_set = collections.defaultdict(lambda: {"documents": 0, "bytes": 0, "tokens": 0, "tokenized_bytes": 0})
  skips = pile_io.SkipCounts()
  batch: list[tuple[str, str, int]] = []
  tokenized = 0

  def flush():
    if batch:
      for (name, _, nb), enc in zip(batch, tok.hf.encode_batch([t for _, t, _ in batch], add_special_tokens=False)):
        per_set[name]["tokens"] += len(enc.ids)
        per_set[name]["tokenized_bytes"] += nb
      batch.clear()

  for _, rec in pile_io.read_records(path, on_error=on_error, skips=skips, max_line_bytes=max_line_bytes):
    name = str(rec["meta"].get("pile_set_name", "unknown"))
    nb = len(rec["text"].encode("utf-8"))
    per_set[name]["documents"] += 1
    per_set[name]["bytes"] += nb
    if tokenized < max_tokenized_bytes:
      tokenized += nb
      batch.append((name, rec["text"], nb))
      if len(batch) == batch_docs:
        flush()
  flush()
  return {"sets": {k: dict(v) for k, v in per_set.items()}, "skips": dict(skips)}


def count_tokens(files_by_split: dict[str, list[str]], tok: tokenizer_lib.TextTokenizer, *, on_error: str,
                 cache_dir: str, max_tokenized_bytes: int = 256 << 20, processes: int | None = None,
                 max_line_bytes: int = pile_io.MAX_LINE_BYTES) -> dict:
  """{split: {set: {documents, bytes, tokens, estimated}}, plus "total" per split}; cached."""
  key = hashlib.sha1(tok.hf.to_str().encode() + str(max_tokenized_bytes).encode())
  for split in sorted(files_by_split):
    key.update(sources._key(files_by_split[split], on_error, max_line_bytes).encode())
  cache = os.path.join(os.path.expanduser(cache_dir), f"token_counts-{key.hexdigest()[:20]}.json")
  if os.path.exists(cache):
    with open(cache) as f:
      return json.load(f)
  jobs = [(split, f) for split, files in files_by_split.items() for f in files]
  processes = processes or min(len(jobs), os.cpu_count() or 1)
  ctx = multiprocessing.get_context("spawn")  # fork after jax/tokenizers threads started is unsafe
  with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
    results = list(pool.map(_count_file, [f for _, f in jobs], [tok] * len(jobs), [on_error] * len(jobs),
                            [max_tokenized_bytes] * len(jobs), [64] * len(jobs), [max_line_bytes] * len(jobs)))
  out: dict = {}
  for (split, _), res in zip(jobs, results):
    split_out = out.setdefault(split, {})
    for name, c in res["sets"].items():
      row = split_out.setdefault(name, {"documents": 0, "bytes": 0, "tokens": 0, "tokenized_bytes": 0})
      for k in row:
        row[k] += c[k]
  for split, rows in out.items():
    total = {"documents": 0, "bytes": 0, "tokens": 0, "estimated": False}
    for row in rows.values():
      row["estimated"] = row["tokenized_bytes"] < row["bytes"]
      if row["estimated"] and row["tokenized_bytes"]:
        row["tokens"] = round(row["tokens"] * row["bytes"] / row["tokenized_bytes"])
      del row["tokenized_bytes"]
      for k in ("documents", "bytes", "tokens"):
        total[k] += row[k]
      total["estimated"] |= row["estimated"]
    rows["total"] = total
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  files.atomic_write_json(cache, out, indent=1)
  return out


def format_table(counts: dict) -> str:
  """A plain-text table of tokens per set, train and val side by side."""
  names = sorted({n for rows in counts.values() for n in rows if n != "total"}) + ["total"]
  lines = [f"{'set':<44} {'docs':>9} {'MB':>8} {'tokens':>13} {'B/tok':>6} {'val tokens':>11}"]
  for n in names:
    tr = counts.get("train", {}).get(n, {"documents": 0, "bytes": 0, "tokens": 0, "estimated": False})
    va = counts.get("val", {}).get(n, {"tokens": 0})
    bpt = tr["bytes"] / tr["tokens"] if tr["tokens"] else float("nan")
    est = "~" if tr.get("estimated") else " "
    lines.append(f"{n[:44]:<44} {tr['documents']:>9,} {tr['bytes'] / 1e6:>8.1f} {est}{tr['tokens']:>12,} "
                 f"{bpt:>6.2f} {va['tokens']:>11,}")
  return "\n".join(lines)
