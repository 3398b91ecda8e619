"""The feature database: what the analysis pass wrote about every feature and neuron of a run.

Layout (`RUN/analysis/`, one writer: the pass writes `analysis.tmp-<pid>/` and renames it):
  meta.json            schema, the run step, tokens analysed and where they came from, units, proxies
  tokens.npy           int32 [sequences, T]: the analysed model inputs (examples point into it)
  <unit>/<array>.npy   per-unit columnar arrays, first axis = feature (or neuron) index
  <unit>/proxies.json  per proxy: the best feature/neuron and its precision, recall, correlation
  families/<a>__<b>.npz  feature splitting between two SAEs of the run (when it has several)
Autointerp results live beside it (RUN/autointerp, analysis/explanations.py); `feature(i)` adds them
as rec["autointerp"] (explanation, scores, label, model) when the run has them.

Units: "neurons" (the MLP's d_mlp post-ReLU neurons) and one per SAE ("sae0", ...). Arrays are
read memory-mapped, so `db.feature(i)` touches only feature i's rows; nothing loads a whole unit.

Examples: each feature has EXAMPLE_SLOTS = top (20) + intervals (10 × 5) + bottom (20) slots in a
fixed layout (ex_group names each slot's group); empty slots have ex_seq = −1. An example is the
token at (ex_seq, ex_pos) of tokens.npy with the feature's activations on the window
[ex_pos − LEFT, ex_pos + RIGHT] (NaN outside the sequence).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from monojax import errors, files
from monojax.analysis import explanations as explanations_lib, stats

SCHEMA = "monojax-analysis/1"
DIRNAME = "analysis"
N_TOP, N_INTERVALS, PER_INTERVAL, N_BOTTOM = 20, 10, 5, 20
EXAMPLE_SLOTS = N_TOP + N_INTERVALS * PER_INTERVAL + N_BOTTOM
# Slot groups: 0 = top, 1..10 = interval i (interval 1 the highest tenth of [0, max]), 11 = bottom.
EX_GROUP = np.array([0] * N_TOP + [1 + i // PER_INTERVAL for i in range(N_INTERVALS * PER_INTERVAL)]
                    + [N_INTERVALS + 1] * N_BOTTOM, np.int8)
GROUP_NAMES = ["top"] + [f"interval {i}" for i in range(1, N_INTERVALS + 1)] + ["bottom"]
# Example slots with ablation effects (analysis/ablation.py): the top 10 and the first of each interval.
ABL_SLOTS = np.array(list(range(10)) + [N_TOP + PER_INTERVAL * i for i in range(N_INTERVALS)])
ULTRALOW = 1e-6        # density below which a live feature is "ultralow" (the paper's left mode)
DENSE = 0.01           # density above which a feature is "dense" (the paper counts features > 1 %)


def database_dir(workdir: str) -> str:
  return os.path.join(workdir, DIRNAME)


def check_writable(final: str) -> None:
  """A database folder may replace only an earlier database (or an empty folder): anything else
  there is somebody's files, left untouched."""
  why = files.replace_refusal(final, "meta.json", "monojax-analysis/")
  if why == "foreign":
    raise errors.UserInputError(f"{final}: exists and is not a feature database; choose another --out (nothing there is replaced)")
  if why:
    raise errors.UserInputError(f"{final}: exists and is not a folder; choose another --out")


def write(final: str, meta: dict, tokens: np.ndarray, units: dict[str, dict], extra: dict[str, dict] | None = None,
          log=print) -> str:
  """Writes the whole database atomically: into a temporary folder, renamed over RUN/analysis (an
  older database is replaced only once the new one is complete). units: name → {array name: array,
  "proxies.json": dict}; extra: relative path → {name: array} saved as .npz."""
  check_writable(final)
  tmp = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np.save(os.path.join(tmp, "tokens.npy"), np.asarray(tokens, np.int32))
  for unit, arrays in units.items():
    d = os.path.join(tmp, unit)
    os.makedirs(d)
    for name, a in arrays.items():
      if name.endswith(".json"):
        files.atomic_write_json(os.path.join(d, name), a, indent=1)
      else:
        np.save(os.path.join(d, f"{name}.npy"), np.asarray(a))
  for rel, arrays in (extra or {}).items():
    path = os.path.join(tmp, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)
  files.atomic_write_json(os.path.join(tmp, "meta.json"), dict(meta, schema=SCHEMA), indent=1)
  files.replace_dir(tmp, final)
  log(f"analyze: wrote the feature database {final}")
  return final


