"""Proxy labels (analysis/proxies.py) on the vendored NeoX tokenizer, checked token by token against
spans located by hand in the text and against a slow character-level reference for scripts
(Unicode character names, not the module's block table)."""
import time
import unicodedata

import numpy as np
import pytest

from monojax.analysis import proxies as px
from monojax.data import tokenizer as tk

P = {name: i for i, name in enumerate(px.PROXIES)}


@pytest.fixture(scope="module")
def neox():
  return tk.TextTokenizer(tk.NEOX_NAME)


@pytest.fixture(scope="module")
def labeler(neox):
  return px.ProxyLabeler(neox)


@pytest.fixture(scope="module")
def byte_lengths(neox):
  return neox.token_byte_lengths()


def _doc(neox, byte_lengths, text):
  """ids of one document (no EOS), each token's byte span, and the document's UTF-8 bytes."""
  text = unicodedata.normalize("NFC", text)
  ids = np.array(neox.hf.encode(text, add_special_tokens=False).ids, np.int32)
  lens = byte_lengths[ids]
  data = text.encode("utf-8")
  assert lens.sum() == len(data)
  ends = np.cumsum(lens)
  return ids, ends - lens, ends, data


def _overlap(starts, ends, data, sub, context=None):
  """Tokens holding any byte of `sub` (its first occurrence inside the first occurrence of `context`)."""
  context = context or sub
  b = data.index(context.encode("utf-8")) + context.encode("utf-8").index(sub.encode("utf-8"))
  e = b + len(sub.encode("utf-8"))
  return (starts < e) & (ends > b)


# ------------------------------------------------------------------------------ scripts

_NAME_PREFIX = {
    "arabic": ("ARABIC",), "hebrew": ("HEBREW",), "cyrillic": ("CYRILLIC",), "greek": ("GREEK",),
    "armenian": ("ARMENIAN",), "georgian": ("GEORGIAN",), "devanagari": ("DEVANAGARI",),
    "thai": ("THAI",), "han": ("CJK UNIFIED IDEOGRAPH",), "kana": ("HIRAGANA", "KATAKANA"),
    "hangul": ("HANGUL",),
}


def _in_script(ch: str, script: str) -> bool:
  if script == "cjk":
    return ch in "、。「」" or any(_in_script(ch, s) for s in ("han", "kana", "hangul"))
  return unicodedata.name(ch, "").startswith(_NAME_PREFIX[script])


def _reference_scripts(text, starts, ends):
  """[scripts, tokens]: every non-space character a token touches is in the script, and one is."""
  chars, b = [], 0
  for ch in text:
    n = len(ch.encode("utf-8"))
    chars.append((b, b + n, ch))
    b += n
  out = {}
  for s in px.SCRIPT_PROXIES:
    row = []
    for t0, t1 in zip(starts, ends):
      touched = [ch for c0, c1, ch in chars if c0 < t1 and c1 > t0 and not ch.isspace()]
      row.append(bool(touched) and all(_in_script(ch, s) for ch in touched))
    out[s] = np.array(row)
  return out


MIXED = ("The word سلام means peace; Привет мир is Russian, 你好世界。 is Chinese, こんにちは、東京タワー "
         "Japanese, 안녕하세요 Korean, שלום Hebrew, Γειά σου Greek, नमस्ते Hindi, สวัสดี Thai, "
         "Բարև Armenian, გამარჯობა Georgian. Mixed: abcПривет, «مرحبا», 123٤٥٦, 「東京」 and ёжик.")


def test_scripts_match_a_character_level_reference(neox, byte_lengths, labeler):
  ids, starts, ends, data = _doc(neox, byte_lengths, MIXED)
  # The text has tokens that hold part of a character (byte-level BPE splits rare characters).
  boundaries = {0}
  for ch in unicodedata.normalize("NFC", MIXED):
    boundaries.add(max(boundaries) + len(ch.encode("utf-8")))
  assert any(int(s) not in boundaries for s in starts), "no token starts mid-character"
  lab = labeler.labels(ids[None])[:, 0]
  ref = _reference_scripts(unicodedata.normalize("NFC", MIXED), starts, ends)
  for s in px.SCRIPT_PROXIES:
    np.testing.assert_array_equal(lab[P[s]].astype(bool), ref[s], err_msg=s)
    assert lab[P[s]].any(), s
  # By hand: every token of " сلام"-style words is marked; Latin words and mixed tokens are not.
  assert lab[P["arabic"], _overlap(starts, ends, data, "سلام")].all()
  assert lab[P["cyrillic"], _overlap(starts, ends, data, "Привет мир")].all()
  assert not lab[:, _overlap(starts, ends, data, "The word")].any()
  assert lab[P["han"], _overlap(starts, ends, data, "你好世界")].all()
  assert lab[P["cjk"], _overlap(starts, ends, data, "你好世界。")].all()
  assert lab[P["kana"], _overlap(starts, ends, data, "こんにちは")].all()
  assert lab[P["hangul"], _overlap(starts, ends, data, "안녕하세요")].all()


