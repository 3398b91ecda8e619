"""Tests for the default-corpus builder: cleaners, splitting, dedupe, binary readers, end-to-end build.

Nothing here touches the network: the end-to-end build runs on a fake cache laid out like unpacked
.debs (with the fetch markers already present) plus Python's own pydoc_data.topics.
"""
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import random
import shutil
import stat
import struct
import tarfile
import types
import zipfile
import zlib

import pytest

from monojax import errors
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
  assert sorted(p.name for p in out.iterdir()) == ["LICENSES.md", "analysis", "manifest.json", "train", "val"]
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


def test_ensure_rebuilds_incomplete_corpus_it_wrote(tmp_path, offline):
  cache = _fake_cache(tmp_path / "cache")
  out = tmp_path / "corpus"
  manifest = bc.build(out, cache, sources=_test_sources()[:2], log=lambda _: None, workers=1)
  assert manifest["builder"] == bc.BUILDER and bc.written_by_monojax(out)
  shard = out / manifest["sets"]["Fortunes (en)"]["train"]["shards"][0]["path"]
  shard.unlink()  # a shard lost: the corpus is incomplete, and this builder wrote it
  logs = []
  again = bc.ensure_corpus(out, cache, log=logs.append, sources=_test_sources()[:2], workers=1)
  assert any("incomplete corpus" in l for l in logs)
  assert shard.is_file() and bc.load_complete_manifest(out) == again


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
      {"name": "gensim", "kind": "pypi", "version": "4.4.0", "sha256": cs._GENSIM.sha256, "file": "gensim.whl"}))
  logs = []
  manifest = bc.build(tmp_path / "out", cache, sources=["lee-news", "pydoc-topics"], log=logs.append, workers=2)
  assert any("with 2 process(es)" in l for l in logs)
  assert set(manifest["sets"]) == {"News (Lee corpus)", "Docs: Python"}
  assert manifest["sources"]["lee-news"]["documents"] == 50 and not offline


# ------------------------------------------------------------------------------------------------
# Hostile and changed inputs: archive members escaping the unpack folder (tar/zip slip), a cached
# archive that changed, an --out folder that monojax did not write.


def _tar(path, entries):
  """A .tar.gz holding (name, kind, payload) entries: kind "file" (payload: text), "symlink" or
  "hardlink" (payload: link target). Names are written as given, '..' and absolute ones too."""
  with tarfile.open(path, "w:gz") as tar:
    for name, kind, payload in entries:
      info = tarfile.TarInfo(name)
      if kind == "file":
        data = payload.encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
      else:
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname = payload
        tar.addfile(info)
  return path


def _zip(path, entries):
  with zipfile.ZipFile(path, "w") as z:
    for name, kind, payload in entries:
      info = zipfile.ZipInfo(name)
      if kind == "symlink":
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
      z.writestr(info, payload)
  return path


def _slip_cases(tmp_path):
  """(archive file name, writer, entries, the bad member): each would put a file (or a link) outside
  the unpack folder CACHE/x/slippkg.tmp-<pid>, at tmp_path/escaped*, if it were unpacked naively."""
  up = "data/" + "../" * 4  # data/.. is the unpack folder; 3 more reach tmp_path (tmp_path/cache/x/...)
  tar, whl = "slippkg-1.0.tar.gz", "slippkg-1.0-py3-none-any.whl"
  ok = ("slippkg-1.0/data/ok.txt", "file", "fine")
  return {
      "tar-dotdot": (tar, _tar, [ok, (f"slippkg-1.0/{up}escaped.txt", "file", "x")], f"slippkg-1.0/{up}escaped.txt"),
      "tar-absolute": (tar, _tar, [ok, (f"{tmp_path}/escaped_abs.txt", "file", "x")], f"{tmp_path}/escaped_abs.txt"),
      "tar-symlink": (tar, _tar, [ok, ("slippkg-1.0/data/link", "symlink", "../" * 5),
                                  ("slippkg-1.0/data/link/escaped_via_link.txt", "file", "x")], "slippkg-1.0/data/link"),
      "tar-symlink-absolute": (tar, _tar, [ok, ("slippkg-1.0/data/etc", "symlink", "/etc")], "slippkg-1.0/data/etc"),
      "tar-hardlink": (tar, _tar, [ok, ("slippkg-1.0/data/passwd", "hardlink", "/etc/passwd")],
                       "slippkg-1.0/data/passwd"),
      "zip-dotdot": (whl, _zip, [("data/ok.txt", "file", "fine"), (f"{up}escaped.txt", "file", "x")], f"{up}escaped.txt"),
      "zip-absolute": (whl, _zip, [("data/ok.txt", "file", "fine"), (f"{tmp_path}/escaped_abs.txt", "file", "x")],
                       f"{tmp_path}/escaped_abs.txt"),
      "zip-symlink": (whl, _zip, [("data/ok.txt", "file", "fine"), ("data/link", "symlink", "../" * 5 + "etc")],
                      "data/link"),
  }


