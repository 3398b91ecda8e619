"""preview.md and its console copy from hostile corpus text (tests/fixtures/hostile.json) are inert:
rendered by a real Markdown renderer with raw HTML allowed they hold no script, image, link or event
handler, every context is one code element holding the text as written, and the console copy holds
no control character. Runs `preview.finish` itself on a fake run (no model: the top activations are
given)."""
import html.parser
import json
import pathlib
import types
import unicodedata

import numpy as np
import pytest

from monojax.train import preview

HOSTILE = json.loads((pathlib.Path(__file__).parent.parent / "fixtures" / "hostile.json").read_text(encoding="utf-8"))


class _Tokenizer:
  """Token i decodes to the i-th hostile string."""

  def __init__(self, vocab):
    self.vocab = vocab

  def decode(self, ids):
    return "".join(self.vocab[int(i)] for i in ids)


def _fake_run(tmp_path):
  """6 features, each with 3 contexts; each context a row of 14 tokens firing at position LEFT, so
  the 6 * 3 contexts show every hostile string (each row starts further along the list)."""
  vocab = [HOSTILE[k] for k in sorted(HOSTILE)]
  n_feat, k = preview.N_FEATURES, preview.TOP_K
  T = preview.LEFT + 1 + preview.RIGHT
  rows = n_feat * k
  tokens = np.array([[(r * 3 + t) % len(vocab) for t in range(T + 1)] for r in range(rows)], np.int32)
  counts = np.arange(1, n_feat + 1, dtype=np.int64)
  vals = np.full((n_feat, k), 2.5, np.float32) - np.arange(k, dtype=np.float32)
  idx = np.arange(rows).reshape(n_feat, k) * T + preview.LEFT
  sae = types.SimpleNamespace(name="sae0", label="l1=1e-3", group=0, member=0)
  state = {"groups": {0: {"fired_count": np.zeros((1, n_feat), np.int32)}}, "density_tokens_last": 0,
           "density_tokens": 0}
  cfg = types.SimpleNamespace(train=types.SimpleNamespace(eval_batches=1),
                              sae=types.SimpleNamespace(ultralow_density=1e-6, dense_density=0.01))
  run = types.SimpleNamespace(cfg=cfg, workdir=str(tmp_path), saes=[sae], sae_state=state,
                              tokenizer=_Tokenizer(vocab), held_out_batches=lambda n: [])
  return run, (counts, vals, idx, tokens)


@pytest.fixture
def hostile_preview(tmp_path, monkeypatch):
  run, acts = _fake_run(tmp_path)
  monkeypatch.setattr(preview, "top_activations", lambda run, sae, batches, k=preview.TOP_K: acts)
  logged = []
  returned = preview.finish(run, logged.append)
  with open(tmp_path / "preview.md", encoding="utf-8", newline="") as f:  # no newline translation
    md = f.read()
  assert returned == md
  return md, "\n".join(logged)


class _Elements(html.parser.HTMLParser):
  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags, self.code, self._in_code = [], [], False

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, attrs))
    if tag == "code":
      self._in_code = True
      self.code.append("")

  handle_startendtag = handle_starttag

  def handle_endtag(self, tag):
    if tag == "code":
      self._in_code = False

  def handle_data(self, data):
    if self._in_code:
      self.code[-1] += data


def test_preview_markdown_is_inert(hostile_preview):
  markdown_it = pytest.importorskip("markdown_it")
  md, _ = hostile_preview
  rendered = markdown_it.MarkdownIt("commonmark", {"html": True}).render(md)  # raw HTML on: the worst viewer
  low = rendered.lower()
  for bad in ("<script", "</script", "<img", "<svg", "<iframe", "<a ", 'href="javascript:'):
    assert bad not in low, (bad, rendered)
  parsed = _Elements()
  parsed.feed(rendered)
  parsed.close()
  tags = {t for t, _ in parsed.tags}
  assert tags <= {"h1", "p", "ul", "li", "code"}, tags  # no element from corpus text
  assert not [a for _, attrs in parsed.tags for a in attrs], "no attribute at all (no href, src, on*=)"
  # Every context is one code element, and all of the corpus text shown sits inside code elements.
  contexts = [c for c in parsed.code if "«" in c]
  assert len(contexts) == preview.N_FEATURES * preview.TOP_K
  shown = "".join(contexts)
  for s in (HOSTILE["script_tag"], HOSTILE["img_onerror"], HOSTILE["md_link_js"], HOSTILE["close_script"]):
    assert s in shown  # shown as text, as written

def test_preview_console_copy_has_no_control_characters(hostile_preview):
  md, console = hostile_preview
  for out in (console, md):
    bad = sorted({f"U+{ord(c):04X}" for c in out if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})
    assert not bad, bad
  assert "\\x1b[31m" in console and "\\u202e" in console  # shown as escapes, not dropped
  assert "(written to" in console
