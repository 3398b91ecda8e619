"""From the pass's totals and order statistics to the database's per-unit arrays (float64 host
maths): density and flags, examples (top, the paper's subsample intervals, bottom; repeats
flagged), logit effects, decoder neurons, the most correlated neuron, proxy precision / recall /
correlation, and feature-splitting links between SAEs of the run."""
from __future__ import annotations

import numpy as np
from flax import nnx

from monojax.analysis import ablation, database, logit_effects, similarity, stats
from monojax.sae import core as sae_core

LOGIT_K = 10


def interval_examples(smp_key, smp_val, smp_seq, smp_pos, smp_win, max_act):
  """The paper's subsample intervals from the stratified samples: interval i (1..10) holds firings
  with activation in ((10−i)/10·max, (11−i)/10·max]; per interval the (up to) PER_INTERVAL samples
  of highest priority. Returns (val, seq, pos, win) [F, 10·PER_INTERVAL(, W)], seq −1 where empty."""
  F = smp_key.shape[0]
  key = smp_key.reshape(F, -1)
  val, seq, pos = (a.reshape(F, -1) for a in (smp_val, smp_seq, smp_pos))
  win = smp_win.reshape(F, key.shape[1], -1)
  m = np.maximum(np.asarray(max_act, np.float64), 1e-30)[:, None]
  tenth = np.clip(np.ceil(10.0 * val / m), 1, 10).astype(np.int64)
  interval = np.where(key >= 0, 11 - tenth, 99)                 # 99: empty sample slot
  order = np.lexsort((-key, interval), axis=-1)                 # by interval, then priority (high first)
  iv = np.take_along_axis(interval, order, 1)
  rank = np.zeros_like(iv)
  for j in range(1, iv.shape[1]):                               # rank within each interval run
    rank[:, j] = np.where(iv[:, j] == iv[:, j - 1], rank[:, j - 1] + 1, 0)
  P = database.PER_INTERVAL
  out_val = np.zeros((F, database.N_INTERVALS * P), np.float32)
  out_seq = np.full((F, database.N_INTERVALS * P), -1, np.int32)
  out_pos = np.zeros((F, database.N_INTERVALS * P), np.int32)
  out_win = np.full((F, database.N_INTERVALS * P, win.shape[-1]), np.nan, np.float32)
  ok = (iv <= database.N_INTERVALS) & (rank < P)
  rows, cols = np.nonzero(ok)
  src = order[rows, cols]
  slot = (iv[rows, cols] - 1) * P + rank[rows, cols]
  out_val[rows, slot] = val[rows, src]
  out_seq[rows, slot] = seq[rows, src]
  out_pos[rows, slot] = pos[rows, src]
  out_win[rows, slot] = win[rows, src]
  return out_val, out_seq, out_pos, out_win


def window_tokens(tokens, seq, pos):
  """Token ids [.., WINDOW] around (seq, pos) in tokens [S, T]; −1 outside the sequence or for an
  empty slot (seq −1)."""
  S, T = tokens.shape
  t = pos[..., None] + np.arange(-stats.LEFT, stats.RIGHT + 1)
  ok = (seq[..., None] >= 0) & (t >= 0) & (t < T)
  return np.where(ok, tokens[np.clip(seq, 0, S - 1)[..., None], np.clip(t, 0, T - 1)], -1)


def repeated_flags(tokens, seq, pos):
  """[F, slots] True where an earlier slot of the same feature shows the same token window (text
  that occurs more than once in the analysis set: boilerplate, licences)."""
  ids = window_tokens(tokens, seq, pos).astype(np.uint64)
  weights = np.random.default_rng(0).integers(1, 2**62, size=ids.shape[-1], dtype=np.uint64) | np.uint64(1)
  with np.errstate(over="ignore"):
    h = (ids * weights).sum(-1)
  other = (seq[:, :, None] != seq[:, None, :]) | (pos[:, :, None] != pos[:, None, :])  # not the same token again
  same = (h[:, :, None] == h[:, None, :]) & other & (seq[:, :, None] >= 0) & (seq[:, None, :] >= 0)
  earlier = np.tril(np.ones(seq.shape[1:] * 2, bool), -1)
  return (same & earlier).any(-1)


