"""Corpus text shown to people. Everything monojax writes for a reader (Markdown, console lines,
HTML) passes corpus text through one of these, because that text is untrusted: it can hold terminal
escape sequences, bidi overrides, HTML, Markdown links and backticks.

  visible(s)        control and invisible characters as visible escapes; other Unicode kept as is
  console(s)        visible() line by line: the newlines of a multi-line message survive
  markdown_code(s)  an inline code span that no character of s can close (so no HTML, link or
                    emphasis can come from s), of visible(s)
  html(s)           visible(s) with &, <, >, " and ' escaped: safe as element text and attribute value

Escapes look like Python's: `\\x1b` (ESC), `\\r`, `\\x00`, `\\u202e` (RIGHT-TO-LEFT OVERRIDE),
`\\u200b` (ZERO WIDTH SPACE); a newline shows as `⏎` and a tab as `⇥`. A backslash in the text is
left as it is (code is full of them), so `\\x1b` on screen is either the escape or those four
characters, never a live ESC.
"""
from __future__ import annotations

import html as _html
import re
import unicodedata

NEWLINE = "⏎"
TAB = "⇥"
_NAMED = {"\n": NEWLINE, "\t": TAB, "\r": "\\r"}
# Unicode categories never shown raw: Cc controls (C0, DEL, C1 incl. CSI), Cf format characters
# (bidi embeddings/overrides/isolates U+202A-U+202E and U+2066-U+2069, LRM/RLM, zero-width space,
# joiners, word joiner, BOM, soft hyphen, tag characters), Zl/Zp line and paragraph separators,
# Cs lone surrogates.
_HIDDEN_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))
_MAYBE_HIDDEN = re.compile("[^\u0020-\u007e\u00a0-\u00ac\u00ae-\u05ff]")  # fast path: plain text passes


def _escape(ch: str) -> str:
  if ch in _NAMED:
    return _NAMED[ch]
  if unicodedata.category(ch) not in _HIDDEN_CATEGORIES:
    return ch
  code = ord(ch)
  if code <= 0xFF:
    return f"\\x{code:02x}"
  if code <= 0xFFFF:
    return f"\\u{code:04x}"
  return f"\\U{code:08x}"


def visible(s: str) -> str:
  """s with every control, format (bidi, zero-width) and line-separator character replaced by a
  visible escape; letters, symbols, spaces and emoji of any script are kept."""
  return _MAYBE_HIDDEN.sub(lambda m: _escape(m.group()), str(s))


def console(s: str) -> str:
  """visible() of each line of a multi-line message: its "\\n" line breaks are kept, nothing else
  that a terminal would act on (ESC, CR, bidi controls) is."""
  return "\n".join(visible(line) for line in str(s).split("\n"))


def markdown_code(s: str, *, table: bool = False) -> str:
  """visible(s) as a CommonMark inline code span: the fence is one backtick longer than the longest
  backtick run in the text, and a space pads each side (CommonMark strips exactly one from each, so
  leading/trailing backticks and spaces show). Inside it `<`, `[`, `*`, `_` and `&` are literal.

  table=True also escapes "|" as "\\|", which a GFM table cell needs even inside code (the renderer
  shows a plain "|"); leave it off outside tables, where "\\|" would show as two characters."""
  body = visible(s)
  if table:
    body = body.replace("|", "\\|")
  longest = max((len(run) for run in re.findall("`+", body)), default=0)
  fence = "`" * (longest + 1)
  return f"{fence} {body} {fence}"


def html(s: str) -> str:
  """visible(s) escaped for HTML element text or a quoted attribute value."""
  return _html.escape(visible(s), quote=True)
