"""The inspector in a real browser (headless Chromium via playwright): the panels show the feature
database's numbers, search / orderings / URL state work, the TextInspector's hover and click work,
served mode runs typed text through the model, hostile corpus text stays inert text, and the pages
lay out without overlap at 1280×800 and on a narrow window. Screenshots go to the artifacts folder."""
import json
import os
import re

import numpy as np
import pytest

from monojax.analysis import database
from monojax.inspector import export, live, server
from monojax.run import Run

pytestmark = pytest.mark.slow


class Page:
  """A page with its console errors, page errors and dialogs recorded (any is a failure)."""

  def __init__(self, browser, url, width=1280, height=800):
    self.p = browser.new_page(viewport={"width": width, "height": height})
    self.problems = []
    self.p.on("pageerror", lambda e: self.problems.append(f"pageerror: {e}"))
    self.p.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    self.p.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
    self.p.goto(url)

  def ready(self, what, complete=False):
    attr = "data-complete" if complete else "data-ready"
    self.p.wait_for_selector(f"body[{attr}={json.dumps(what)}]", state="attached", timeout=20000)

  def text(self, sel):
    return self.p.locator(sel).first.text_content()

  def texts(self, sel):
    return self.p.locator(sel).all_text_contents()

  def attrs(self, sel, name):
    return self.p.eval_on_selector_all(sel, f"els => els.map(e => e.getAttribute({json.dumps(name)}))")

  def inert(self):
    """Nothing from the corpus became markup or ran."""
    state = self.p.evaluate("""() => ({
      pwned: window.__pwned === undefined ? null : window.__pwned,
      parentPwned: window.parent.__pwned === undefined ? null : window.parent.__pwned,
      tags: document.querySelectorAll('img, iframe, object, embed, body script, body style, svg[onload], math').length,
      handlers: document.querySelectorAll('[onerror], [onload], [onmouseover], [onclick]').length,
      jsLinks: document.querySelectorAll('a[href^="javascript"]').length,
      bodyHidden: getComputedStyle(document.body).display === 'none'})""")
    assert state == {"pwned": None, "parentPwned": None, "tags": 0, "handlers": 0, "jsLinks": 0, "bodyHidden": False}, state
    assert not self.problems, self.problems

  def close(self):
    self.p.close()


def _data(site_dir, key):
  return export.read_script(os.path.join(site_dir, "data", key + ".js"))[1]


def site_meta(site_dir):
  return _data(site_dir, "site")


def _num(s):
  return float(re.search(r"-?[\d.]+(e-?\d+)?", s.replace(",", "")).group())


@pytest.fixture(scope="module")
def db(inspector_run):
  return database.open_database(inspector_run)


def _url(site_dir, page="index.html", **state):
  h = "&".join(f"{k}={v}" for k, v in state.items())
  return f"file://{site_dir}/{page}" + (f"#{h}" if h else "")