def examples(acc: dict, tokens) -> dict:
  """The fixed slot layout of database.EXAMPLE_SLOTS from a unit's order statistics."""
  top_ok = np.isfinite(acc["top_val"])
  bot_ok = np.isfinite(acc["bot_val"])
  iv, iseq, ipos, iwin = interval_examples(acc["smp_key"], acc["smp_val"], acc["smp_seq"], acc["smp_pos"],
                                           acc["smp_win"], acc["max"])
  val = np.concatenate([np.where(top_ok, acc["top_val"], 0), iv, np.where(bot_ok, -acc["bot_val"], 0)], 1)
  seq = np.concatenate([np.where(top_ok, acc["top_seq"], -1), iseq, np.where(bot_ok, acc["bot_seq"], -1)], 1)
  pos = np.concatenate([acc["top_pos"], ipos, acc["bot_pos"]], 1)
  win = np.concatenate([acc["top_win"], iwin, acc["bot_win"]], 1).astype(np.float32)
  win[seq < 0] = np.nan
  return {"ex_val": val.astype(np.float32), "ex_seq": seq.astype(np.int32), "ex_pos": np.where(seq >= 0, pos, 0).astype(np.int32),
          "ex_win": win, "ex_repeated": repeated_flags(tokens, seq, pos), "ex_group": database.EX_GROUP}


def unit_arrays(name: str, n: int, totals: dict, acc: dict, tokens) -> dict:
  """Density, flags' inputs, histogram and examples of one unit."""
  fired = np.rint(totals[f"{name}/fired"]).astype(np.int64)
  out = {"fired": fired, "density": fired / n, "max": acc["max"].astype(np.float32),
         "mean": (totals[f"{name}/sum"] / n).astype(np.float32),
         "hist": np.rint(totals[f"{name}/hist"]).astype(np.int64)}
  out.update(examples(acc, tokens))
  return out


def _logits(out: dict, dirs_resid, w: dict, vocab: int) -> None:
  s = logit_effects.logit_effect_summary(dirs_resid, w["ln_gamma"], w["W_U"], vocab, k=LOGIT_K)
  out.update(logit_top_ids=s["top_ids"], logit_top_values=s["top_values"], logit_bottom_ids=s["bottom_ids"],
             logit_bottom_values=s["bottom_values"], logit_hist=s["hist_counts"], logit_hist_edges=s["hist_edges"],
             logit_median=s["median"])


def _proxy_tables(name, n, totals, label_sum, label_sq, names) -> tuple[dict, dict]:
  s, s2 = totals[f"{name}/sum"], totals[f"{name}/sum_sq"]
  psum, pfired = totals[f"{name}/proxy_sum"], totals[f"{name}/proxy_fired"]
  with np.errstate(invalid="ignore", divide="ignore"):
    precision = np.where(s[None] > 0, psum / s[None], np.nan)
    recall = np.where(label_sum[:, None] > 0, pfired / label_sum[:, None], np.nan)
  corr = similarity.pearson_from_sums(n, label_sum, label_sq, s, s2, psum)
  from monojax.analysis import proxies as proxies_lib  # noqa: PLC0415
  table = {}
  for p, pname in enumerate(names):
    row = corr[p]
    best = int(np.nanargmax(row)) if np.isfinite(row).any() else -1
    table[pname] = {"description": proxies_lib.describe(pname), "tokens": float(label_sum[p]),
                    "share": float(label_sum[p] / n), "best": best,
                    "corr": float(row[best]) if best >= 0 else None,
                    "precision": float(precision[p, best]) if best >= 0 else None,
                    "recall": float(recall[p, best]) if best >= 0 else None}
  # Stored [feature, proxy]: the database's first axis is always the feature.
  return ({"proxy_precision": precision.T.astype(np.float32), "proxy_recall": recall.T.astype(np.float32),
           "proxy_corr": corr.T.astype(np.float32)}, table)