_SLIP_PKG = cs.Package("slippkg", "pypi", "test", spec="slippkg==1.0", members=("data/",))


@pytest.mark.parametrize("case", ["tar-dotdot", "tar-absolute", "tar-symlink", "tar-symlink-absolute", "tar-hardlink",
                                  "zip-dotdot", "zip-absolute", "zip-symlink"])
def test_archive_members_never_land_outside_the_unpack_folder(tmp_path, offline, case):
  name, write, entries, bad = _slip_cases(tmp_path)[case]
  cache = tmp_path / "cache"
  (cache / "pypi").mkdir(parents=True)
  archive = write(cache / "pypi" / name, entries)
  logs = []
  infos, failed = cs.fetch([_SLIP_PKG], cache, logs.append)
  assert not infos and set(failed) == {"slippkg"}
  err = failed["slippkg"]
  assert str(archive) in err and repr(bad) in err and "\n" not in err, err  # one line: archive and member
  assert any(l == f"skipped package slippkg: {err}" for l in logs)
  assert not list(tmp_path.rglob("escaped*")) and not [p for p in tmp_path.rglob("*") if p.is_symlink()]
  assert sorted(p.name for p in (cache / "x").iterdir()) == []  # no marker, no half-unpacked folder


def test_safe_archives_unpack_only_wanted_regular_files(tmp_path, offline):
  cache = tmp_path / "cache"
  (cache / "pypi").mkdir(parents=True)
  _tar(cache / "pypi" / "slippkg-1.0.tar.gz", [  # links inside the folder are fine, and not unpacked
      ("slippkg-1.0/data/a.txt", "file", "alpha"), ("slippkg-1.0/data/sub/b.txt", "file", "beta"),
      ("slippkg-1.0/docs/skip.txt", "file", "unwanted"), ("slippkg-1.0/data/sub/same", "symlink", "../a.txt"),
      ("slippkg-1.0/data/hard", "hardlink", "slippkg-1.0/data/a.txt")])
  infos, failed = cs.fetch([_SLIP_PKG], cache, lambda _: None)
  assert not failed and infos["slippkg"]["file"] == "slippkg-1.0.tar.gz"
  root = cache / "x" / "slippkg"
  assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
      cs.MARKER, "data/a.txt", "data/sub/b.txt"]
  assert (root / "data/sub/b.txt").read_text() == "beta"
  dest = tmp_path / "wheel"
  cs.unpack_members(_zip(tmp_path / "w.whl", [("data/a.txt", "file", "alpha"), ("data/", "file", ""),
                                              ("other/x.txt", "file", "no")]), dest, ("data/",))
  assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["data/a.txt"]


def _fake_pip(monkeypatch, archive_bytes: dict[str, bytes], calls: list):
  """subprocess.run standing in for `pip download`: writes the given archive(s) into its -d folder."""
  def run(cmd, **kwargs):
    assert cmd[1:4] == ["-m", "pip", "download"], cmd
    calls.append(cmd[-1])
    dl = pathlib.Path(cmd[cmd.index("-d") + 1])
    for name, data in archive_bytes.items():
      (dl / name).write_bytes(data)
    return types.SimpleNamespace(returncode=0, stderr="")
  monkeypatch.setattr(cs.subprocess, "run", run)


