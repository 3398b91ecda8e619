"""RUN/report.md and its plots (RUN/report/*.png): what a run learned, every number read from the
run's own files — metrics.jsonl (loss curve, the SAEs' last held-out eval) and the feature database
RUN/analysis (densities, dead and ultralow counts, proxies, feature splitting) — plus
RUN/universality/ when a comparison with a second run was made. Corpus text (token strings) is shown
only through text.markdown_code, so no link, HTML or emphasis can come from it."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from monojax import errors, files, text
from monojax.analysis import database, explanations as explanations_lib
from monojax.sae import metrics as sae_metrics

REPORT = "report.md"
PLOTS = "report"
SPLIT_COS = 0.5   # feature splitting: a larger SAE's feature with decoder cosine ≥ this is a "child"
MATCH_COS = 0.7   # ... and a feature whose nearest one has cosine ≥ this is "matched"
SPLITS_SHOWN = 5  # example families listed per pair
_EVAL_L0 = re.compile(r"^(sae\d+)_eval/l0$")


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl's rows (a torn last line, as after a kill, is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          continue
  return rows


def last_evals(rows: list[dict]) -> dict[str, dict]:
  """Per SAE name: {"step", "l0", "loss_recovered", "fvu"} of its last held-out eval in metrics.jsonl."""
  out = {}
  for r in rows:
    for k in r:
      m = _EVAL_L0.match(k)
      if m:
        name = m.group(1)
        out[name] = {"step": r["step"], "l0": r[k], "loss_recovered": r.get(f"{name}_eval/loss_recovered", math.nan),
                     "fvu": r.get(f"{name}_eval/fvu", math.nan)}
  return dict(sorted(out.items(), key=lambda kv: int(kv[0][3:])))


def _figure(w=6.4, h=3.6):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(w, h), dpi=120)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  with files.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp)


def _loss_plot(rows, path) -> bool:
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r and _finite(r["loss"])]
  ev = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r and _finite(r["eval/loss"])]
  if not train and not ev:
    return False
  fig, ax = _figure()
  if train:
    ax.plot(*zip(*train), color="#4c72b0", linewidth=1, label="train")
  if ev:
    ax.plot(*zip(*ev), "o-", color="#dd8452", markersize=3, linewidth=1, label="held-out eval")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.legend(fontsize=8, frameon=False)
  _save(fig, path)
  return True


def _l0_plot(evals, path) -> bool:
  pts = [(n, e["l0"], e["loss_recovered"]) for n, e in evals.items()
         if _finite(e["l0"]) and _finite(e["loss_recovered"])]
  if not pts:
    return False
  fig, ax = _figure(5.2, 3.6)
  ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="#4c72b0")
  for n, x, y in pts:
    ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  if min(p[1] for p in pts) > 0:
    ax.set_xscale("log")
  ax.set_xlabel("L0 (features firing per token, last eval)")
  ax.set_ylabel("loss recovered")
  _save(fig, path)
  return True


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def _f(v, fmt=".3f") -> str:
  return "—" if v is None or not _finite(v) else format(v, fmt)


def _load_tokenizer(workdir: str):
  from monojax.data import tokenizer as tokenizer_lib
  path = tokenizer_lib.run_tokenizer_path(workdir)
  if path:
    return tokenizer_lib.TextTokenizer(path)
  from monojax import run as run_lib
  return run_lib.Run.open(workdir).tokenizer  # an older run without its copy: the run loader finds it


def top_token_id(unit, i: int) -> int:
  """The token id where feature i fired most on the analysis set (−1 for a feature that never fired)."""
  seq, pos = int(unit.array("ex_seq")[i, 0]), int(unit.array("ex_pos")[i, 0])
  return int(unit.db.tokens[seq, pos]) if seq >= 0 else -1


def _token_cell(tokenizer, unit, i: int) -> str:
  tid = top_token_id(unit, i)
  return "—" if tid < 0 else text.markdown_code(tokenizer.decode([tid]), table=True)


def _source_lines(meta: dict) -> list[str]:
  src = meta.get("source") or {}
  split = src.get("split", "?")
  where = {"analysis": "the corpus's analysis split (never trained or evaluated on)",
           "val": "the val split (evaluated on during training, never trained on)",
           "train": "the TRAIN split (the model trained on these tokens)"}.get(split, f"the {split} split")
  n = int(meta["n_tokens"])
  line = (f"Analysed **{n:,} tokens** ({meta.get('n_sequences', 0):,} sequences of {meta.get('seq_len', '?')}) "
          f"from {where}")
  if "flag" in src:
    nfiles = len(src.get("files", []))
    line += (f": {src['flag']} = {text.markdown_code(str(src.get('pattern', '')))} under "
             f"{text.markdown_code(str(src.get('root', '')))}, {nfiles} file{'s' * (nfiles != 1)}, "
             f"{src.get('documents', 0):,} documents, {src.get('bytes', 0) / 1e6:.2f} MB; {src.get('order', '')}")
  line += "."
  asked = meta.get("asked_tokens")
  if asked and n < asked:
    line += f" {asked:,} were asked for: the split ran out."
  return [line, ""]


def _density_section(db, out_dir) -> list[str]:
  n = db.n_tokens
  lines = ["## Feature density", "",
           f"Density = the fraction of the {n:,} analysed tokens on which a feature fires (the paper's §5.1 "
           f"histogram of log10 density; dead features, which never fired, are counted apart). Ultralow: live with "
           f"density < {database.ULTRALOW:g}; dense: > {database.DENSE:.0%}. The lowest density {n:,} tokens can "
           f"measure is {1 / n:.1e}" + (f": with fewer than {1 / database.ULTRALOW:,.0f} tokens ultralow features "
                                        "read as dead." if n * database.ULTRALOW < 1 else "."), "",
           "| unit | kind | width | dead | ultralow | dense | live | median live density |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for u in db.meta["units"]:
    dens = np.asarray(db.unit(u["name"]).array("density"), np.float64)
    live = dens[dens > 0]
    med = f"{np.median(live):.2e}" if live.size else "—"
    lines.append(f"| {u['name']} | {u['kind']} | {u['width']:,} | {u['dead']:,} | {u['ultralow']:,} | {u['dense']:,} | "
                 f"{int(live.size):,} | {med} |")
  lines.append("")
  for u in db.meta["units"]:
    if u["kind"] != "sae":
      continue
    unit = db.unit(u["name"])
    base = os.path.join(out_dir, f"{u['name']}_density")
    sae_metrics.density_histogram(np.asarray(unit.array("fired")), n, base + ".png", base + ".json",
                                  ultralow=database.ULTRALOW, dense=database.DENSE,
                                  title=f"{u['name']} [{u.get('label', '')}], {n:,} analysed tokens; "
                                        f"dead (not shown): {u['dead']}")
    lines += [f"![{u['name']} density]({PLOTS}/{u['name']}_density.png)", ""]
  return lines


def _proxy_plot(db, present, path) -> bool:
  """Per present proxy, grouped bars: the best feature's (each SAE) and the best neuron's correlation
  with the proxy, precision as a marker on each bar."""
  import numpy as np
  units = [u["name"] for u in db.meta["units"]]
  fig, ax = _figure(max(5.0, 0.9 * len(present) + 2), 3.6)
  width = 0.8 / max(1, len(units))
  x = np.arange(len(present))
  for k, name in enumerate(units):
    table = db.unit(name).proxies()
    corr = [table.get(p["name"], {}).get("corr") or 0.0 for p in present]
    prec = [table.get(p["name"], {}).get("precision") or 0.0 for p in present]
    ax.bar(x + (k - (len(units) - 1) / 2) * width, corr, width, label=f"{name}: corr")
    ax.plot(x + (k - (len(units) - 1) / 2) * width, prec, "k_", markersize=8)
  ax.plot([], [], "k_", label="precision")
  ax.set_xticks(x, [p["name"] for p in present], rotation=30, fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("best unit vs proxy")
  ax.legend(fontsize=7, frameon=False)
  _save(fig, path)
  return True


def _proxy_section(db, tokenizer, out_dir=None) -> list[str]:
  proxies = db.meta.get("proxies") or []
  if not proxies:
    return []
  present = [p for p in proxies if p["share"] > 0]
  absent = [p["name"] for p in proxies if p["share"] <= 0]
  lines = ["## Proxies (specificity and sensitivity)", "",
           "Each proxy labels tokens from their text (monojax/analysis/proxies.py). Per unit, the feature (or neuron) "
           "whose activation correlates best with the proxy: corr = Pearson correlation over all analysed tokens, "
           "precision = its activation mass on proxy tokens, recall = the share of proxy tokens it fires on; "
           "\"fires most on\" = the token of its highest activation.", ""]
  if absent:
    lines += ["Not present in the analysed tokens: " + ", ".join(absent) + ".", ""]
  if not present:
    return lines
  if out_dir and _proxy_plot(db, present, os.path.join(out_dir, "proxies.png")):
    lines += [f"![proxies]({os.path.basename(out_dir)}/proxies.png)", ""]
  for u in db.meta["units"]:
    unit = db.unit(u["name"])
    table = unit.proxies()
    lines += [f"**{u['name']}**" + (f" [{u['label']}]" if u.get("label") else ""), "",
              "| proxy | share of tokens | best | corr | precision | recall | fires most on |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for p in present:
      row = table.get(p["name"], {})
      best = row.get("best", -1)
      cell = _token_cell(tokenizer, unit, best) if best is not None and best >= 0 else "—"
      lines.append(f"| {p['name']} | {p['share']:.2%} | {best if best >= 0 else '—'} | {_f(row.get('corr'))} | "
                   f"{_f(row.get('precision'))} | {_f(row.get('recall'))} | {cell} |")
    lines.append("")
  return lines


def _universality_section(workdir) -> list[str]:
  path = os.path.join(workdir, "universality", "summary.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    s = json.load(f)
  lines = ["## Universality", "",
           f"Each feature of {s.get('sae_a', 'the SAE')} (and each neuron) of this run matched to its most "
           f"correlated one of {s.get('sae_b', 'the SAE')} in {text.markdown_code(str(s.get('run_b', '?')))}, "
           f"over {s.get('n_tokens', 0):,} tokens both runs read.", "",
           "| | compared | median max corr | mean max corr | excluded |", "|---|---:|---:|---:|---:|"]
  for key in ("features", "neurons"):
    d = s.get(key)
    if d:
      lines.append(f"| {key} | {d.get('n', 0):,} | {_f(d.get('median_max_corr'))} | {_f(d.get('mean_max_corr'))} | "
                   f"{d.get('excluded', 0):,} |")
  lines.append("")
  if os.path.exists(os.path.join(workdir, "universality", "hist.png")):
    lines += ["![max correlation histogram](universality/hist.png)", ""]
  return lines


def splitting_summary(table: dict) -> dict:
  """From one families table (rows: features of the smaller SAE): how many are matched (nearest
  decoder cosine ≥ MATCH_COS), how many split (≥ 2 of the larger SAE's k nearest at ≥ SPLIT_COS),
  the median nearest cosine and (when stored) the median best activation correlation."""
  cos = np.asarray(table["cos"], np.float64)
  out = {"n": int(cos.shape[0]), "matched": int((cos[:, 0] >= MATCH_COS).sum()),
         "split": int(((cos >= SPLIT_COS).sum(1) >= 2).sum()), "median_cos": float(np.median(cos[:, 0]))}
  if "corr" in table:
    c = np.asarray(table["corr"], np.float64)[:, 0]
    out["median_corr"] = float(np.median(c[np.isfinite(c)])) if np.isfinite(c).any() else math.nan
  return out


def _splitting_section(db, tokenizer) -> list[str]:
  widths = {u["name"]: u["width"] for u in db.meta["units"]}
  pairs = []
  for key in db.meta.get("families") or []:
    a, b = key.split("__")
    if (widths[a], a) < (widths[b], b):  # smaller → larger, each pair once
      pairs.append((a, b))
  if not pairs:
    return []
  lines = ["## Feature splitting", "",
           f"For each pair of SAEs, every feature of the smaller one against the larger one's nearest "
           f"(up to 3) by decoder cosine: matched = nearest cosine ≥ {MATCH_COS}; split = at least two at ≥ "
           f"{SPLIT_COS} (one feature becoming several, §6.8).", "",
           "| smaller → larger | features | matched | split | median nearest cos | median best act. corr |",
           "|---|---:|---:|---:|---:|---:|"]
  examples = []
  for a, b in pairs:
    fam = db.families(a, b)
    s = splitting_summary(fam)
    lines.append(f"| {a} ({widths[a]:,}) → {b} ({widths[b]:,}) | {s['n']:,} | {s['matched']:,} | {s['split']:,} | "
                 f"{s['median_cos']:.3f} | {_f(s.get('median_corr'))} |")
    cos, ids = np.asarray(fam["cos"]), np.asarray(fam["cos_ids"])
    n_child = (cos >= SPLIT_COS).sum(1)
    fired = np.asarray(db.unit(a).array("fired"))
    order = np.lexsort((-cos[:, 0], -n_child))
    for i in [int(i) for i in order if n_child[i] >= 2 and fired[i] > 0][:SPLITS_SHOWN]:
      kids = ", ".join(f"{b} #{int(j)} {_token_cell(tokenizer, db.unit(b), int(j))} (cos {c:.2f})"
                       for j, c in zip(ids[i], cos[i]) if c >= SPLIT_COS)
      examples.append(f"- {a} #{i} {_token_cell(tokenizer, db.unit(a), i)} → {kids}")
  lines.append("")
  if examples:
    lines += ["Families (the token each feature fires most on):", ""] + examples + [""]
  return lines


_SCORER_KEYS = (("simulation", "spearman", "simulation (Spearman)"), ("detection", "balanced_accuracy", "detection"),
                ("fuzzing", "balanced_accuracy", "fuzzing"), ("logits", "accuracy", "logits"))


def _scores(doc: dict, scorer: str, key: str) -> np.ndarray:
  vals = [((r.get("scores") or {}).get(scorer) or {}).get(key) for r in doc["features"].values()]
  return np.asarray([v for v in vals if v is not None], np.float64)


def _autointerp_plot(docs: dict, path: str, title: str) -> bool:
  """Per scorer, the score histograms of every unit (features against neurons) on one axis."""
  present = [(sc, key, name) for sc, key, name in _SCORER_KEYS if any(_scores(d, sc, key).size for d in docs.values())]
  if not present:
    return False
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(3.2 * len(present), 3.2), dpi=120)
  FigureCanvasAgg(fig)
  for k, (sc, key, name) in enumerate(present):
    ax = fig.add_subplot(1, len(present), k + 1)
    lo = -1.0 if sc == "simulation" else 0.0
    bins = np.linspace(lo, 1.0, 21 if sc == "simulation" else 11)
    for unit, doc in docs.items():
      v = _scores(doc, sc, key)
      if v.size:
        ax.hist(v, bins=bins, histtype="step", linewidth=1.6, density=True,
                label=f"{'neurons' if unit == 'neurons' else unit} (n={v.size:,}, median {np.median(v):.2f})")
    if sc != "simulation":
      ax.axvline(0.5, color="0.6", linestyle=":", linewidth=1)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("score", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper left")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  _save(fig, path)
  return True


def _autointerp_section(workdir: str, db, out_dir: str) -> list[str]:
  """Autointerp results (python -m monojax.autointerp): per backend and model, each unit's score
  distributions, features against neurons (the paper's comparison)."""
  labels = explanations_lib.labels(workdir)
  lines = ["## Automated interpretability", ""]
  if not labels:
    return lines + ["Not run yet: `python -m monojax.autointerp --workdir=RUN --neurons` (offline baseline; "
                    "`--backend=anthropic|openai --model=NAME` for a language model).", ""]
  lines += ["Each feature is explained from its examples, then the explanation is scored on examples it was not "
            "made from: **simulation** (the paper's score: Spearman correlation of predicted 0-9 activations with "
            "the true ones over ~60 contexts), **detection** and **fuzzing** (balanced accuracy of telling contexts / "
            "marked tokens where it fires; chance 0.5), **logits** (which tokens it promotes; chance 0.5). Features "
            "with fewer than 20 distinct examples are excluded, as in the paper. Single-token: every top example "
            "peaks on the same token.", ""]
  for label in labels:
    docs = {u: d for u in db.unit_names if (d := explanations_lib.load(workdir, u, label)) is not None}
    if not docs:
      continue
    first = next(iter(docs.values()))
    if first.get("baseline"):
      lines += [f"### {label}: the offline baseline", "",
                "No language model: explanations are the examples' dominant tokens, script and preceding token, and "
                "the simulator predicts from that sentence alone. It is the floor any model's score must beat.", ""]
    else:
      spent = [explanations_lib.total_cost(d) for d in docs.values()]
      cost = "cost unknown" if None in spent else f"${max(spent):.2f}"   # a job's usage covers all its units
      lines += [f"### {text.visible(label)}", "",
                f"Backend {text.markdown_code(str(first.get('backend')))}, model "
                f"{text.markdown_code(str(first.get('model')))}, prompts "
                f"{text.markdown_code(str(first.get('prompt_version')))}; spent: {cost}.", ""]
    lines += ["| unit | explained | excluded | single-token | simulation median (mean) | detection | fuzzing | logits |"
              " parse failures |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for unit, doc in docs.items():
      recs = list(doc["features"].values())
      cells = []
      for sc, key, _ in _SCORER_KEYS:
        v = _scores(doc, sc, key)
        cells.append(f"{np.median(v):.3f} ({np.mean(v):.3f})" if sc == "simulation" and v.size
                     else f"{np.median(v):.3f}" if v.size else "—")
      scored = [r for r in recs if not r.get("excluded")]
      single = sum(1 for r in scored if r.get("single_token"))
      parse = sum(1 for r in recs for e in (r.get("errors") or {}).values() if str(e).startswith("parse"))
      lines.append(f"| {unit} | {sum(1 for r in recs if r.get('explanation')):,} | "
                   f"{sum(1 for r in recs if r.get('excluded')):,} | "
                   f"{single:,} ({single / max(1, len(scored)):.0%}) | " + " | ".join(cells) + f" | {parse:,} |")
    lines.append("")
    slug = re.sub(r"[^a-z0-9_]+", "_", label.lower())
    name = f"autointerp_{slug}.png"
    if _autointerp_plot(docs, os.path.join(out_dir, name), f"{label}: features vs neurons"):
      lines += [f"![autointerp scores, {label}]({PLOTS}/{name})", ""]
  return lines


def write_report(workdir: str, log=print, *, tokenizer=None, db_path: str | None = None) -> str:
  """Writes RUN/report.md and RUN/report/*.png from metrics.jsonl, the feature database (db_path,
  default RUN/analysis) and (if present) RUN/universality; returns report.md's path. tokenizer:
  the run's (default: its copy in the workdir)."""
  workdir = os.path.abspath(os.path.expanduser(str(workdir)))
  try:
    db = database.open_database(db_path or workdir)
  except errors.MissingInputError:  # e.g. --compare on a run not analysed yet: training and universality only
    db = None
  tokenizer = tokenizer or (_load_tokenizer(workdir) if db else None)
  out_dir = os.path.join(workdir, PLOTS)
  os.makedirs(out_dir, exist_ok=True)
  meta = db.meta if db else {"units": []}
  rows = read_metrics(workdir)
  lines = [text.visible(f"# Run report: {os.path.basename(workdir)}"), ""]
  if db:
    lines += [f"Checkpoint step {meta.get('step')}. Written by the analysis pass (`python -m monojax.analyze`, or "
              "the end of a co-training run with analysis.tokens > 0); every number below is read from this run's "
              f"metrics.jsonl and its feature database ({text.markdown_code(os.path.relpath(db.path, workdir))}).", ""]
    lines += _source_lines(meta)
  else:
    lines += ["No feature database yet (`python -m monojax.analyze --workdir=RUN` writes it): training and "
              "universality only, read from metrics.jsonl and universality/.", ""]

  lines += ["## Training", ""]
  train = [r for r in rows if "loss" in r and _finite(r["loss"])]
  ev = [r for r in rows if "eval/loss" in r and _finite(r["eval/loss"])]
  if _loss_plot(rows, os.path.join(out_dir, "loss.png")):
    parts = []
    if train:
      parts.append(f"last train loss {train[-1]['loss']:.4f} (step {train[-1]['step']})")
    if ev:
      parts.append(f"last held-out eval loss {ev[-1]['eval/loss']:.4f} (step {ev[-1]['step']})")
    summary = "; ".join(parts)
    lines += [summary[0].upper() + summary[1:] + " (nats/token).", "", f"![loss]({PLOTS}/loss.png)", ""]
  else:
    lines += ["No loss in metrics.jsonl.", ""]

  evals = last_evals(rows)
  labels = {u["name"]: u.get("label", "") for u in meta["units"]}
  if evals:
    lines += ["## SAEs: sparsity against reconstruction", "",
              "Last held-out eval of every SAE of the run (metrics.jsonl): L0 = features firing per token, loss "
              "recovered = (L_zero − L_SAE) / (L_zero − L_clean), FVU = unexplained variance fraction.", "",
              "| SAE | label | eval step | L0 | loss recovered | FVU |", "|---|---|---:|---:|---:|---:|"]
    for n, e in evals.items():
      lines.append(f"| {n} | {text.visible(labels.get(n, ''))} | {e['step']} | {_f(e['l0'], '.2f')} | "
                   f"{_f(e['loss_recovered'], '.4f')} | {_f(e['fvu'], '.4f')} |")
    lines.append("")
    if _l0_plot(evals, os.path.join(out_dir, "l0_loss_recovered.png")):
      lines += [f"![L0 vs loss recovered]({PLOTS}/l0_loss_recovered.png)", ""]

  if db:
    lines += _density_section(db, out_dir) + _proxy_section(db, tokenizer, out_dir) + _splitting_section(db, tokenizer)
  lines += _universality_section(workdir)
  if db:
    lines += _autointerp_section(workdir, db, out_dir)
  out = "\n".join(lines).rstrip("\n") + "\n"
  path = os.path.join(workdir, REPORT)
  files.atomic_write(path, out)
  log(f"analyze: wrote the report {path} (plots in {out_dir})")
  return path
