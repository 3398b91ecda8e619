"""What the inspector site reads: the feature database turned into small per-feature data files.

Browsers refuse fetch()/XHR on file:// pages, but a <script src> still loads, so every data file is
a script with one call: `monojax.data("<key>", "<payload>")`, payload = base64(gzip(JSON)), which
the page decodes with the browser's DecompressionStream. gzip keeps a 4,096-feature site at ~16 MB
(plain JSON would be ~50 MB: each feature carries ~60 windows of 33 tokens); base64 in a JS string
can hold no markup, so nothing in corpus text can end the script. The keys:

  vocab              [str]: every token's display string on its own (tokens.TokenBytes.vocab)
  <unit>/index       the feature list: columns over features (density, max, top tokens, ...)
  <unit>/f/<i>       one feature: statistics, histograms, logit effects, neurons, examples, links
                     ({"i", "dead": true, "fired": 0} for a feature that never fired)
  samples/<k>        one TextInspector document: tokens and the active features of every unit

NaN (a statistic undefined for the feature) is written as null. Numbers keep 6 significant digits.
"""
from __future__ import annotations

import base64
import gzip
import json
import math
import os

import numpy as np

from monojax.analysis import database
from monojax.inspector import tokens

INDEX_TOKENS = 3      # distinct top-activating tokens and top logit tokens listed per feature
PROXY_ROWS = 3        # proxies listed per feature (highest correlation first)
FAMILY_LINKS = 3      # nearest features of another SAE of the run, by decoder cosine


def _num(x) -> float | None:
  x = float(x)
  return float(f"{x:.6g}") if math.isfinite(x) else None


def _nums(a) -> list:
  return [_num(v) for v in np.asarray(a, np.float64).ravel()]


def _ints(a) -> list[int]:
  return [int(v) for v in np.asarray(a).ravel()]


def pack(obj) -> str:
  """base64(gzip(JSON)), deterministic (no timestamp in the gzip header)."""
  raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
  return base64.b64encode(gzip.compress(raw, compresslevel=6, mtime=0)).decode("ascii")


def unpack(payload: str):
  return json.loads(gzip.decompress(base64.b64decode(payload)))


def script(key: str, obj) -> str:
  """A data file's text. The key is ours (unit names and numbers); json.dumps quotes it safely."""
  return f"monojax.data({json.dumps(key)},\"{pack(obj)}\");\n"


def read_script(path: str):
  """(key, object) of a data file (tests and tools read the site back with it)."""
  with open(path, encoding="utf-8") as f:
    body = f.read().strip()
  prefix = "monojax.data("
  if not (body.startswith(prefix) and body.endswith('");')):
    raise ValueError(f"{path}: not a monojax data file")
  key_json, payload = body[len(prefix):-3].split(',"', 1)
  return json.loads(key_json), unpack(payload)


def _top_token_ids(unit: database.Unit, n: int) -> list[list[int]]:
  """Per feature: up to n distinct token ids where it fired most (its top examples, in order)."""
  seq = np.asarray(unit.array("ex_seq")[:, :database.N_TOP], np.int64)
  pos = np.asarray(unit.array("ex_pos")[:, :database.N_TOP], np.int64)
  toks = unit.db.tokens
  ids = np.where(seq >= 0, np.asarray(toks[np.clip(seq, 0, toks.shape[0] - 1), pos]), -1)
  out = []
  for row in ids:
    seen: list[int] = []
    for t in row:
      if t >= 0 and t not in seen:
        seen.append(int(t))
        if len(seen) == n:
          break
    out.append(seen)
  return out


def unit_index(unit: database.Unit, proxy_names: list[str], explanations: dict | None = None) -> dict:
  """The feature list of one unit, as columns (one entry per feature). An explanation of the
  offline baseline (explanation_baseline 1) is searched and ordered by, not used as the label."""
  fired = np.asarray(unit.array("fired"), np.int64)
  density = np.asarray(unit.array("density"), np.float64)
  out = {"n": unit.width, "fired": _ints(fired), "density": _nums(density), "max": _nums(unit.array("max")),
         "top_tokens": _top_token_ids(unit, INDEX_TOKENS),
         "logit_top": [_ints(r[:INDEX_TOKENS]) for r in np.asarray(unit.array("logit_top_ids"))]}
  if proxy_names and os.path.exists(os.path.join(unit.path, "proxy_corr.npy")):
    corr = np.nan_to_num(np.asarray(unit.array("proxy_corr"), np.float64), nan=-2.0)
    prec = np.asarray(unit.array("proxy_precision"), np.float64)
    best = corr.argmax(1)
    rows = np.arange(len(best))
    out["proxy"] = _ints(best)
    out["proxy_corr"] = _nums(np.where(corr[rows, best] > -2, corr[rows, best], np.nan))
    out["proxy_precision"] = _nums(prec[rows, best])
  expl = explanations or {}
  if expl:
    out["explanation"] = [expl.get(i, {}).get("explanation") for i in range(unit.width)]
    out["explanation_baseline"] = [int(bool(expl.get(i, {}).get("baseline"))) for i in range(unit.width)]
    out["score"] = [_num(expl[i]["score"]) if i in expl and expl[i].get("score") is not None else None
                    for i in range(unit.width)]
  return out