class Unit:
  """One unit's arrays, memory-mapped; `feature(i)` is one feature's record."""

  def __init__(self, db: "FeatureDatabase", name: str):
    self.db, self.name, self.path = db, name, os.path.join(db.path, name)
    if not os.path.isdir(self.path):
      raise errors.UserInputError(f"{db.path}: no unit {name!r}; it has {', '.join(db.unit_names)}")
    self._arrays: dict[str, np.ndarray] = {}
    self.info = next(u for u in db.meta["units"] if u["name"] == name)

  @property
  def width(self) -> int:
    return int(self.info["width"])

  def array(self, name: str) -> np.ndarray:
    if name not in self._arrays:
      path = os.path.join(self.path, f"{name}.npy")
      if not os.path.exists(path):
        raise errors.RunFormatError(f"{path}: missing from the feature database (re-run monojax.analyze)")
      self._arrays[name] = np.load(path, mmap_mode="r")
    return self._arrays[name]

  def proxies(self) -> dict:
    with open(os.path.join(self.path, "proxies.json")) as f:
      return json.load(f)

  def feature(self, i: int, *, context: int | None = None) -> dict:
    """Feature i's record: statistics, logit effects, neurons and examples (with token ids)."""
    i = int(i)
    if not 0 <= i < self.width:
      raise errors.UserInputError(f"{self.name}: feature {i} out of range (0..{self.width - 1})")
    a = lambda n: np.asarray(self.array(n)[i])
    rec = {"unit": self.name, "index": i, "n_tokens": self.db.n_tokens}
    for n in ("fired", "density", "max", "mean", "hist"):
      rec[n] = a(n)
    rec["dead"] = bool(rec["fired"] == 0)
    rec["ultralow"] = bool(0 < rec["density"] < ULTRALOW)
    rec["dense"] = bool(rec["density"] > DENSE)
    rec["hist_edges"] = stats.hist_edges()
    for n in ("logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values", "logit_hist",
              "logit_hist_edges", "logit_median"):
      rec[n] = a(n)
    for n in ("top_neurons", "top_neuron_weights", "corr_neuron", "corr_neuron_value", "proxy_precision",
              "proxy_recall", "proxy_corr"):
      if os.path.exists(os.path.join(self.path, f"{n}.npy")):
        rec[n] = a(n)
    rec["examples"] = self.examples(i)
    if os.path.exists(os.path.join(self.path, "abl_off.npy")):
      rec["ablation"] = self.ablation(i)
    ai = self.autointerp()
    if ai is not None and i in ai["features"]:
      rec["autointerp"] = explanations_lib.feature_summary(ai["features"][i])
    return rec

  def ablation(self, i: int) -> dict[int, list[dict]]:
    """Feature i's ablation effects (analysis/ablation.py), by example slot: [{"offset" (in the
    example's window), "dloss" (next-token loss, ablated − clean), "up"/"down": [(token, Δ log p)]}]."""
    off = np.asarray(self.array("abl_off")[i])
    dl = np.asarray(self.array("abl_dloss")[i])
    up, upv = np.asarray(self.array("abl_up")[i]), np.asarray(self.array("abl_up_val")[i])
    dn, dnv = np.asarray(self.array("abl_down")[i]), np.asarray(self.array("abl_down_val")[i])
    out: dict[int, list[dict]] = {}
    for s, slot in enumerate(ABL_SLOTS):
      for k in np.nonzero(off[s] >= 0)[0]:
        out.setdefault(int(slot), []).append({
            "offset": int(off[s, k]), "dloss": float(dl[s, k]),
            "up": [(int(t), float(v)) for t, v in zip(up[s, k], upv[s, k])],
            "down": [(int(t), float(v)) for t, v in zip(dn[s, k], dnv[s, k])]})
    return out

  def autointerp(self) -> dict | None:
    """The unit's autointerp results (RUN/autointerp, the preferred label; analysis/explanations.py),
    read once; None when there are none or the database is not inside a run."""
    if not hasattr(self, "_autointerp"):
      wd = self.db.workdir
      self._autointerp = explanations_lib.load(wd, self.name) if wd else None
    return self._autointerp

  def examples(self, i: int) -> list[dict]:
    seq, pos, val = (np.asarray(self.array(n)[i]) for n in ("ex_seq", "ex_pos", "ex_val"))
    win, rep = np.asarray(self.array("ex_win")[i]), np.asarray(self.array("ex_repeated")[i])
    toks = self.db.tokens
    out = []
    for slot in np.nonzero(seq >= 0)[0]:
      s, p = int(seq[slot]), int(pos[slot])
      lo = p - stats.LEFT
      ids = np.full(stats.WINDOW, -1, np.int64)
      src = toks[s, max(0, lo):min(toks.shape[1], p + stats.RIGHT + 1)]
      ids[max(0, -lo):max(0, -lo) + len(src)] = src
      out.append({"group": GROUP_NAMES[EX_GROUP[slot]], "slot": int(slot), "seq": s, "pos": p,
                  "value": float(val[slot]), "tokens": ids, "acts": win[slot], "center": stats.LEFT,
                  "repeated": bool(rep[slot])})
    return out