def test_split_characters_label_both_halves(neox, byte_lengths, labeler):
  # Korean syllables and rare Arabic letters are byte tokens: the lead byte and the completing byte
  # are both labelled (the paper's A/1/3399 and A/1/3450 split those two roles).
  for text, script in (("안녕하세요", "hangul"), ("ڤڨڭ", "arabic"), ("ქართული", "georgian")):
    ids = _doc(neox, byte_lengths, text)[0]
    pieces = [neox.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), (text, pieces)
    lab = labeler.labels(ids[None])[:, 0]
    assert lab[P[script]].all(), (text, pieces, lab[P[script]])


def test_windows_that_start_mid_document_and_mid_character(neox, byte_lengths, labeler):
  text = unicodedata.normalize("NFC", MIXED)
  ids, starts, ends, data = _doc(neox, byte_lengths, text)
  full = labeler.labels(ids[None])[:, 0]
  char_start = np.zeros(len(data) + 1, bool)
  b = 0
  for ch in text:
    char_start[b] = True
    b += len(ch.encode("utf-8"))
  char_start[b] = True
  width, cut_seen = 16, 0
  rows = np.stack([ids[k:k + width] for k in range(len(ids) - width)])
  lab = labeler.labels(rows)  # all windows at once: rows never see each other
  for k in range(len(rows)):
    w0, w1 = starts[k], ends[k + width - 1]
    for j in range(width):
      t0, t1 = starts[k + j], ends[k + j]
      # A token touches a cut character when its first char begins before the window or its last ends after.
      c0 = t0
      while not char_start[c0]:
        c0 -= 1
      c1 = t1
      while not char_start[c1]:
        c1 += 1
      script_rows = [P[s] for s in px.SCRIPT_PROXIES]
      if c0 < w0 or c1 > w1:
        cut_seen += 1
        assert not lab[script_rows, k, j].any(), (k, j)
      else:
        np.testing.assert_array_equal(lab[script_rows, k, j], full[script_rows, k + j])
  assert cut_seen > 0


# ----------------------------------------------------------------------------- patterns

PATTERNS = ("Hash: 3f2a9c1d8e7b6a5f0c1d2e3f4a5b6c7d8e9f0a1b, id 550e8400-e29b-41d4-a716-446655440000, "
            "mask 0xFF00, see https://example.com/path/to/Page_(x)?q=1&r=2. Also (www.python.org/doc). "
            "Blob: SGVsbG8gd29ybGQgdGhpcyBpcyBhIHRlc3QgYmxvYiAxMjM0NQ== and DNA ATGCGTACGTTAGCCTAGGCTA here, "
            "GenBank gatcctccat atacaacggt atctccacct. "
            "Not these: deadbeef 12345678 CamelCaseIdentifierName2 getElementsByTagName "
            "AAAAAAAAAAAAAAAAAAAAAA CATTAGCAT /usr/local/lib/python3.11/site-packages x1y2z3 "
            "undefined, defined, integer, the import of goods, return to sender, http:// nothing.\n"
            "#include <stdio.h>\n"
            "typedef struct { int x; } point;\n"
            "def f(x):\n"
            "  return sizeof(x)\n"
            "import numpy as np\n"
            "from a.b import c\n")

EXPECTED = {
    "hex": ["3f2a9c1d8e7b6a5f0c1d2e3f4a5b6c7d8e9f0a1b", "550e8400-e29b-41d4-a716-446655440000", "0xFF00"],
    "url": ["https://example.com/path/to/Page_(x)?q=1&r=2", "www.python.org/doc"],
    "base64": ["SGVsbG8gd29ybGQgdGhpcyBpcyBhIHRlc3QgYmxvYiAxMjM0NQ=="],
    "dna": ["ATGCGTACGTTAGCCTAGGCTA", "gatcctccat atacaacggt atctccacct"],
    "code_keyword": [("#include", "#include <stdio.h>"), ("typedef", "typedef struct {"), ("struct", "typedef struct {"),
                     ("int", "{ int x;"), ("def", "def f(x)"), ("sizeof", "return sizeof(x)"),
                     ("import", "import numpy"), ("from", "from a.b import c"), ("import", "from a.b import c")],
}


def test_pattern_proxies_mark_exactly_the_hand_located_spans(neox, byte_lengths, labeler):
  ids, starts, ends, data = _doc(neox, byte_lengths, PATTERNS)
  lab = labeler.labels(ids[None])[:, 0]
  for name, subs in EXPECTED.items():
    expected = np.zeros(len(ids), bool)
    for sub in subs:
      sub, context = sub if isinstance(sub, tuple) else (sub, None)
      expected |= _overlap(starts, ends, data, sub, context)
    got = lab[P[name]].astype(bool)
    assert (got == expected).all(), (name, [neox.decode([i]) for i in ids[got != expected]])
  assert not lab[[P[s] for s in px.SCRIPT_PROXIES]].any()


