"""Tests for the default-corpus builder: cleaners, splitting, dedupe, binary readers, end-to-end build.

Nothing here touches the network: the end-to-end build runs on a fake cache laid out like unpacked
.debs (with the fetch markers already present) plus Python's own pydoc_data.topics.
"""
import gzip
import json
import os
import pathlib
import random
import struct
import zlib

import pytest

from monojax.corpus import build_corpus as bc
from monojax.corpus import corpus_sources as cs
from monojax.data import pile_io
from monojax.corpus import text_clean as tc

# ------------------------------------------------------------------------------------------------
# Cleaners


def test_strip_roff():
  src = r""".\" Copyright comment that must vanish
.TH OPEN 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open \- open a file
.SH SYNOPSIS
.nf
.BI "int open(const char *" pathname ", int " flags );
.fi
.SH DESCRIPTION
The
.BR open ()
system call opens \fIpathname\fP \(em see
.BR close (2).
.TP
.B O_CREAT
Create the file.
.IP \(bu 2
a bullet
.TS
tab(:);
l l.
A:B
.TE
"""
  text = tc.strip_roff(src)
  assert "Copyright" not in text and ".TH" not in text and "\\f" not in text
  assert "open - open a file" in text
  assert "int open(const char *pathname, int flags);" in text
  assert "The open() system call opens pathname \u2014 see close(2)." in text
  assert "O_CREAT\nCreate the file." in text
  assert "\u2022 a bullet" in text
  assert "A  B" in text
  assert tc.strip_roff(".so man2/open.2\n") == ""


def test_clean_rest():
  src = """.. _label:

:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. toctree::
   :maxdepth: 2

   intro.rst

Use :func:`dumps` and ``loads``, see `the spec <https://json.org>`_ [1]_ and *this*.

.. function:: dumps(obj, *, indent=None)

   Serialize *obj*.

   .. versionadded:: 3.9

   .. note::
      Keys are strings.

Example::

    >>> json.dumps([1])
    '[1]'

.. This is a comment
   spanning two lines.

Done.
"""
  text = tc.clean_rest(src)
  assert "json --- JSON encoder" in text and "=====" not in text
  assert "toctree" not in text and "intro.rst" not in text and "synopsis" not in text
  assert "Use dumps and loads, see the spec and this." in text
  assert "dumps(obj, *, indent=None)" in text and "Serialize obj." in text
  assert "New in version 3.9." in text and "Note:" in text and "Keys are strings." in text
  assert "Example:\n\n>>> json.dumps([1])\n'[1]'" in text  # blocks lose only their common indentation
  assert "comment" not in text and "_label" not in text and text.rstrip().endswith("Done.")


def test_clean_pod():
  src = "=head1 NAME\n\nperlfoo - B<bold> and C<< $a <=> $b >> and L<perlfunc/open> E<lt>xE<gt>\n\n" \
        "    verbatim C<kept>\n\n=cut\n\nsub code {}\n"
  text = tc.clean_pod(src)
  assert text == 'NAME\n\nperlfoo - bold and $a <=> $b and "open" in perlfunc <x>\n\n    verbatim C<kept>'


def test_html_to_text():
  src = """<html><head><title>T</title><style>p {color: red}</style></head><body>
  <div id="banner"><a href="x">Download</a></div>
  <ul class="docnav top"><li>Prev</li><li>Next</li></ul>
  <h2>1.2. Title &amp; more</h2>
  <div class="para">A <code class="command">cmd</code>
     spread   over lines.<script>alert("x")</script></div>
  <div class="sidebar"><div class="para">Nested <em>para</em>.</div></div>
  <pre>  keep
    indentation</pre>
  <ul><li>one</li><li>two<br/>lines</li></ul>
  </body></html>"""
  text = tc.html_to_text(src, skip_classes=("docnav",), skip_ids=("banner",))
  assert "alert" not in text and "color" not in text and "Download" not in text and "Prev" not in text
  assert "T" not in text.split("\n")  # <head> content is not body text
  assert "1.2. Title & more" in text
  assert "A cmd spread over lines." in text
  assert "Nested para." in text
  assert "  keep\n    indentation" in text
  assert "- one" in text and "- two\nlines" in text