def test_feature_panels_show_the_database(browser, inspector_site, db, artifacts):
  u = db.unit("sae0")
  fired = np.asarray(u.array("fired"))
  j = int(np.argmax(fired))            # the busiest feature: every panel has something
  rec = u.feature(j)
  vocab = _data(inspector_site, "vocab")
  tb = live.token_bytes(Run.open(os.path.dirname(inspector_site)).tokenizer)
  pg = Page(browser, _url(inspector_site, sae="sae0", feature=j))
  pg.ready(f"sae0/{j}", complete=True)
  assert f"sae0/{j}" in pg.text("h1")
  assert pg.text("[data-panel=stats] dd[data-key=fired]") == f"{int(rec['fired']):,} of {db.n_tokens:,}"
  assert _num(pg.text("[data-panel=stats] dd[data-key=max]")) == pytest.approx(float(rec["max"]), rel=5e-3)
  assert _num(pg.text("[data-panel=stats] dd[data-key=density]")) == pytest.approx(100 * float(rec["density"]), rel=5e-3)
  # the logit-effect panel: the top and bottom tokens with their values, the histogram's bars coloured by sign
  assert pg.attrs("[data-panel=logits] .positive li", "data-token") == [str(t) for t in rec["logit_top_ids"]]
  assert pg.attrs("[data-panel=logits] .negative li", "data-token") == [str(t) for t in rec["logit_bottom_ids"]]
  np.testing.assert_allclose([_num(s) for s in pg.texts("[data-panel=logits] .positive .lval")],
                             rec["logit_top_values"], rtol=6e-3, atol=1e-6)
  fills = pg.attrs("[data-panel=logits] rect.bar", "fill")
  assert len(fills) == int((rec["logit_hist"] > 0).sum()) and {"#2b6cb0", "#c53030"} >= set(fills)
  assert len(pg.attrs("[data-panel=acthist] rect.bar", "fill")) == int((rec["hist"] > 0).sum())
  assert pg.texts("[data-panel=neurons] td a") == [f"neuron {n}" for n in rec["top_neurons"]]
  # examples: each group's count and values, the marked token is the one that fired
  for group, sel in (("top", "[data-panel=top]"), ("bottom", "[data-panel=bottom]")):
    want = [e for e in rec["examples"] if e["group"] == group]
    vals = [float(v) for v in pg.attrs(f"{sel} .ex", "data-value")]
    np.testing.assert_allclose(vals, [e["value"] for e in want], rtol=1e-5)
    centres = pg.texts(f"{sel} .ex .tok.center")
    pieces = [tb.pieces(e["tokens"])[e["center"]] for e in want]   # a split character shows whole, once
    assert centres == pieces
    assert all(p == vocab[int(db.tokens[e["seq"], e["pos"]])] for p, e in zip(pieces, want) if "\ufffd" not in p + vocab[int(db.tokens[e["seq"], e["pos"]])] and p)
  intervals = sorted({e["group"] for e in rec["examples"] if e["group"].startswith("interval")})
  assert sorted(pg.attrs("[data-panel=intervals] .ex-group", "data-group")) == intervals
  assert "No automated explanation" in pg.text("[data-panel=autointerp]")
  # ablation effects (analysis/ablation.py): the panel's count, and each top example's ablated positions underlined
  by_key = {}
  for e in rec["examples"]:
    if e["slot"] in rec["ablation"]:
      by_key[(e["seq"], e["pos"])] = rec["ablation"][e["slot"]]
  assert by_key and pg.text("[data-panel=ablation] [data-key=abl_positions]") == f"{sum(map(len, by_key.values())):,}"
  top = [e for e in rec["examples"] if e["group"] == "top"]
  assert pg.p.locator("[data-panel=top] .tok.abl").count() == sum(len(by_key.get((e["seq"], e["pos"]), [])) for e in top)
  first = pg.p.locator("[data-panel=top] .tok.abl").first
  d = min(by_key[(top[0]["seq"], top[0]["pos"])], key=lambda x: x["offset"])   # the first underlined in the row
  assert "next-token loss" in first.get_attribute("title") and vocab[d["up"][0][0]] in first.get_attribute("title")
  assert len(pg.texts("[data-panel=proxies] tr")) == 1 + 3
  pg.p.screenshot(path=os.path.join(artifacts, "feature-1280x800.png"))
  # the family link goes to the nearest feature of the other SAE
  link = pg.p.locator("[data-panel=links] a.flink").first
  target = link.text_content()
  link.click()
  pg.ready(target)
  assert pg.p.locator("#unit").input_value() == "sae1" and target in pg.text("h1")
  pg.inert()
  pg.close()


