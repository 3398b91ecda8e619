"""monojax/text.py on hostile corpus text (tests/fixtures/hostile.json): terminal escapes, bidi
overrides and zero-width characters become visible escapes; Markdown code spans and HTML text hold
exactly the visible text, whatever backticks, tags, links or pipes it contains."""
import html
import html.parser
import json
import pathlib
import unicodedata

import pytest

from monojax import text

HOSTILE = json.loads(pathlib.Path(__file__).with_name("fixtures").joinpath("hostile.json").read_text(encoding="utf-8"))
HIDDEN = ("Cc", "Cf", "Zl", "Zp", "Cs")


def _hidden(s: str) -> list[str]:
  return [f"U+{ord(c):04X}" for c in s if unicodedata.category(c) in HIDDEN]


def test_fixtures_cover_the_finding():
  joined = "".join(HOSTILE.values())
  for needle in ("<script", "</script>", "onerror=", "javascript:", "\x1b[", "\r", "\x00", "\u202e", "\u200b",
                 "```", "|"):
    assert needle in joined, needle
  assert max(map(len, HOSTILE.values())) > 1000


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_visible_leaves_no_control_or_invisible_character(name):
  out = text.visible(HOSTILE[name])
  assert not _hidden(out), _hidden(out)
  assert "\n" not in out and "\r" not in out and "\x1b" not in out
  assert text.visible(out) == out  # escapes are plain text: escaping twice changes nothing


def test_visible_escapes():
  assert text.visible("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
  assert text.visible("ok\rEVIL") == "ok\\rEVIL"
  assert text.visible("a\x00b\x7f\x9b") == "a\\x00b\\x7f\\x9b"
  assert text.visible("invoice\u202egnp.exe") == "invoice\\u202egnp.exe"
  assert text.visible("\u2066x\u2069\u200b\ufeff\u00ad") == "\\u2066x\\u2069\\u200b\\ufeff\\xad"
  assert text.visible("a\u2028b") == "a\\u2028b"
  assert text.visible("\U000e0041") == "\\U000e0041"  # a tag character
  assert text.visible("one\ntwo\tthree") == "one⏎two⇥three"


def test_visible_keeps_ordinary_text():
  for s in (HOSTILE["unicode_text"], "<b>not escaped here</b> & `ticks` | pipes", "x" * 1000, ""):
    assert text.visible(s) == s


def test_console_keeps_only_line_breaks():
  out = text.console("line \x1b[2J one\nline\r two\n")
  assert out == "line \\x1b[2J one\nline\\r two\n"


class _Tags(html.parser.HTMLParser):
  """Every start tag (with its attributes) and all text of an HTML fragment."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags, self.data = [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, attrs))

  def handle_startendtag(self, tag, attrs):
    self.tags.append((tag, attrs))

  def handle_data(self, data):
    self.data.append(data)


def _parse(fragment: str) -> _Tags:
  p = _Tags()
  p.feed(fragment)
  p.close()
  return p


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_html_is_text_only(name):
  s = HOSTILE[name]
  out = text.html(s)
  assert not set(out) & set("<>\"'")
  parsed = _parse(f'<div title="{out}">{out}</div>')
  assert parsed.tags == [("div", [("title", text.visible(s))])]  # one element, one attribute: ours
  assert "".join(parsed.data) == text.visible(s)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_markdown_code_fence_cannot_be_closed(name):
  s = text.visible(HOSTILE[name])
  span = text.markdown_code(HOSTILE[name])
  fence = span[:len(span) - len(span.lstrip("`"))]
  assert span == f"{fence} {s} {fence}"
  assert fence not in s and "\n" not in span


def _markdown():
  markdown_it = pytest.importorskip("markdown_it")
  return markdown_it.MarkdownIt("commonmark", {"html": True})  # raw HTML on: the worst viewer


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_markdown_code_renders_as_exactly_the_visible_text(name):
  s = HOSTILE[name]
  rendered = _markdown().render("see " + text.markdown_code(s) + " here")
  parsed = _parse(rendered)
  assert [t for t, _ in parsed.tags] == ["p", "code"] and all(not a for _, a in parsed.tags), rendered
  assert "".join(parsed.data) == f"see {text.visible(s)} here\n"
  low = rendered.lower()
  assert "<script" not in low and "<img" not in low and "<a " not in low and 'href="javascript:' not in low


def test_markdown_code_in_a_table_cell():
  md = _markdown().enable("table")
  for name in ("pipes", "backtick_runs", "md_link_js", "img_onerror"):
    s = HOSTILE[name]
    rendered = md.render(f"| context |\n|---|\n| {text.markdown_code(s, table=True)} |\n")
    parsed = _parse(rendered)
    assert [t for t, _ in parsed.tags if t in ("td", "code")] == ["td", "code"], rendered  # one cell
    assert html.unescape(rendered.split("<code>")[1].split("</code>")[0]) == text.visible(s)