def write_database(run, ps, meta, tokens, totals, accs, label_sum, label_sq, *, proxies_on: bool, out: str, log) -> str:
  db_path = out
  from monojax.analysis import proxies as proxies_lib  # noqa: PLC0415
  n = int(meta["n_tokens"])
  model = nnx.merge(run.graphdef, run.params)
  w = logit_effects.lm_weights(model, ps.layer)
  vocab = run.tokenizer.vocab_size
  names = list(proxies_lib.PROXIES) if proxies_on else []
  units, infos = {}, []
  x_sum, x_sq = totals["neurons/sum"], totals["neurons/sum_sq"]
  decoders = {}
  for name, spec in ps.specs.items():
    log(f"analyze: {name}: examples, logit effects, neurons, proxies")
    out = unit_arrays(name, n, totals, accs[name], tokens)
    if name == "neurons":
      dirs = logit_effects.neuron_directions(w["W_out"])
      info = {"name": name, "kind": "neurons", "width": spec.width, "layer": ps.layer}
    else:
      sae = run.sae(name)
      dec = np.asarray(sae_core.decoder_directions(run.sae_state, sae), np.float32)
      decoders[name] = dec
      dirs = logit_effects.resid_directions(dec, w["W_out"])
      top = np.argsort(-np.abs(dec), axis=1, kind="stable")[:, :3]
      out["top_neurons"] = top.astype(np.int32)
      out["top_neuron_weights"] = np.take_along_axis(dec, top, 1)
      corr = similarity.pearson_from_sums(n, totals[f"{name}/sum"], totals[f"{name}/sum_sq"], x_sum, x_sq,
                                          totals[f"{name}/neuron_sum"])
      ids, vals = similarity.best_match(corr)
      out["corr_neuron"], out["corr_neuron_value"] = ids.astype(np.int32), vals.astype(np.float32)
      abl = ablation.compute(run, sae, tokens, out["ex_seq"], out["ex_pos"], out["ex_win"], log=log)
      out.update(abl or {})
      info = {"name": name, "kind": "sae", "width": spec.width, "layer": sae.layer, "record": sae.to_json(),
              "label": sae.label, "input_scale": run.input_scale(sae)}
    _logits(out, dirs, w, vocab)
    if names:
      arrays, table = _proxy_tables(name, n, totals, np.asarray(label_sum), np.asarray(label_sq), names)
      out.update(arrays)
      out["proxies.json"] = table
    fired = out["fired"]
    info.update(dead=int((fired == 0).sum()), ultralow=int(((fired > 0) & (fired / n < database.ULTRALOW)).sum()),
                dense=int((fired / n > database.DENSE).sum()))
    units[name], infos = out, infos + [info]
  extra = {}
  sums = {}
  for a, b in ps.pairs:
    sums[(a, b)] = {"n": n, "sum_a": totals[f"{a}/sum"], "sum_a2": totals[f"{a}/sum_sq"], "sum_b": totals[f"{b}/sum"],
                    "sum_b2": totals[f"{b}/sum_sq"], "sum_ab": totals[f"pair/{a}__{b}"]}
  if len(decoders) > 1:
    fam = similarity.families(decoders, corr_sums=sums)
    for (a, b), table in fam.items():
      extra[f"families/{a}__{b}.npz"] = table
  meta = dict(meta, units=infos, proxies=[{"name": p, "description": proxies_lib.describe(p),
                                           "share": float(label_sum[i] / n)} for i, p in enumerate(names)],
              families=[f"{a}__{b}" for a, b in (k for k in ((x, y) for x in decoders for y in decoders) if k[0] != k[1])])
  return database.write(db_path, meta, tokens, units, extra, log=log)