def test_clean_wikitext():
  src = """{{Infobox person|name=X|birth={{birth date|1900|1|1}}}}
'''Ada''' was a [[mathematician|math person]] from [[London]].<ref name="a">Cite {{cite book|title=T}}</ref> She wrote notes.<ref name="b"/>
[[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]]]]
{| class="wikitable"
|-
| cell || {{nested|{{deep}}}}
|}
== Life ==
She met [http://example.com Babbage] in 1833.<!-- hidden -->
* first item
== References ==
{{reflist}}
* a reference
== External links ==
* [http://x.org site]
[[Category:Mathematicians]]
[[de:Ada Lovelace]]"""
  text = tc.clean_wikitext(src)
  assert text.startswith("Ada was a math person from London. She wrote notes.")
  for junk in ("{{", "}}", "[[", "]]", "<ref", "Cite", "Infobox", "thumb", "Portrait", "wikitable", "cell",
               "hidden", "reference", "site", "Category", "Lovelace", "'''"):
    assert junk not in text, junk
  assert "Life\n\nShe met Babbage in 1833.\n- first item" in text


def test_filters_and_normalize():
  assert tc.remove_special_tokens("a<|endoftext|>b<|padding|>c") == "abc"
  assert tc.normalize("a  \r\nb\x00\n\n\n\n c\t \n") == "a\nb\n\n c"
  prose = "The quick brown fox jumps over the lazy dog. " * 10
  assert tc.drop_reason(prose) is None
  assert tc.drop_reason("too short") == "short"
  assert tc.drop_reason("0123 4567 89ab " * 40) == "letter_ratio"
  table = "Oct Dec Char Description\n" + "".join(f"{o:o} {o} {chr(o)} LATIN LETTER SOMETHING\n" for o in range(200, 260))
  assert tc.drop_reason(table) == "number_table"
  assert tc.drop_reason(prose + "\ufffd" * 5) == "binary"
  assert tc.letter_ratio("ab 12") == 0.5 and tc.letter_ratio("\u6f22\u5b57 ab") == 1.0


def test_dedupe():
  assert list(tc.dedupe(["a", "b", " a\n", "c", "b"])) == ["a", "b", "c"]
  d = tc.Deduper()
  assert d.first("x") and not d.first("x") and d.duplicates == 1


# ------------------------------------------------------------------------------------------------
# Long documents


def _assert_lossless(text: str, pieces: list[str], limit: int):
  assert all(0 < len(p) <= limit for p in pieces)
  pos = 0
  for p in pieces:  # pieces appear in order; only whitespace lies between them
    at = text.index(p, pos)
    assert text[pos:at].strip() == ""
    pos = at + len(p)
  assert text[pos:].strip() == ""
  assert "".join(text.split()) == "".join("".join(p.split()) for p in pieces)


def test_split_long_prefers_paragraphs_and_loses_nothing():
  rng = random.Random(0)
  words = ["alpha", "beta", "gamma", "delta", "x" * 40]
  paras = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(rng.randint(1, 6)))
           for _ in range(400)]
  text = "\n\n".join(paras)
  pieces = tc.split_long(text, 2000)
  _assert_lossless(text, pieces, 2000)
  assert len(pieces) > 10
  assert sum(text[text.index(p) + len(p):].startswith("\n\n") for p in pieces[:-1]) >= len(pieces) - 2


@pytest.mark.parametrize("text", [
    "word " * 3000,  # no newlines: whitespace cuts
    "line\n" * 3000,  # no paragraphs: line cuts
    "x" * 7000,  # no whitespace at all: hard cuts
    "\u6f22" * 2500 + "\n" + "\u5b57" * 2500,  # CJK without spaces
    "short",
], ids=["words", "lines", "no-whitespace", "cjk", "short"])
def test_split_long_edge_cases(text):
  pieces = tc.split_long(text, 1000)
  _assert_lossless(text, pieces, 1000)
  if "x" * 7000 == text:
    assert "".join(pieces) == text


# ------------------------------------------------------------------------------------------------
# Binary readers (R lazy-load data, dictd, SWORD) on tiny synthetic files


def _r_int(*vals):
  return struct.pack(f">{len(vals)}i", *vals)


def _r_chars(s):
  b = s.encode()
  return _r_int(9 | (8 << 12), len(b)) + b  # CHARSXP, UTF-8


def _r_names(names):
  return _r_int(2 | (1 << 10)) + _r_int(1) + _r_chars("names") + _r_vec(16, names) + _r_int(254)