def test_search_orderings_and_url_state(browser, inspector_site, db):
  u = db.unit("sae0")
  density = np.asarray(u.array("density"))
  pg = Page(browser, _url(inspector_site, sae="sae0"))
  pg.ready("sae0/0")
  rows = lambda: [int(x) for x in pg.attrs("#feature-list li", "data-feature")]  # noqa: E731
  assert rows() == list(range(64))
  info = db.meta["units"][1]
  assert pg.text("#list-count") == f"64 of 64 features · {info['dead']} dead · {info['ultralow']} ultralow"
  pg.p.select_option("#ordering", "density")
  best = int(np.lexsort((np.arange(64), -density))[0])
  pg.ready(f"sae0/{best}")
  assert rows()[:5] == np.lexsort((np.arange(64), -density))[:5].tolist()
  assert "order=density" in pg.p.evaluate("location.hash")
  # random: a seeded shuffle, the same for the same link
  pg.p.select_option("#ordering", "random")
  listed = lambda *state: pg.p.wait_for_selector(f"body[data-list={json.dumps('|'.join(state))}]", state="attached")  # noqa: E731
  listed("sae0", "random", "text", "")
  shuffled = rows()
  assert sorted(shuffled) == list(range(64)) and shuffled != list(range(64))
  pg.p.reload()
  listed("sae0", "random", "text", "")
  assert rows() == shuffled
  # search: an index, a token of a feature's top examples, a bad regex
  pg.p.fill("#search", "#5")
  pg.p.wait_for_function("() => document.querySelector('#feature-list li') && "
                         "document.querySelector('#feature-list li').dataset.feature === '5'")
  # a text search matches index, top tokens, top logit tokens and proxy name, case-insensitively
  vocab, index, names = _data(inspector_site, "vocab"), _data(inspector_site, "sae0/index"), [p["name"] for p in site_meta(inspector_site)["proxies"]]
  hay = ["\n".join([f"#{i}"] + [vocab[t] for t in index["top_tokens"][i] + index["logit_top"][i]]
                   + ([names[index["proxy"][i]]] if index["proxy_corr"][i] is not None else [])).lower() for i in range(64)]
  word = min((vocab[t].strip() for row in index["top_tokens"] for t in row if len(vocab[t].strip()) >= 2),
             key=lambda w: sum(w.lower() in h for h in hay))
  pg.p.fill("#search", word)
  listed("sae0", "random", "text", word)
  assert sorted(rows()) == [i for i in range(64) if word.lower() in hay[i]] and 0 < len(rows()) < 64
  pg.p.select_option("#search-mode", "regex")
  pg.p.fill("#search", "(")
  pg.p.wait_for_selector("#search-error:not([hidden])")
  assert "not a valid regex" in pg.text("#search-error")
  pg.close()
  # URL state opens as it was shared; the paper's #feature-N form too
  pg = Page(browser, _url(inspector_site, sae="sae1", feature=7, order="max", mode="regex"))
  pg.ready("sae1/7")
  assert (pg.p.locator("#unit").input_value(), pg.p.locator("#ordering").input_value(),
          pg.p.locator("#search-mode").input_value()) == ("sae1", "max", "regex")
  pg.p.wait_for_selector('body[data-list="sae1|max|regex|"]', state="attached")
  pg.p.locator("#feature-list li a").nth(2).click()
  second = pg.attrs("#feature-list li", "data-feature")[2]
  pg.ready(f"sae1/{second}")
  pg.p.go_back()
  pg.ready("sae1/7")
  pg.close()
  pg = Page(browser, f"file://{inspector_site}/index.html#feature-3")
  pg.ready("sae0/3")
  pg.inert()
  pg.close()


def test_dead_feature_page(browser, inspector_run, tmp_path):
  """A feature that never fired: its page says so, without panels (the tiny run has none dead, so a
  copy of the run's database marks feature 3 dead)."""
  import shutil
  from monojax.inspector import site as site_lib
  work = tmp_path / "run"
  shutil.copytree(inspector_run, work, ignore=shutil.ignore_patterns("inspector*"))
  for name, value in (("fired", 0), ("density", 0.0)):
    path = work / "analysis" / "sae0" / f"{name}.npy"
    a = np.load(path)
    a[3] = value
    np.save(path, a)
  out = os.path.dirname(site_lib.build(str(work), samples=False, log=lambda *_: None))
  pg = Page(browser, _url(out, sae="sae0", feature=3))
  pg.ready("sae0/3")
  assert "never fired" in pg.text(".dead-note") and pg.p.locator("[data-panel=logits]").count() == 0
  assert "dead" in pg.attrs("#feature-list li[data-feature='3']", "class")[0]
  pg.inert()
  pg.close()