def _examples(exs: list[dict], token_bytes: tokens.TokenBytes | None = None) -> list[dict]:
  """Feature i's example groups (top, intervals 1-10, bottom), each example
  [value, seq, pos, repeated, ids[WINDOW] (-1 outside the sequence), [[offset, act], ...] non-zero,
  [[offset, piece], ...]]: the last, only where a token shows other than its vocabulary string (a
  character split over tokens, shown whole by the token completing it; tokens.py). The record's
  "ablation" maps "seq:pos" of an example to its ablation effects (analysis/ablation.py):
  [[offset, Δ next-token loss, up ids, up Δlog p, down ids, down Δlog p], ...]."""
  groups: list[dict] = []
  for e in exs:   # the database's own windows (Unit.examples: token ids, -1 outside the sequence)
    if not groups or groups[-1]["name"] != e["group"]:
      groups.append({"name": e["group"], "ex": []})
    ids, w = np.asarray(e["tokens"]), np.asarray(e["acts"], np.float64)
    nz = np.flatnonzero(np.isfinite(w) & (w != 0))
    ex = [_num(e["value"]), e["seq"], e["pos"], int(e["repeated"]), _ints(ids), [[int(o), _num(w[o])] for o in nz]]
    if token_bytes is not None and token_bytes.partial[ids[ids >= 0]].any():
      vocab = token_bytes.vocab
      override = [[o, piece] for o, (t, piece) in enumerate(zip(ids, token_bytes.pieces(ids)))
                  if t >= 0 and piece != vocab[t]]
      if override:
        ex.append(override)
    groups[-1]["ex"].append(ex)
  return groups


def feature_record(unit: database.Unit, i: int, proxy_names: list[str], links: dict | None = None,
                   token_bytes: tokens.TokenBytes | None = None) -> dict:
  """Everything the FeatureInspector shows about feature i of `unit` (see the module docstring)."""
  a = lambda n: np.asarray(unit.array(n)[i])  # noqa: E731
  exs = unit.examples(i)
  rec = {"i": i, "fired": int(a("fired")), "density": _num(a("density")), "max": _num(a("max")),
         "mean": _num(a("mean")), "hist": _ints(a("hist")),
         "logit": {"top": _ints(a("logit_top_ids")), "top_v": _nums(a("logit_top_values")),
                   "bottom": _ints(a("logit_bottom_ids")), "bottom_v": _nums(a("logit_bottom_values")),
                   "hist": _ints(a("logit_hist")), "edges": _nums(a("logit_hist_edges")),
                   "median": _num(a("logit_median"))},
         "groups": _examples(exs, token_bytes)}
  has = lambda n: os.path.exists(os.path.join(unit.path, f"{n}.npy"))  # noqa: E731
  if has("top_neurons"):
    rec["neurons"] = [[int(n), _num(w)] for n, w in zip(a("top_neurons"), a("top_neuron_weights"))]
  if has("corr_neuron"):
    rec["corr_neuron"] = [int(a("corr_neuron")), _num(a("corr_neuron_value"))]
  if proxy_names and has("proxy_corr"):
    corr = np.asarray(a("proxy_corr"), np.float64)
    order = np.argsort(-np.nan_to_num(corr, nan=-2.0), kind="stable")[:PROXY_ROWS]
    rec["proxies"] = [[int(p), _num(a("proxy_precision")[p]), _num(a("proxy_recall")[p]), _num(corr[p])]
                      for p in order]
  if links:
    rec["links"] = links
  if has("abl_off"):
    abl = {}
    by_slot = {x["slot"]: x for x in exs}
    for slot, effects in unit.ablation(i).items():
      e = by_slot.get(slot)
      if e is not None:
        abl[f"{e['seq']}:{e['pos']}"] = [[d["offset"], _num(d["dloss"]), _ints([t for t, _ in d["up"]]),
                                         _nums([v for _, v in d["up"]]), _ints([t for t, _ in d["down"]]),
                                         _nums([v for _, v in d["down"]])] for d in effects]
    rec["ablation"] = abl
  return rec


def family_links(db: database.FeatureDatabase, unit: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{other SAE: (ids [F, k], cosines [F, k])}: for each feature of `unit`, the nearest features of
  each other SAE of the run by decoder cosine (feature splitting across widths)."""
  out = {}
  for pair in db.meta.get("families") or []:
    a, b = pair.split("__", 1)
    if a == unit:
      fam = db.families(a, b)
      out[b] = (np.asarray(fam["cos_ids"])[:, :FAMILY_LINKS], np.asarray(fam["cos"])[:, :FAMILY_LINKS])
  return out


def universality_links(workdir: str, unit: str) -> dict | None:
  """The match of each feature of `unit` in run B (RUN/universality, written by `analyze --compare`):
  {"run_b", "unit_b", "best" [F], "corr" [F]} or None."""
  path = os.path.join(workdir, "universality")
  try:
    with open(os.path.join(path, "summary.json")) as f:
      summary = json.load(f)
    if summary.get("sae_a") != unit:
      return None
    with np.load(os.path.join(path, "matches.npz")) as z:
      best, corr = np.asarray(z["feature_best"]), np.asarray(z["feature_corr"])
  except (OSError, ValueError, KeyError):
    return None
  return {"run_b": str(summary.get("run_b", "")), "unit_b": str(summary.get("sae_b", "")), "best": best, "corr": corr,
          "n_tokens": int(summary.get("n_tokens", 0))}


def links_for(i: int, families: dict, universality: dict | None) -> dict:
  out: dict = {}
  if families:
    out["family"] = {b: [[int(j), _num(c)] for j, c in zip(ids[i], cos[i]) if j >= 0] for b, (ids, cos) in families.items()}
  if universality is not None and i < len(universality["best"]) and universality["best"][i] >= 0:
    out["universality"] = {"unit": universality["unit_b"], "feature": int(universality["best"][i]),
                           "corr": _num(universality["corr"][i])}
  return out