class FeatureDatabase:
  """A run's feature database (read-only). `db.unit("sae0").feature(17)`."""

  def __init__(self, path: str):
    self.path = path
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
      raise errors.MissingInputError(f"{path}: no feature database (run: python -m monojax.analyze --workdir=RUN)")
    with open(meta_path) as f:
      self.meta = json.load(f)
    if self.meta.get("schema") != SCHEMA:
      raise errors.RunFormatError(f"{meta_path}: schema {self.meta.get('schema')!r}, this monojax reads {SCHEMA!r}")
    self._units: dict[str, Unit] = {}
    self._tokens = None

  @property
  def workdir(self) -> str | None:
    """The run this database belongs to (RUN of RUN/analysis), or None for a database elsewhere."""
    return os.path.dirname(self.path) if os.path.basename(self.path.rstrip(os.sep)) == DIRNAME else None

  @property
  def n_tokens(self) -> int:
    return int(self.meta["n_tokens"])

  @property
  def unit_names(self) -> list[str]:
    return [u["name"] for u in self.meta["units"]]

  @property
  def tokens(self) -> np.ndarray:
    if self._tokens is None:
      self._tokens = np.load(os.path.join(self.path, "tokens.npy"), mmap_mode="r")
    return self._tokens

  def unit(self, name: str = "sae0") -> Unit:
    if name not in self._units:
      self._units[name] = Unit(self, name)
    return self._units[name]

  def feature(self, i: int, unit: str = "sae0") -> dict:
    return self.unit(unit).feature(i)

  def families(self, a: str, b: str) -> dict:
    path = os.path.join(self.path, "families", f"{a}__{b}.npz")
    if not os.path.exists(path):
      raise errors.UserInputError(f"{self.path}: no feature-splitting links between {a} and {b}")
    with np.load(path) as z:
      return {k: z[k] for k in z.files}


def open_database(workdir_or_path: str) -> FeatureDatabase:
  """The database of a run's workdir (RUN/analysis) or a database folder itself."""
  p = os.path.abspath(os.path.expanduser(str(workdir_or_path)))
  if os.path.exists(os.path.join(p, "meta.json")) and os.path.exists(os.path.join(p, "tokens.npy")):
    return FeatureDatabase(p)
  return FeatureDatabase(database_dir(p))