def test_explanation_panel_label_and_order(browser, inspector_run, tmp_path, hostile):
  """Autointerp results in the site: a model's explanation (hostile text, as an LLM could write) is
  the feature's label and panel text, every scorer is listed, the baseline is named as such, and
  "order by autointerp score" sorts by the simulation score."""
  import shutil
  from monojax.analysis import explanations
  from monojax.inspector import site as site_lib
  work = tmp_path / "run"
  shutil.copytree(inspector_run, work, ignore=shutil.ignore_patterns("inspector*"))
  fired = np.asarray(database.open_database(str(work)).unit("sae0").array("fired"))
  a, b = (int(i) for i in np.flatnonzero(fired > 0)[:2])
  evil = hostile[0] + " keywords"
  scores = {"simulation": {"spearman": 0.61, "pearson": 0.58, "tokens": 500, "examples": 58, "unreadable": 0},
            "detection": {"balanced_accuracy": 0.75, "n": 20, "unreadable": 0}, "fuzzing": None,
            "logits": {"accuracy": 0.55, "n": 100, "unreadable": 0}}
  head = {"backend": "anthropic", "model": "claude-test", "baseline": False, "prompt_version": "v1", "analysis": {}}
  explanations.merge_write(str(work), "anthropic-claude-test", "sae0", head, {a: {
      "explanation": evil, "score": 0.61, "scores": scores, "single_token": True, "errors": {"fuzzing": "parse: 3 of 20"}}})
  explanations.merge_write(str(work), "offline-baseline", "sae0", dict(head, backend="offline", baseline=True), {
      b: {"explanation": 'offline baseline: active on [" x"]', "score": 0.9, "scores": {}}})
  out = os.path.dirname(site_lib.build(str(work), samples=False, log=lambda *_: None))
  pg = Page(browser, _url(out, sae="sae0", feature=a))
  pg.ready(f"sae0/{a}")
  panel = pg.text("[data-panel=autointerp]")
  assert evil in pg.text("[data-panel=autointerp] .explanation") and "anthropic claude-test" in panel
  assert "0.61" in pg.text("[data-panel=autointerp] [data-key=score]") and "0.75" in panel and "parse: 3 of 20" in panel
  assert "single-token" in panel
  assert evil in pg.text(f"#feature-list li[data-feature='{a}']")
  pg.inert()
  pg.close()
  pg = Page(browser, _url(out, sae="sae0", feature=b, order="score"))
  pg.ready(f"sae0/{b}")
  assert "Offline baseline" in pg.text("[data-panel=autointerp] [data-key=autointerp_source]")
  assert "offline baseline" not in pg.text(f"#feature-list li[data-feature='{b}']")   # labels: the top tokens
  order = pg.attrs("#feature-list li[data-feature]", "data-feature")[:2]
  assert order == [str(b), str(a)], order
  pg.inert()
  pg.close()


def test_text_inspector_hover_click_and_highlight(browser, inspector_site, artifacts):
  site = _data(inspector_site, "site")
  k = next(s["k"] for s in site["samples"] if s["set"] == "Docs: Python")
  doc = _data(inspector_site, f"samples/{k}")
  feats = doc["units"]["sae0"]["features"]
  pg = Page(browser, _url(inspector_site, "text.html", sae="sae0", doc=k))
  pg.ready(f"doc {k}")
  assert pg.p.locator("#doc .tok").count() == len(doc["tokens"])
  t = max(range(len(feats)), key=lambda i: len(feats[i]))       # the token with most active features
  pg.p.locator("#doc .tok").nth(t).hover()
  listed = [int(x) for x in pg.attrs("#token-features li[data-feature]", "data-feature")]
  assert listed == [f for f, _ in feats[t]]
  np.testing.assert_allclose([_num(s) for s in pg.texts("#token-features .tf-act")], [a for _, a in feats[t]], rtol=5e-3)
  where = lambda f: sum(any(g == f for g, _ in row) for row in feats)  # noqa: E731
  pg.p.locator("#token-features li[data-feature]").nth(0).click()       # select: the text is coloured by it
  f0 = listed[0]
  assert f"sae0/{f0}" in pg.text("#selected") and pg.p.locator("#doc .tok.firing").count() == where(f0)
  assert pg.p.locator("#selected a.open-fi").get_attribute("href") == f"index.html#sae=sae0&feature={f0}"
  if len(listed) > 1:    # hovering another feature highlights its tokens instead; leaving restores
    pg.p.locator("#token-features li[data-feature]").nth(1).hover()
    assert pg.p.locator("#doc .tok.firing").count() == where(listed[1])
    pg.p.mouse.move(5, 5)
    assert pg.p.locator("#doc .tok.firing").count() == where(f0)
  pg.p.screenshot(path=os.path.join(artifacts, "text-hover-1280x800.png"))
  pg.inert()
  pg.close()


def test_hostile_corpus_text_stays_text_on_every_page(browser, inspector_site, db, hostile):
  site = _data(inspector_site, "site")
  host = next(s for s in site["samples"] if s["set"] == "Hostile")
  doc = _data(inspector_site, f"samples/{host['k']}")
  shown = "".join(doc["pieces"])
  pg = Page(browser, _url(inspector_site, "text.html", sae="sae0", doc=host["k"]))
  pg.ready(f"doc {host['k']}")
  body = pg.text("#doc")
  present = [h for h in hostile if h in shown]
  assert len(present) >= 3 and all(h in body for h in present)     # shown exactly as written
  pg.inert()
  for s in site["samples"]:                                        # every document; the other units on one
    for name in ("sae0",) if s["k"] != host["k"] else ("neurons", "sae1"):
      pg.p.evaluate(f"location.hash = 'sae={name}&doc={s['k']}'")
      pg.ready(f"doc {s['k']}")
      pg.p.locator("#doc .tok").nth(0).hover()
      pg.inert()
  pg.close()
  # every live feature's page: its examples hold the same text (the units share one code path)
  pg = Page(browser, _url(inspector_site, sae="sae0", feature=0))
  pg.ready("sae0/0")
  for name in ("sae0",):
    for i in np.flatnonzero(np.asarray(db.unit(name).array("fired")) > 0):
      pg.p.evaluate(f"location.hash = 'sae={name}&feature={int(i)}'")
      pg.ready(f"{name}/{int(i)}", complete=True)
  pg.inert()
  pg.close()