def test_changed_cached_archive_is_downloaded_again(tmp_path, offline, monkeypatch):
  """A cached archive is checked against the sha256 recorded when it was downloaded: after it
  changes (here: a member rewritten), the next fetch downloads it again instead of unpacking it."""
  cache = tmp_path / "cache"
  good = _tar(tmp_path / "good.tar.gz", [("slippkg-1.0/data/a.txt", "file", "the real text")]).read_bytes()
  calls = []
  _fake_pip(monkeypatch, {"slippkg-1.0.tar.gz": good}, calls)
  infos, failed = cs.fetch([_SLIP_PKG], cache, lambda _: None)
  assert not failed and calls == ["slippkg==1.0"]
  archive = cache / "pypi" / "slippkg-1.0.tar.gz"
  assert infos["slippkg"]["sha256"] == cs.sha256_file(archive)

  _tar(archive, [("slippkg-1.0/data/a.txt", "file", "TAMPERED")])  # the cache changes ...
  shutil.rmtree(cache / "x" / "slippkg")  # ... and the package must be unpacked again
  logs = []
  infos, failed = cs.fetch([_SLIP_PKG], cache, logs.append)
  assert not failed and calls == ["slippkg==1.0"] * 2, logs
  assert any(str(archive) in l and "downloading it again" in l for l in logs)
  assert (cache / "x" / "slippkg" / "data" / "a.txt").read_text() == "the real text"
  assert cs.sha256_file(archive) == infos["slippkg"]["sha256"]


def test_changed_archive_behind_an_unpacked_package_is_fetched_again(tmp_path, offline, monkeypatch):
  """The marker records the sha256 the package was unpacked from: a cached archive that no longer
  has it (or a marker that is not the pinned one) makes fetch() get and unpack the package again."""
  cache = tmp_path / "cache"
  good = _tar(tmp_path / "good.tar.gz", [("slippkg-1.0/data/a.txt", "file", "the real text")]).read_bytes()
  calls = []
  _fake_pip(monkeypatch, {"slippkg-1.0.tar.gz": good}, calls)
  cs.fetch([_SLIP_PKG], cache, lambda _: None)
  archive = cache / "pypi" / "slippkg-1.0.tar.gz"
  archive.write_bytes(archive.read_bytes() + b"appended")
  logs = []
  infos, failed = cs.fetch([_SLIP_PKG], cache, logs.append)
  assert not failed and len(calls) == 2 and archive.read_bytes() == good
  assert any(l.startswith(f"slippkg: {archive}: sha256 ") and "fetching it again" in l for l in logs), logs

  pinned = dataclasses.replace(_SLIP_PKG, sha256=hashlib.sha256(good).hexdigest())
  infos, failed = cs.fetch([pinned], cache, lambda _: None)  # the marker holds the pinned hash: reused
  assert not failed and len(calls) == 2
  other = dataclasses.replace(_SLIP_PKG, sha256="0" * 64)
  cs.fetch([other], cache, logs.append)  # a new pin: the unpacked package is stale
  assert any("not the pinned " + "0" * 64 in l for l in logs)


def test_pinned_sha256_is_checked_on_download_and_reuse(tmp_path, offline, monkeypatch):
  cache = tmp_path / "cache"
  good = _tar(tmp_path / "good.tar.gz", [("slippkg-1.0/data/a.txt", "file", "the real text")]).read_bytes()
  bad = _tar(tmp_path / "bad.tar.gz", [("slippkg-1.0/data/a.txt", "file", "something else")]).read_bytes()
  pinned = dataclasses.replace(_SLIP_PKG, sha256=hashlib.sha256(good).hexdigest())
  calls = []
  _fake_pip(monkeypatch, {"slippkg-1.0.tar.gz": bad}, calls)  # the index serves another file
  infos, failed = cs.fetch([pinned], cache, lambda _: None)
  archive = cache / "pypi" / "slippkg-1.0.tar.gz"
  assert not infos and failed["slippkg"] == (f"{archive}: sha256 {hashlib.sha256(bad).hexdigest()} is not the "
                                             f"pinned sha256 {pinned.sha256}")
  assert not archive.exists() and not (cache / "x" / "slippkg").exists()  # never unpacked, never reused

  (cache / "pypi" / "slippkg-1.0.tar.gz").write_bytes(bad)  # a cached file that is not the pinned one
  _fake_pip(monkeypatch, {"slippkg-1.0.tar.gz": good}, calls)
  logs = []
  infos, failed = cs.fetch([pinned], cache, logs.append)
  assert not failed and infos["slippkg"]["sha256"] == pinned.sha256 and len(calls) == 2
  assert any("is not the pinned sha256" in l and "downloading it again" in l for l in logs)
  assert all(p.sha256 for s in cs.SOURCES for p in s.packages if p.kind == "pypi")  # registry archives pinned