def _r_vec(sexp, items, names=None):
  out = _r_int(sexp | ((1 << 9) if names else 0), len(items))
  if sexp == 16:
    out += b"".join(_r_chars(s) for s in items)
  elif sexp == 13:
    out += _r_int(*items)
  else:
    out += b"".join(items)
  return out + (_r_names(names) if names else b"")


def _r_serialize(body):
  return b"X\n" + _r_int(3, 0x040201, 0x030500, 5) + b"UTF-8" + body


def test_read_r_lazyload(tmp_path):
  lines = ["EMMA", "", "By Jane Austen", "", "Emma Woodhouse, handsome, clever, and rich."]
  blob_raw = _r_serialize(_r_vec(16, lines))
  blob = struct.pack(">I", len(blob_raw)) + zlib.compress(blob_raw)
  index = _r_vec(19, [_r_vec(19, [_r_vec(13, [0, len(blob)])], names=["emma"]), _r_vec(19, []),
                      _r_int(10, 1, 1)], names=["variables", "references", "compressed"])
  (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(index)))
  (tmp_path / "Rdata.rdb").write_bytes(blob)
  assert cs.read_r_lazyload(tmp_path) == {"emma": lines}
  docs = list(cs._r_text_objects(tmp_path, "r-cran-janeaustenr"))
  assert docs == [("Gutenberg (PG-19)", "\n".join(lines), {"source": "r-cran-janeaustenr/emma", "lang": "en"})]


def test_dictd_entries(tmp_path):
  b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  enc = lambda n: (enc(n // 64) if n >= 64 else "") + b64[n % 64]
  entries = ["00-database-short\n   header", "ABATIS, n.  Rubbish in front of a fort.", "ZEAL, n.  A disorder."]
  data, index, off = "", [], 0
  for e in entries:
    raw = e + "\n\n"
    index.append(f"{e.split(',')[0].split()[0]}\t{enc(off)}\t{enc(len(raw))}")
    data += raw
    off += len(raw)
  (tmp_path / "d.index").write_text("\n".join(index + [index[1].replace("ABATIS", "abatis")]) + "\n")
  (tmp_path / "d.dict.dz").write_bytes(gzip.compress(data.encode()))
  assert list(cs.dictd_entries(tmp_path / "d.index", tmp_path / "d.dict.dz")) == entries[1:]


def test_sword_ztext(tmp_path):
  book = ('<milestone n="Genesis" type="x-usfm-toc1"/><title type="main">Genesis</title>'
          '<chapter n="1" osisID="Gen.1" sID="Gen.1"/><div sID="p1" type="x-p"/>'
          '<w lemma="strong:H7225">In</w> the beginning<note placement="foot">a note</note> God created.'
          '<div eID="p1" type="x-p"/>')
  for testament, blocks in (("ot", [book]), ("nt", [])):
    bzz, bzs = b"", b""
    for text in blocks:
      z = zlib.compress(text.encode())
      bzs += struct.pack("<III", len(bzz), len(z), len(text))
      bzz += z
    (tmp_path / f"{testament}.bzs").write_bytes(bzs)
    (tmp_path / f"{testament}.bzz").write_bytes(bzz)
  books = list(cs.sword_ztext_books(tmp_path))
  assert books == [book]
  assert tc.normalize(cs.osis_to_text(books[0])) == "Genesis\n\nChapter 1\n\nIn the beginning God created."


# ------------------------------------------------------------------------------------------------
# End to end


def _fake_cache(root: pathlib.Path) -> pathlib.Path:
  """A cache holding an 'unpacked' fortunes .deb with its fetch marker already written."""
  pkg_dir = root / "x" / "fortunes"
  games = pkg_dir / "usr/share/games/fortunes"
  games.mkdir(parents=True)
  rng = random.Random(1)
  words = "the of and to in wisdom fortune cookie computer love time people".split()
  quotes = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))).capitalize() + "."
            for _ in range(3000)]
  quotes[5] += " <|endoftext|> stray token"
  (games / "wisdom").write_text("\n%\n".join(quotes) + "\n%\n")
  (games / "wisdom.dat").write_bytes(b"\x00\x01binary index")
  (games / "wisdom.u8").symlink_to("wisdom")
  (games / "art").write_text("/\\_/\\\n( o.o )\n > ^ <\n%\n" * 50)
  (pkg_dir / cs.MARKER).write_text(json.dumps({"name": "fortunes", "kind": "deb", "version": "1:1.99-test",
                                               "sha256": "ab" * 32, "file": "fortunes_1.99-test_all.deb"}))
  return root