def test_url_tokens_by_hand(neox, labeler):
  ids = neox.hf.encode("Go to https://x.org/a, now.", add_special_tokens=False).ids
  lab = labeler.labels(np.array([ids]))[P["url"], 0]
  marked = [neox.decode([i]) for i, m in zip(ids, lab) if m]
  assert "".join(marked).strip() == "https://x.org/a"
  assert marked[0] == " https"  # a token is marked when any of its bytes is in the match


def test_documents_and_rows_do_not_run_together(neox, labeler):
  # "ab12" + "cd34ef56": 12 hex digits if joined, but EOS separates the documents and rows are separate.
  ids = neox.encode_documents(["tail ab12", "cd34ef56 head"])
  eos = np.flatnonzero(ids == neox.eos_id)
  lab = labeler.labels(ids[None])[P["hex"], 0].astype(bool)
  first, second = slice(0, eos[0]), slice(eos[0] + 1, eos[1])
  assert not lab[first].any()
  assert lab[second].any() and not lab[eos].any()
  # The same text split over two rows of one batch with no EOS: row 0 ends "ab12", row 1 starts "cd34ef56".
  a, b = ids[:eos[0]], ids[eos[0] + 1:eos[1]]
  width = max(len(a), len(b))
  rows = np.stack([np.concatenate([np.full(width - len(a), neox.pad_id), a]),
                   np.concatenate([b, np.full(width - len(b), neox.pad_id)])])
  lab2 = labeler.labels(rows)[P["hex"]]
  assert not lab2[0].any() and lab2[1].any()


def test_hostile_text_and_odd_ids_do_not_break_anything(neox, labeler):
  docs = ['<script>alert("x")</script><a href="https://evil.example/x?a=<b>">click</a>',
          "<|endoftext|> literal, \x00\x01\x1b[31m ANSI, \u202eRTL override, e\u0301 combining, 👩‍👩‍👧 emoji",
          "<img src=x onerror=alert(1)>" * 50, "}" * 1000 + "=" * 300 + "/" * 300, ""]
  ids = neox.encode_documents(docs)
  width = 64
  ids = np.resize(ids, (-(-ids.size // width)) * width).reshape(-1, width)
  lab = labeler.labels(ids)
  assert lab.shape == (len(px.PROXIES),) + ids.shape and lab.dtype == np.float32
  assert set(np.unique(lab)) <= {0.0, 1.0}
  assert not lab[:, ids == neox.eos_id].any()
  flat_ids, flat = ids.reshape(-1), lab[P["url"]].reshape(-1).astype(bool)
  assert "".join(neox.decode([i]) for i in flat_ids[flat]).startswith("https://evil.example/x?a=")
  assert '"' not in "".join(neox.decode([i]) for i in flat_ids[flat])
  # Ids outside the vocabulary (padded embedding rows, negatives) are separators, labelled 0.
  rng = np.random.default_rng(0)
  odd = rng.integers(-5, tk.padded_vocab_size(neox.vocab_size) + 5, (16, 32))
  lab = labeler.labels(odd)
  assert lab.shape == (len(px.PROXIES), 16, 32)
  assert not lab[:, (odd < 0) | (odd >= neox.vocab_size) | (odd <= 1)].any()
  assert labeler.labels(np.zeros((0, 5), np.int32)).shape == (len(px.PROXIES), 0, 5)
  assert labeler.labels(odd[0]).shape == (len(px.PROXIES), 32)
  with pytest.raises(ValueError):
    labeler.labels(np.zeros((2, 3, 4), np.int32))


def test_describe_and_names():
  assert len(set(px.PROXIES)) == len(px.PROXIES)
  for name in px.PROXIES:
    d = px.describe(name)
    assert d and "\n" not in d
  with pytest.raises(KeyError):
    px.describe("klingon")


def test_subset_of_proxies_and_speed(neox, labeler, pydoc_texts):
  ids = neox.encode_documents(pydoc_texts + [MIXED, PATTERNS])
  rows = np.resize(ids, 2000 * 128).reshape(2000, 128)
  t0 = time.perf_counter()
  full = labeler.labels(rows)
  dt = time.perf_counter() - t0
  assert dt < 15, f"256k tokens took {dt:.1f}s"  # the budget is 1M tokens in 30 s; ~3 s measured
  sub = px.ProxyLabeler(neox, proxies=("url", "arabic"))
  np.testing.assert_array_equal(sub.labels(rows), full[[P["url"], P["arabic"]]])