def test_changed_cached_deb_is_downloaded_again(tmp_path, offline, monkeypatch):
  """Same for a .deb: checked against the sha256 recorded when apt-get downloaded it."""
  cache = tmp_path / "cache"
  debs = cache / "debs"
  debs.mkdir(parents=True)
  deb = debs / "fortunes_1.0_all.deb"
  downloads = []

  def fake_apt(names, folder):
    downloads.extend(names)
    deb.write_bytes(b"!<arch>\n" + b"the real package")
    return True, ""
  monkeypatch.setattr(cs, "_apt_download", fake_apt)
  monkeypatch.setattr(cs, "_unpack_deb_python", lambda d, dest: (dest / "usr").mkdir())
  monkeypatch.setattr(cs.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
  pkg = cs.Package("fortunes", "deb", "BSD")
  infos, failed = cs.fetch([pkg], cache, lambda _: None)
  assert not failed and downloads == ["fortunes"]
  assert json.loads((debs / cs.SUMS).read_text()) == {deb.name: infos["fortunes"]["sha256"]}
  deb.write_bytes(b"!<arch>\n" + b"tampered")
  (cache / "x" / "fortunes" / cs.MARKER).unlink()
  logs = []
  infos, failed = cs.fetch([pkg], cache, logs.append)
  assert not failed and downloads == ["fortunes"] * 2
  assert any(str(deb) in l and "downloading it again" in l for l in logs), logs
  assert infos["fortunes"]["sha256"] == cs.sha256_file(deb)


def _tree(root: pathlib.Path) -> dict:
  return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("foreign", ["manifest-and-train", "train-only", "other-format", "forged-builder", "symlink"])
def test_out_not_written_by_monojax_is_left_untouched(tmp_path, offline, foreign):
  cache = _fake_cache(tmp_path / "cache")
  out = tmp_path / "data"
  (out / "train").mkdir(parents=True)
  (out / "train" / "mine.jsonl.zst").write_bytes(b"someone's shard")
  (out / "notes.txt").write_text("mine")
  manifests = {"manifest-and-train": {"name": "my dataset", "files": ["train/mine.jsonl.zst"]},
               "other-format": {"format": "monojax-corpus/0", "builder": bc.BUILDER, "complete": True},
               "forged-builder": {"format": bc.FORMAT, "builder": bc.BUILDER}}  # not the format's keys
  if foreign in manifests:
    (out / "manifest.json").write_text(json.dumps(manifests[foreign]))
  if foreign == "symlink":
    link = tmp_path / "link"
    link.symlink_to(out)
    out = link
  before = _tree(tmp_path / "data")
  with pytest.raises(bc.NotOurFolderError) as e:
    bc.build(out, cache, sources=_test_sources()[:2], log=lambda _: None, workers=1)
  assert str(out) in str(e.value) and "\n" not in str(e.value) and isinstance(e.value, errors.UserInputError)
  with pytest.raises(bc.NotOurFolderError):
    bc.ensure_corpus(out, cache, log=lambda _: None, sources=_test_sources()[:2], workers=1)
  assert _tree(tmp_path / "data") == before
  assert not list(tmp_path.glob("data.tmp-*")) and not list(tmp_path.glob("link.tmp-*"))


def test_what_counts_as_a_corpus_monojax_wrote(tmp_path, offline):
  cache = _fake_cache(tmp_path / "cache")
  out = tmp_path / "corpus"
  manifest = bc.build(out, cache, sources=_test_sources()[:2], log=lambda _: None, workers=1)
  assert bc.written_by_monojax(out)
  legacy = {k: v for k, v in manifest.items() if k in bc.MANIFEST_KEYS}  # built before "builder" existed
  (out / "manifest.json").write_text(json.dumps(legacy))
  assert bc.written_by_monojax(out)
  for bad in ({**legacy, "extra": 1}, {**manifest, "builder": "someone else"}, [manifest], {"format": bc.FORMAT}):
    (out / "manifest.json").write_text(json.dumps(bad))
    assert not bc.written_by_monojax(out), bad
  (out / "manifest.json").write_text("{not json")
  assert not bc.written_by_monojax(out)
  assert not bc.written_by_monojax(tmp_path / "nowhere")

  empty = tmp_path / "empty"
  empty.mkdir()
  (tmp_path / "empty.tmp-notapid").mkdir()  # not a temp folder this builder names: kept
  bc.build(empty, cache, sources=_test_sources()[:2], log=lambda _: None, workers=1)  # an empty --out is fine
  assert bc.load_complete_manifest(empty) is not None and (tmp_path / "empty.tmp-notapid").is_dir()


# ------------------------------------------------------------------------------------------------
# The analysis split


def _old_split_val(docs):
  """split_val as it was before the analysis split existed (the val rule it must not change)."""
  train, val = [], []
  for d in docs:
    (val if int.from_bytes(tc.text_hash(d[0])[:8], "big") % 100 < 1 else train).append(d)
  if not val and len(train) >= 2:
    val.append(train.pop(min(range(len(train)), key=lambda i: int.from_bytes(tc.text_hash(train[i][0])[:8], "big"))))
  return train, val


def _docs(n, seed=0):
  rng = random.Random(seed)
  return [(f"document {i}: " + " ".join(rng.choice("abcdefgh") for _ in range(30)), {"id": str(i)})
          for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 40, 3000])