def test_served_mode_runs_typed_text(browser, inspector_run, inspector_site, hostile):
  run = Run.open(inspector_run)
  serving = server.start(inspector_site, lambda: run)
  try:
    pg = Page(browser, serving.url + "text.html#sae=sae1")
    pg.p.wait_for_selector("#live-form:not([hidden])")
    typed = "def inspect(x):\n    return x + 1  " + hostile[0] + hostile[2]
    pg.p.fill("#live-text", typed)
    pg.p.click("#live-run")
    pg.ready("doc live")
    want = live.text_activations(run, typed, "sae1")
    assert pg.p.locator("#doc .tok").count() == want["n_tokens"]
    assert pg.text("#doc") == "".join(want["pieces"])
    t = max(range(want["n_tokens"]), key=lambda i: len(want["features"][i]))
    pg.p.locator("#doc .tok").nth(t).hover()
    assert [int(x) for x in pg.attrs("#token-features li[data-feature]", "data-feature")] == [f for f, _ in want["features"][t]]
    pg.inert()
    resp = pg.p.request.get(serving.url)
    assert "script-src 'self'" in resp.headers["content-security-policy"]
    pg.close()
    # the steering panel (served only): a prompt with hostile text, clamped and clean columns side by side
    pg = Page(browser, serving.url + "index.html#sae=sae0&feature=3")
    pg.ready("sae0/3")
    pg.p.wait_for_selector("[data-panel=steer] .steer-go")
    pg.p.fill("[data-panel=steer] .steer-prompt", "x = " + hostile[0])   # cut to its end: the tiny model reads 16
    pg.p.click("[data-panel=steer] .steer-go")
    pg.p.wait_for_selector("[data-panel=steer] .steer-edited", timeout=60000)
    assert "clamped to" in pg.text("[data-panel=steer] .steer-edited") and "KL" in pg.text("[data-panel=steer]")
    pg.inert()
    pg.close()
  finally:
    serving.close()


@pytest.mark.parametrize("width,height", [(1280, 800), (420, 820)])
def test_layout_has_no_overlap_or_sideways_scroll(browser, inspector_site, db, artifacts, width, height):
  j = int(np.argmax(np.asarray(db.unit("sae0").array("fired"))))
  site = _data(inspector_site, "site")
  k = next(s["k"] for s in site["samples"] if s["set"] == "Multilingual")
  for page, state, ready, name in (("index.html", {"sae": "sae0", "feature": j}, f"sae0/{j}", "feature"),
                                   ("text.html", {"sae": "sae0", "doc": k}, f"doc {k}", "text")):
    pg = Page(browser, _url(inspector_site, page, **state), width, height)
    pg.ready(ready)
    if page == "text.html":
      pg.p.locator("#doc .tok").nth(3).hover()
    overflow = pg.p.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"{page} at {width}px scrolls sideways by {overflow}px"
    boxes = pg.p.eval_on_selector_all(".panel, .sidebar, .feature, .ti-main, .ti-side, .topbar",
                                      "els => els.map(e => { const r = e.getBoundingClientRect(); "
                                      "return [e.className, r.left, r.top, r.right, r.bottom, e.parentElement.className]; })")
    siblings = {}
    for b in boxes:
      siblings.setdefault(b[5], []).append(b)
    for group in siblings.values():                 # boxes side by side never overlap
      for a in range(len(group)):
        for c in range(a + 1, len(group)):
          x, y = group[a], group[c]
          overlap = min(x[3], y[3]) - max(x[1], y[1]) > 1 and min(x[4], y[4]) - max(x[2], y[2]) > 1
          assert not overlap, (page, width, x, y)
    pg.p.screenshot(path=os.path.join(artifacts, f"{name}-{width}x{height}.png"))
    pg.inert()
    pg.close()
