"""The first look (monojax/analysis/first_look.py) on synthetic feature databases: it never picks a
dead, ultralow, rarely firing or near-zero feature, even when those look perfectly specific; its
picks span the density range and prefer specific features; and preview.md from hostile token text
is inert (every context and token one code span)."""
import html.parser
import json
import pathlib
import types

import numpy as np
import pytest

from monojax.analysis import database, first_look, stats

HOSTILE = json.loads((pathlib.Path(__file__).parent.parent / "fixtures" / "hostile.json").read_text(encoding="utf-8"))
S, T = 64, 48  # tokens.npy: sequences x positions
P = 2           # proxies


def _write_db(tmp_path, n_tokens, fired, mx, *, entropy_tokens, proxy_corr, seed=0):
  """A database with one SAE unit "sae0": per feature its firings, max activation, the number of
  distinct tokens at its 20 top examples (entropy_tokens) and its proxy correlations [F, P]."""
  rng = np.random.default_rng(seed)
  F = len(fired)
  tokens = (np.arange(S * T).reshape(S, T) % 97).astype(np.int32)  # the token at flat index k is k % 97
  ex_seq = np.full((F, database.EXAMPLE_SLOTS), -1, np.int32)
  ex_pos = np.zeros((F, database.EXAMPLE_SLOTS), np.int32)
  for i in range(F):
    for j in range(min(int(fired[i]), database.N_TOP)):
      flat = j % entropy_tokens[i] + 97 * int(rng.integers(0, S * T // 97))  # cycle through this many token ids
      ex_seq[i, j], ex_pos[i, j] = divmod(flat, T)
  fired = np.asarray(fired, np.int64)
  W = stats.WINDOW
  win = np.where(ex_seq[..., None] >= 0, np.linspace(0, 1, W, dtype=np.float32), np.nan).astype(np.float32)
  arrays = {"fired": fired, "density": fired / n_tokens, "max": np.asarray(mx, np.float32),
            "mean": np.zeros(F, np.float32), "hist": np.zeros((F, 8), np.int64),
            "ex_seq": ex_seq, "ex_pos": ex_pos, "ex_val": np.where(ex_seq >= 0, 1.0, 0.0).astype(np.float32),
            "ex_win": win, "ex_repeated": np.zeros(ex_seq.shape, bool), "ex_group": database.EX_GROUP,
            "logit_top_ids": np.tile(np.arange(10, dtype=np.int32), (F, 1)), "logit_top_values": np.ones((F, 10), np.float32),
            "logit_bottom_ids": np.tile(np.arange(10, dtype=np.int32), (F, 1)), "logit_bottom_values": -np.ones((F, 10), np.float32),
            "logit_hist": np.zeros((F, 4), np.int64), "logit_hist_edges": np.zeros((F, 5), np.float32),
            "logit_median": np.zeros(F, np.float32), "proxy_corr": np.asarray(proxy_corr, np.float32),
            "proxy_precision": np.zeros((F, P), np.float32), "proxy_recall": np.zeros((F, P), np.float32),
            "proxies.json": {}}
  meta = {"n_tokens": int(n_tokens), "step": 1, "source": {"split": "analysis"},
          "units": [{"name": "sae0", "kind": "sae", "width": F, "label": "test", "dead": int((fired == 0).sum()),
                     "ultralow": 0, "dense": 0}],
          "proxies": [{"name": "url", "description": "", "share": 0.01}, {"name": "hex", "description": "", "share": 0.01}]}
  path = database.database_dir(str(tmp_path))
  database.write(path, meta, tokens, {"sae0": arrays}, log=lambda *a: None)
  return database.open_database(path)


def _case(n_tokens):
  """Bad features made to look perfectly specific (proxy corr 1, one token) and good ones at many
  densities, some specific, some not. Returns (fired, max, entropy_tokens, proxy_corr, bad ids)."""
  fired, mx, ent, pc, bad = [], [], [], [], []

  def add(f, m, e, c, is_bad):
    (bad.append(len(fired)) if is_bad else None)
    fired.append(f), mx.append(m), ent.append(e), pc.append(c)

  ultralow_many = int(0.5e-6 * n_tokens)  # ≥ 20 firings only when n_tokens ≥ 4e7
  add(0, 0.0, 1, [1.0, 1.0], True)                                   # dead
  add(ultralow_many, 5.0, 1, [1.0, 0.9], True)                       # ultralow
  add(max(1, ultralow_many // 2), 5.0, 1, [1.0, 0.9], True)          # ultralow
  add(19, 5.0, 1, [1.0, 0.9], True)                                  # too few firings (ultralow too if n is large)
  add(5, 5.0, 1, [1.0, 0.9], True)
  add(5000, 1e-5, 1, [1.0, 1.0], True)                               # near-zero activations only
  rng = np.random.default_rng(1)
  for logd in np.linspace(-5.5, -1, 24):
    f = max(20, int(10 ** logd * n_tokens))
    add(f, float(rng.uniform(1, 5)), int(rng.integers(1, 20)), [float(rng.uniform(-0.1, 0.9)), np.nan], False)
  return fired, mx, ent, np.array(pc), bad


@pytest.mark.parametrize("n_tokens", [1_000_000, 100_000_000])
def test_never_picks_dead_ultralow_rare_or_near_zero_features(tmp_path, n_tokens):
  fired, mx, ent, pc, bad = _case(n_tokens)
  db = _write_db(tmp_path, n_tokens, fired, mx, entropy_tokens=ent, proxy_corr=pc)
  fired_a = np.asarray(fired)
  picks = first_look.pick_interpretable(db, "sae0", n=6)
  assert len(picks) == 6
  for p in picks:
    i = p["index"]
    assert i not in bad
    assert fired_a[i] >= first_look.MIN_FIRED and fired_a[i] / n_tokens >= database.ULTRALOW and mx[i] > 1e-3
  # rarest to densest, spanning the range: one pick in each third of the live features' log density
  dens = [p["density"] for p in picks]
  assert dens == sorted(dens)
  ok = [i for i in range(len(fired)) if i not in bad]
  logd = np.sort(np.log10(fired_a[ok] / n_tokens))
  lo, hi = logd[len(logd) // 3], logd[2 * len(logd) // 3]
  assert np.log10(dens[0]) <= lo and np.log10(dens[-1]) >= hi
  assert sum(np.log10(d) < lo for d in dens) == 2 and sum(np.log10(d) >= hi for d in dens) == 2


def test_prefers_specific_features_and_says_why(tmp_path):
  n = 1_000_000
  F = 9
  fired = [1000 * (k + 1) for k in range(F)]  # thirds of the density range: {0, 1, 2}, {3, 4, 5}, {6, 7, 8}
  mx = [2.0] * F
  ent = [20, 1, 20, 20, 2, 20, 20, 20, 4]   # 1: one token at all its top examples; 4: two; 8: four
  pc = np.full((F, P), 0.05)
  pc[7, 1] = 0.95                            # 7 tracks the "hex" proxy (beats 8's four tokens)
  db = _write_db(tmp_path, n, fired, mx, entropy_tokens=ent, proxy_corr=pc)
  picks = first_look.pick_interpretable(db, "sae0", n=3)
  got = {p["index"]: p for p in picks}
  assert [p["index"] for p in picks] == [1, 4, 7]
  assert got[7]["proxy"] == "hex" and "proxy hex (corr 0.95)" in got[7]["why"]
  assert got[1]["proxy"] is None and got[1]["distinct"] == 1 and got[1]["entropy"] == pytest.approx(0.0)
  assert got[4]["distinct"] == 2 and got[4]["entropy"] == pytest.approx(1.0)
  assert got[4]["score"] == pytest.approx(1 - 1 / np.log2(20))
  assert "20 examples fire on 1 distinct token (entropy 0.00 bits)" in got[1]["why"]


class _Elements(html.parser.HTMLParser):
  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags, self.code, self._in = [], [], False

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, attrs))
    if tag == "code":
      self._in = True
      self.code.append("")

  handle_startendtag = handle_starttag

  def handle_endtag(self, tag):
    if tag == "code":
      self._in = False

  def handle_data(self, data):
    if self._in:
      self.code[-1] += data


def test_preview_from_hostile_tokens_is_inert(tmp_path):
  markdown_it = pytest.importorskip("markdown_it")
  fired, mx, ent, pc, _ = _case(1_000_000)
  db = _write_db(tmp_path, 1_000_000, fired, mx, entropy_tokens=ent, proxy_corr=pc)
  vocab = [HOSTILE[k] for k in sorted(HOSTILE)]
  tok = types.SimpleNamespace(decode=lambda ids: "".join(vocab[int(i) % len(vocab)] for i in ids))
  logged = []
  run = types.SimpleNamespace(workdir=str(tmp_path), tokenizer=tok)
  md = first_look.write_preview(run, db, logged.append)
  assert (tmp_path / "preview.md").read_text(encoding="utf-8") == md
  assert md.startswith("# Feature preview: sae0") and md.count("\nfeature ") == 6
  rendered = markdown_it.MarkdownIt("commonmark", {"html": True}).render(md)
  for bad in ("<script", "<img", "<svg", "<iframe", "<a ", "javascript:alert(1)\""):
    assert bad not in rendered.lower(), bad
  parsed = _Elements()
  parsed.feed(rendered)
  assert {t for t, _ in parsed.tags} <= {"h1", "p", "ul", "li", "code"}
  assert not [a for _, attrs in parsed.tags for a in attrs]
  contexts = [c for c in parsed.code if "«" in c]
  assert len(contexts) == 6 * first_look.CONTEXTS
  assert any(HOSTILE["script_tag"] in c for c in parsed.code)  # shown as text, as written
  console = "\n".join(logged)
  assert "\x1b" not in console and "\u202e" not in console and "(written to" in console