def test_analysis_split_keeps_val_and_takes_a_disjoint_hash_range(n):
  docs = _docs(n)
  train, val, analysis = bc.split_analysis(docs)
  old_train, old_val = _old_split_val(docs)
  assert val == old_val  # the very same val documents, in the same order
  assert set(map(str, train)) | set(map(str, analysis)) == set(map(str, old_train))
  assert not set(map(str, train)) & set(map(str, analysis))
  assert train == [d for d in old_train if d not in analysis] and analysis == [d for d in old_train if d in analysis]
  if len(old_train) >= 3:
    assert analysis  # at least one, even in a small set
  if n == 3000:  # ~ANALYSIS_PERCENT% by the hash range next to val's
    assert 0.02 * n < len(analysis) < 0.04 * n
    assert bc.split_analysis(list(reversed(docs)))[2] == list(reversed(analysis))  # chosen by text, not position
    for t, _ in analysis:
      assert bc.VAL_PERCENT <= bc._hash_int(t) % 100 < bc.VAL_PERCENT + bc.ANALYSIS_PERCENT


def test_build_writes_an_analysis_split_never_trained_or_evaluated_on(tmp_path, offline):
  cache = _fake_cache(tmp_path / "cache")
  out = tmp_path / "corpus"
  manifest = bc.build(out, cache, sources=_test_sources(), log=lambda _: None, workers=1)
  assert manifest["analysis_percent"] == bc.ANALYSIS_PERCENT and manifest["val_percent"] == bc.VAL_PERCENT
  totals = {"documents": 0, "bytes": 0}
  for name, info in manifest["sets"].items():
    read = lambda split: [r for s in info[split]["shards"] for _, r in pile_io.read_records(out / s["path"])]
    train, val, analysis = read("train"), read("val"), read("analysis")
    assert [s["path"] for s in info["analysis"]["shards"]] == [f"analysis/{bc.set_slug(name)}.jsonl.zst"]
    assert len(analysis) == info["analysis"]["documents"] >= 1
    assert info["analysis"]["bytes"] == sum(len(r["text"].encode()) for r in analysis)
    texts = {split: {r["text"] for r in recs} for split, recs in
             (("train", train), ("val", val), ("analysis", analysis))}
    assert len(texts["analysis"]) == len(analysis)  # never repeated, even in an upsampled set
    assert not texts["analysis"] & texts["train"] and not texts["analysis"] & texts["val"]
    assert all(r["meta"]["pile_set_name"] == name for r in analysis)
    # val is what the old rule picks from the set's documents; train lost the analysis documents
    everything = [(r["text"], r["meta"]) for r in train[:info["unique_train"]["documents"]] + val + analysis]
    assert {t for t, _ in _old_split_val(everything)[1]} == texts["val"]
    assert info["unique_train"]["documents"] == len(texts["train"])
    for k in totals:
      totals[k] += info["analysis"][k]
  assert manifest["totals"]["analysis"] == totals
  assert bc.load_complete_manifest(out) == manifest and bc.written_by_monojax(out)
  assert "an. docs" in bc.summary(manifest)

  # A lost analysis shard makes the corpus incomplete; a manifest from before the split (no
  # "analysis" anywhere) is still a complete corpus, and one this builder wrote.
  (out / manifest["sets"]["Docs: Python"]["analysis"]["shards"][0]["path"]).rename(tmp_path / "moved")
  assert bc.load_complete_manifest(out) is None
  old = json.loads(json.dumps(manifest))
  del old["analysis_percent"], old["totals"]["analysis"]
  for info in old["sets"].values():
    del info["analysis"]
  (out / "manifest.json").write_text(json.dumps(old))
  assert bc.load_complete_manifest(out) == old and bc.written_by_monojax(out)
  assert "an. docs" in bc.summary(old)


def test_default_corpus_dir_is_v2():
  from monojax.data import sources
  assert sources.DEFAULT_CORPUS_DIR.endswith("/debmix-v2")  # v1 corpora have no analysis/: a fresh build