def _books(root):
  del root
  rng = random.Random(2)
  for i in range(3):
    text = "\n\n".join(" ".join(rng.choice(["whale", "sea", "ship", "captain", "said"]) for _ in range(60))
                       for _ in range(40))
    yield "Gutenberg (PG-19)", text, {"source": f"test-books/book{i}", "lang": "en"}


def _test_sources():
  registry = {s.name: s for s in cs.SOURCES}
  fortunes_pkg = cs.Package("fortunes", "deb", "BSD (fortune-mod)")
  books_pkg = cs.Package("test-books", "local", "public domain", files=lambda: [])
  missing_pkg = cs.Package("not-in-cache", "deb", "GPL")
  return [
      cs.Source("fortunes-en", "Fortunes (en)", (fortunes_pkg,), cs.fortunes_en),
      registry["pydoc-topics"],
      cs.Source("books", "Gutenberg (PG-19)", (books_pkg,), _books),
      cs.Source("needs-network", "Docs: misc", (missing_pkg,), cs.misc_docs),
  ]


@pytest.fixture
def offline(monkeypatch):
  """Fails the test if the build tries apt-get or pip; records what it asked apt-get for."""
  asked = []

  def fake_apt(names, debs):
    asked.extend(names)
    return False, "E: offline test"

  def no_subprocess(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call {args}")

  monkeypatch.setattr(cs, "_apt_download", fake_apt)
  monkeypatch.setattr(cs.subprocess, "run", no_subprocess)
  monkeypatch.setattr(cs.shutil, "which", lambda name: "/usr/bin/" + name)
  return asked


def test_build_end_to_end(tmp_path, offline):
  cache = _fake_cache(tmp_path / "cache")
  out = tmp_path / "corpus"
  logs = []
  manifest = bc.build(out, cache, sources=_test_sources(), log=logs.append, workers=1)

  assert set(offline) == {"not-in-cache"}  # cached packages are not fetched again
  assert [s["source"] for s in manifest["skipped"]] == ["needs-network"]
  assert any("skipped package not-in-cache" in l for l in logs)
  assert any("skipped 1 sources whose packages are missing: needs-network" in l for l in logs)
  assert any(l.strip().startswith("fortunes-en") and "docs" in l and "MB" in l for l in logs)
  assert sorted(p.name for p in out.iterdir()) == ["LICENSES.md", "manifest.json", "train", "val"]
  assert not list(tmp_path.glob("corpus.tmp-*"))
  assert json.loads((out / "manifest.json").read_text()) == manifest
  assert manifest["complete"] and manifest["tier"] == "full" and "tokens" not in json.dumps(manifest["sets"])
  assert set(manifest["sets"]) == {"Fortunes (en)", "Docs: Python", "Gutenberg (PG-19)"}
  assert manifest["packages"]["fortunes"]["version"] == "1:1.99-test"
  assert manifest["packages"]["pydoc-topics"]["kind"] == "local"
  assert "fortunes" in (out / "LICENSES.md").read_text()

  all_train, all_val = set(), set()
  for name, info in manifest["sets"].items():
    train = [r for s in info["train"]["shards"] for _, r in pile_io.read_records(out / s["path"])]
    val = [r for s in info["val"]["shards"] for _, r in pile_io.read_records(out / s["path"])]
    assert info["train"]["shards"][0]["path"] == f"train/{bc.set_slug(name)}.jsonl.zst"
    assert len(train) == info["train"]["documents"] == info["unique_train"]["documents"] * info["repeat"]
    assert len(val) == info["val"]["documents"] >= 1
    for r in train + val:
      assert r["meta"]["pile_set_name"] == name and {"source", "lang", "id"} <= set(r["meta"])
      assert len(r["text"]) <= tc.MAX_DOC_CHARS and "<|endoftext|>" not in r["text"]
    train_texts, val_texts = {r["text"] for r in train}, {r["text"] for r in val}
    assert not train_texts & val_texts and len(val_texts) == len(val)  # val is disjoint and never repeated
    all_train |= train_texts
    all_val |= val_texts
  assert manifest["sets"]["Gutenberg (PG-19)"]["repeat"] > 1  # small book set upsampled
  assert manifest["sets"]["Fortunes (en)"]["repeat"] == 1
  assert manifest["totals"]["val"]["documents"] == len(all_val)
  fortune_ids = {r["meta"]["source"] for s in manifest["sets"]["Fortunes (en)"]["train"]["shards"]
                 for _, r in pile_io.read_records(out / s["path"])}
  assert fortune_ids == {"fortunes/wisdom"}  # no .dat, no .u8 duplicate, no ascii art

  # A second call finds the complete corpus and does nothing.
  mtime = (out / "manifest.json").stat().st_mtime_ns
  logs.clear()
  again = bc.ensure_corpus(out, cache, log=logs.append)
  assert again == manifest and (out / "manifest.json").stat().st_mtime_ns == mtime
  assert len(logs) == 1 and "nothing to do" in logs[0]


def test_ensure_rebuilds_incomplete_and_refuses_foreign_dirs(tmp_path, offline):
  cache = _fake_cache(tmp_path / "cache")
  out = tmp_path / "corpus"
  (out / "train").mkdir(parents=True)
  (out / "train" / "half.jsonl.zst.tmp").write_bytes(b"partial")
  logs = []
  manifest = bc.ensure_corpus(out, cache, log=logs.append, sources=_test_sources()[:2], workers=1)
  assert any("without a complete manifest" in l for l in logs)
  assert not (out / "train" / "half.jsonl.zst.tmp").exists()
  assert bc.load_complete_manifest(out) == manifest

  foreign = tmp_path / "home"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(RuntimeError, match="does not look like a corpus"):
    bc.build(foreign, cache, sources=_test_sources()[:2], log=logs.append, workers=1)
  assert (foreign / "notes.txt").exists()


def test_build_without_any_source_raises(tmp_path, offline):
  sources = [s for s in _test_sources() if s.name == "needs-network"]
  with pytest.raises(RuntimeError, match="no corpus source could be obtained"):
    bc.build(tmp_path / "out", tmp_path / "cache", sources=sources, log=lambda _: None, workers=1)
  assert not (tmp_path / "out").exists()


def test_registry_and_repeats():
  full = {s.name for s in cs.select_sources("full")}
  lite = {s.name for s in cs.select_sources("lite")}
  assert full - lite == {"linux-doc", "debian-handbook"}
  assert [s.name for s in cs.select_sources("full", ["wikipedia", "austen"])] == ["austen", "wikipedia"]
  with pytest.raises(ValueError, match="unknown sources"):
    cs.select_sources("full", ["nope"])
  repeats = bc.compute_repeats({"Gutenberg (PG-19)": 17, "Wikipedia (en)": 3, "Github": 29, "Docs: Python": 53,
                                "Multilingual: fortunes": 40, "Fortunes (en)": 14})
  assert repeats["Gutenberg (PG-19)"] == 2 and repeats["Wikipedia (en)"] == 3 and repeats["Github"] == 1
  assert bc.set_slug("Gutenberg (PG-19)") == "gutenberg-pg-19"


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.delenv("MONOJAX_CACHE", raising=False)
  assert bc.default_cache_dir() == pathlib.Path(os.path.expanduser("~/.cache/monojax/sources"))
  monkeypatch.setenv("MONOJAX_CACHE", str(tmp_path))
  assert bc.default_cache_dir() == tmp_path


def test_build_registry_sources_in_worker_processes(tmp_path, offline):
  """Registry sources run in a spawned pool; a fake gensim archive stands in for the PyPI download."""
  cache = tmp_path / "cache"
  lee = cache / "x" / "gensim" / cs.LEE_CORPUS
  lee.parent.mkdir(parents=True)
  rng = random.Random(3)
  words = "the minister said on tuesday that police and fire crews were in sydney".split()
  lee.write_text("".join(" ".join(rng.choice(words) for _ in range(60)) + "\n" for _ in range(50)))
  (cache / "x" / "gensim" / cs.MARKER).write_text(json.dumps(
      {"name": "gensim", "kind": "pypi", "version": "4.4.0", "sha256": "cd" * 32, "file": "gensim.whl"}))
  logs = []
  manifest = bc.build(tmp_path / "out", cache, sources=["lee-news", "pydoc-topics"], log=logs.append, workers=2)
  assert any("with 2 process(es)" in l for l in logs)
  assert set(manifest["sets"]) == {"News (Lee corpus)", "Docs: Python"}
  assert manifest["sources"]["lee-news"]["documents"] == 50 and not offline
