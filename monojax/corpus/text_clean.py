"""Text cleaners for the default corpus: markup strippers, long-document splitting, dedupe, filters.

Everything here is pure Python (stdlib only, no jax) and works on `str`. The markup strippers are
deliberately regex-level: they aim at readable prose for language modelling, not exact rendering.
"""
from __future__ import annotations

import hashlib
import html
import html.parser
import re
import unicodedata
from typing import Iterable, Iterator

SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # GPT-NeoX specials that must not appear literally
MAX_DOC_CHARS = 32_000
MIN_DOC_CHARS = 200

# ------------------------------------------------------------------------------------------------
# Generic normalisation and filters

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TRAILING_WS_RE = re.compile(r"[ \t]+\n")
_MANY_BLANKS_RE = re.compile(r"\n{3,}")


def remove_special_tokens(text: str) -> str:
  """Removes literal tokenizer specials: NeoX would encode them as the EOS/pad token."""
  for tok in SPECIAL_TOKENS:
    text = text.replace(tok, "")
  return text


def normalize(text: str) -> str:
  """Unix newlines, no control characters, no trailing spaces, at most one blank line in a row."""
  text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
  text = _CONTROL_RE.sub("", text)
  text = _TRAILING_WS_RE.sub("\n", text + "\n")
  return _MANY_BLANKS_RE.sub("\n\n", text).strip("\n").rstrip()


_LETTER_RUN_RE = re.compile(r"[^\W\d_]+")  # runs of word characters that are not digits or underscore
_ASCII_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_JUNK_RE = re.compile("[\ufffd\ue000-\uf8ff]")


def _sample(text: str, size: int = 30_000) -> str:
  """Up to three windows (start, middle, end): enough for ratios, cheap for megabyte documents."""
  if len(text) <= 3 * size:
    return text
  mid = len(text) // 2
  return text[:size] + text[mid - size // 2:mid + size // 2] + text[-size:]


def letter_ratio(text: str) -> float:
  """Share of letters among non-whitespace characters (CJK ideographs count as letters)."""
  text = _sample(text)
  nonspace = len("".join(text.split()))
  if not nonspace:
    return 0.0
  if text.isascii():  # fast path in C: count what bytes.translate deletes
    raw = text.encode("ascii")
    return (len(raw) - len(raw.translate(None, _ASCII_LETTERS))) / nonspace
  return sum(map(len, _LETTER_RUN_RE.findall(text))) / nonspace


def junk_ratio(text: str) -> float:
  """Share of replacement and private-use characters: a sign of binary or mis-decoded data."""
  if text.isascii():
    return 0.0
  return len(_JUNK_RE.findall(text)) / max(1, len(text))


_NUMERIC_ROW_RE = re.compile(r"^[ \t]*(?=[0-9A-Fa-f]*\d)[0-9A-Fa-f]+[ \t,]+(?=[0-9A-Fa-f]*\d)[0-9A-Fa-f]+\b", re.M)


def numeric_row_ratio(text: str) -> float:
  """Share of non-empty lines that start with two numbers: code-point and other number tables."""
  lines = [l for l in text.split("\n") if l.strip()]
  candidates = "\n".join(l for l in lines if l.lstrip()[:1].isdigit() or l.lstrip()[:1] in "ABCDEFabcdef")
  return len(_NUMERIC_ROW_RE.findall(candidates)) / max(1, len(lines))


def drop_reason(text: str, min_chars: int = MIN_DOC_CHARS, min_letter_ratio: float = 0.5) -> str | None:
  """Why a (normalized) document should be dropped, or None to keep it."""
  if len(text) < min_chars:
    return "short"
  if junk_ratio(text) > 0.001:
    return "binary"
  if letter_ratio(text) < min_letter_ratio:
    return "letter_ratio"
  if numeric_row_ratio(text) > 0.3:
    return "number_table"
  return None


def text_hash(text: str) -> bytes:
  """Exact-duplicate key: whitespace at the ends does not make two documents different."""
  return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).digest()


class Deduper:
  """Exact dedupe by hash; `first(text)` is True the first time a text is seen."""

  def __init__(self):
    self._seen: set[bytes] = set()
    self.duplicates = 0

  def first(self, text: str) -> bool:
    key = text_hash(text)
    if key in self._seen:
      self.duplicates += 1
      return False
    self._seen.add(key)
    return True


def dedupe(texts: Iterable[str]) -> Iterator[str]:
  """Yields each distinct text once, in first-seen order."""
  seen = Deduper()
  return (t for t in texts if seen.first(t))


# ------------------------------------------------------------------------------------------------
# Long documents

_WS_RUN_RE = re.compile(r"\s+")


def _split_point(window: str, min_pos: int, max_pos: int) -> int:
  """Best cut index in `window` (cut before window[i]); breaks paragraphs, then lines, then words."""
  for sep in ("\n\n", "\n"):
    pos = window.rfind(sep)
    if pos >= min_pos:
      return pos
  last = None
  for m in _WS_RUN_RE.finditer(window, 1):
    last = m.start()
  return last if last else min(len(window), max_pos)


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
  """Splits text into pieces of at most max_chars characters.

  Cuts prefer paragraph breaks, then line breaks, then any whitespace; only the whitespace at a cut
  is dropped, so the pieces joined by their original separators give back the text. A text with no
  whitespace at all is cut hard at max_chars.
  """
  pieces = []
  rest = text
  while len(rest) > max_chars:
    cut = _split_point(rest[:max_chars + 1], max_chars // 4, max_chars)
    head, rest = rest[:cut].rstrip(), rest[cut:].lstrip()
    if head:
      pieces.append(head)
  if rest.strip() or not pieces:
    pieces.append(rest)
  return pieces


# ------------------------------------------------------------------------------------------------
# roff (man pages)

_ROFF_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "bu": "\u2022", "aq": "'", "dq": '"', "lq": "\u201c",
    "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
    "mu": "\u00d7", "di": "\u00f7", "de": "\u00b0", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265",
    "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "ha": "^", "ti": "~", "rs": "\\", "sl": "/",
    "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "ga": "`", "aa": "\u00b4",
    "ss": "\u00df", "sc": "\u00a7", "ps": "\u00b6", "ba": "|", "br": "|", "ul": "_", "ru": "_",
    "pl": "+", "mi": "-", "eq": "=", "**": "*", "lh": "\u261c", "rh": "\u261e", "Eu": "\u20ac",
    "eu": "\u20ac", "Po": "\u00a3", "ct": "\u00a2", "Ye": "\u00a5", "at": "@", "sh": "#", "Do": "$",
    "ua": "\u2191", "da": "\u2193", "<>": "\u2194", "if": "\u221e", "pi": "\u03c0", "*m": "\u00b5",
    "12": "\u00bd", "14": "\u00bc", "34": "\u00be", "S1": "\u00b9", "S2": "\u00b2", "S3": "\u00b3",
    "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "\u27e8", "ra": "\u27e9", "or": "|", "no": "\u00ac",
}
_ROFF_ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327",
                 "o": "\u030a", "v": "\u030c"}
_ROFF_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122", "(Tm": "\u2122"}
_ROFF_ESC_RE = re.compile(
    r"\\(?:\((?P<two>..)|\[(?P<long>[^\]]*)\]|\*(?:\((?P<s2>..)|\[(?P<sl>[^\]]*)\]|(?P<s1>.))"
    r"|f(?:\(..|\[[^\]]*\]|.)|s[-+]?(?:\d|\(\d\d|\[\d+\])|[mMF](?:\(..|\[[^\]]*\]|.)"
    r"|[hvwlLoxNbDRZ]'[^']*'|[kz].|n(?:\(..|\[[^\]]*\]|[-+]?.)|(?P<one>.))")
_ROFF_ONE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "\u00b4", "`": "`",
             ".": ".", "t": "\t", "_": "_", "%": "", "&": "", "|": "", "^": "", "c": "", ":": "",
             "/": "", ",": "", "!": "", "\"": "", "#": "", "{": "", "}": "", "d": "", "u": "", "r": "", "p": ""}
_FONT_MACROS = {"B", "I", "SM", "SB", "BR", "RB", "BI", "IB", "IR", "RI", "CW", "CR", "RC"}
_BREAK_MACROS = {"PP", "P", "LP", "sp", "HP", "RS", "RE", "PD", "ne", "in", "ti", "TQ", "SY", "YS", "OP",
                 "EX", "EE", "nf", "fi", "TP", "IP", "bp"}
_ARG_RE = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')


def _roff_glyph(name: str) -> str:
  if name in _ROFF_CHARS:
    return _ROFF_CHARS[name]
  if name.startswith(("u", "char")):  # \[u00E9] or \[char233]
    try:
      return chr(int(name[1:].split("_")[0], 16)) if name[0] == "u" else chr(int(name[4:]))
    except ValueError:
      return ""
  if len(name) == 2 and name[0] in _ROFF_ACCENTS:  # \(:a style accented letters
    return unicodedata.normalize("NFC", name[1] + _ROFF_ACCENTS[name[0]])
  return ""


def roff_unescape(s: str) -> str:
  """Decodes roff escapes (`\\fB`, `\\-`, `\\(em`, `\\[u00E9]`, `\\*(lq`, ...) in one text line."""
  def sub(m: re.Match) -> str:
    if m.group("two") is not None:
      return _roff_glyph(m.group("two"))
    if m.group("long") is not None:
      return _roff_glyph(m.group("long"))
    for g in ("s2", "sl", "s1"):
      if m.group(g) is not None:
        return _ROFF_STRINGS.get(m.group(g), "")
    if m.group("one") is not None:
      return _ROFF_ONE.get(m.group("one"), m.group("one"))
    return ""  # font, size, motion and other layout escapes
  return _ROFF_ESC_RE.sub(sub, s)


def _roff_args(rest: str) -> list[str]:
  return [(q.replace('""', '"') if q is not None and w == "" else w) for q, w in _ARG_RE.findall(rest)]


def strip_roff(src: str) -> str:
  """Renders man(7) roff source to plain text: fill-mode lines become paragraphs, no-fill kept."""
  blocks: list[list[str]] = []  # each block is a list of lines, blocks are joined by blank lines
  block: list[str] = []
  words: list[str] = []
  fill, skip_until, tag_pending = True, None, False
  table: dict | None = None

  def end_line():
    nonlocal words
    if words:
      block.append(" ".join(words))
      words = []

  def end_block():
    nonlocal block
    end_line()
    if block:
      blocks.append(block)
      block = []

  def add_text(text: str):
    nonlocal tag_pending
    if tag_pending and text.strip():  # the line after .TP is the tag: a line of its own
      end_line()
      block.append(text.strip())
      tag_pending = False
    elif not fill:
      end_line()
      block.append(text.rstrip())
    elif text.strip():
      words.append(text.strip())
    else:
      end_block()

  lines = re.sub(r"\\\n", "", src).split("\n")  # escaped newline: continuation
  for line in lines:
    if skip_until is not None:
      if skip_until in line:
        skip_until = None
      continue
    if line.startswith((".\\\"", "'\\\"", "\\\"")) or line.strip() in (".", "'"):
      continue
    if table is not None:
      if line.startswith(".TE"):
        table = None
        end_block()
      elif not table["format_done"]:
        if ";" in line and "tab(" in line:
          m = re.search(r"tab\s*\((.)\)", line)
          table["tab"] = m.group(1) if m else "\t"
        if line.rstrip().endswith("."):
          table["format_done"] = True
      elif not line.startswith((".", "'")) and line.strip() not in ("_", "=", "T}", "T{"):
        cells = [roff_unescape(c).replace("T{", "").replace("T}", "").strip() for c in line.split(table["tab"])]
        end_line()
        block.append("  ".join(c for c in cells if c))
      continue
    if line[:1] in (".", "'"):
      m = re.match(r"[.']\s*(\S+)\s*(.*)", line)
      if not m:
        continue
      name, rest = m.group(1), m.group(2)
      if name in ("SH", "SS"):
        end_block()
        blocks.append([roff_unescape(" ".join(_roff_args(rest))).strip()])
      elif name in _FONT_MACROS:
        args = [roff_unescape(a) for a in _roff_args(rest)]
        add_text((" " if len(name) == 1 or name in ("SM", "SB") else "").join(args))
      elif name in _BREAK_MACROS:
        end_block()
        fill = {"nf": False, "EX": False, "fi": True, "EE": True}.get(name, fill)
        tag_pending = name in ("TP", "TQ")
        if name == "IP" and rest:
          tag = roff_unescape((_roff_args(rest) or [""])[0]).strip()
          if tag:
            words.append(tag)
      elif name == "br":
        end_line()
      elif name == "TS":
        end_block()
        table = {"tab": "\t", "format_done": False}
      elif name in ("UR", "MT"):
        pass  # the link text follows; the URL itself adds no prose
      elif name in ("de", "ig"):
        skip_until = ".."
      elif name in ("if", "ie", "el") and "\\{" in rest and "\\}" not in rest:
        skip_until = "\\}"
      elif name == "so":
        return ""  # a redirect page: no content of its own
    else:
      add_text(roff_unescape(line))
  end_block()
  return "\n\n".join("\n".join(b) for b in blocks)


# ------------------------------------------------------------------------------------------------
# reStructuredText (Sphinx sources)

_REST_ADMONITIONS = {"note": "Note:", "warning": "Warning:", "important": "Important:", "tip": "Tip:",
                     "hint": "Hint:", "caution": "Caution:", "attention": "Attention:", "danger": "Danger:",
                     "error": "Error:", "seealso": "See also:", "impl-detail": "CPython implementation detail:"}
_REST_VERSION = {"versionadded": "New in version", "versionchanged": "Changed in version",
                 "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version"}
_REST_DROP_BODY = {"toctree", "index", "image", "figure", "kernel-doc", "kernel-feat", "kernel-abi",
                   "kernel-include", "include", "literalinclude", "raw", "only", "csv-table", "contents",
                   "flat-table", "tabularcolumns", "testsetup", "testcleanup", "highlight", "sectionauthor",
                   "moduleauthor", "codeauthor", "audit-event", "audit-event-table", "cssclass", "math",
                   "graphviz", "digraph", "productionlist", "miscnews", "program", "currentmodule",
                   "module", "default-role", "role", "meta", "include-kernel-doc", "maintainers-include",
                   "SPDX-License-Identifier", "sectnum", "cpp:namespace", "c:namespace-push", "c:namespace-pop",
                   "availability", "limited-api-list", "pypi", "spelling", "kfigure", "kernel-render",
                   "kernel-figure", "dot", "replace", "unicode", "date", "default-domain", "autosummary",
                   "automodule", "epigraph"}  # other directives keep their argument (signatures, titles)
_REST_DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+(?:\|[^|]+\|\s+)?([\w:-]+)::\s?(.*)$")
_REST_COMMENT_RE = re.compile(r"^(\s*)\.\.(\s|$)")
_REST_UNDERLINE_RE = re.compile(r"^\s*([=\-~^*#\"'+`:.])\1{2,}\s*$")
_REST_OPTION_RE = re.compile(r"^\s*:[\w -]+:")
_REST_GRID_RE = re.compile(r"^\s*(\+[-=+]+\+|=+(\s+=+)+|-+(\s+-+)+)\s*$")  # table borders
_REST_ROLE_RE = re.compile(r":(?:[\w-]+:)*([\w-]+):`([^`]+)`")
_REST_ROLE_PREFIX = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-", "cve": "CVE-", "cwe": "CWE-"}
_REST_LINK_RE = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_REST_FOOTREF_RE = re.compile(r"\s?\[(?:#\w*|\*|\d+)\]_")


def _rest_role_text(m: re.Match) -> str:
  role, inner = m.group(1), m.group(2)
  if role in _REST_ROLE_PREFIX and inner.isdigit():
    return _REST_ROLE_PREFIX[role] + inner
  titled = re.match(r"(.*?)\s*<[^<>]*>$", inner, re.S)
  if titled and titled.group(1):
    return titled.group(1)
  inner = inner.lstrip("!")
  if inner.startswith("~"):  # ~a.b.c shows only the last component
    inner = inner[1:].rsplit(".", 1)[-1]
  return inner


_REST_LITERAL_RE = re.compile(r"``([^`]+?)``")
_REST_INTERPRETED_RE = re.compile(r"`([^`]+)`_{0,2}")
_REST_STRONG_RE = re.compile(r"(?<![\w*])\*\*([^\s*](?:[^*]*?[^\s*])?)\*\*(?![\w*])")
_REST_EMPH_RE = re.compile(r"(?<![\w*\\])\*([^\s*](?:[^*]*?[^\s*])?)\*(?![\w*])")
_REST_SUBST_RE = re.compile(r"\|(\w[\w -]*)\|")
_REST_MARKUP_CHARS = re.compile(r"[`*|\]\\]")


def rest_inline(line: str) -> str:
  """Removes inline reST markup: roles, links, literals, emphasis, footnote references."""
  if not _REST_MARKUP_CHARS.search(line):
    return line
  if "`" in line:
    line = _REST_ROLE_RE.sub(_rest_role_text, line)
    line = _REST_LINK_RE.sub(lambda m: m.group(1), line)
    line = _REST_LITERAL_RE.sub(r"\1", line)
    line = _REST_INTERPRETED_RE.sub(r"\1", line)
  if "]_" in line:
    line = _REST_FOOTREF_RE.sub("", line)
  if "*" in line:
    line = _REST_STRONG_RE.sub(r"\1", line)
    line = _REST_EMPH_RE.sub(r"\1", line)
  if "|" in line:
    line = _REST_SUBST_RE.sub(r"\1", line)
  return line.replace("\\ ", "")  # escaped space: joins markup to a word


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


_LITERAL_MARK = "\x00"  # prefixes literal-block lines inside clean_rest


def clean_rest(src: str) -> str:
  """Turns Sphinx reST into plain text, keeping titles, prose, signatures and code blocks."""
  out: list[str] = []
  lines = src.replace("\t", "    ").replace(_LITERAL_MARK, "").split("\n")
  i, n = 0, len(lines)
  in_literal = None  # indentation of the paragraph that introduced a literal block
  while i < n:
    line = lines[i]
    stripped = line.strip()
    if in_literal is not None:
      if stripped and _indent(line) <= in_literal:
        in_literal = None
      else:
        out.append(_LITERAL_MARK + line.rstrip())
        i += 1
        continue
    m = _REST_DIRECTIVE_RE.match(line)
    if m:
      ind, name, arg = len(m.group(1)), m.group(2), m.group(3).strip()
      i += 1
      while arg.endswith("\\") and i < n:  # signature continued on the next line
        arg = arg[:-1].rstrip() + " " + lines[i].strip()
        i += 1
      while i < n and _REST_OPTION_RE.match(lines[i]) and _indent(lines[i]) > ind:
        i += 1  # directive options (:synopsis:, :maxdepth: ...)
      if name in _REST_DROP_BODY or name.startswith("SPDX"):
        while i < n and (not lines[i].strip() or _indent(lines[i]) > ind):
          i += 1
        out.append("")
      elif name in _REST_VERSION:
        out.append(" " * ind + f"{_REST_VERSION[name]} {arg}".rstrip() + ".")
      elif name in _REST_ADMONITIONS:
        out.append(" " * ind + (_REST_ADMONITIONS[name] + " " + arg).rstrip())
      elif name in ("code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "parsed-literal"):
        out.append("")
        in_literal = ind
      elif arg:
        out.append(" " * ind + arg)
      continue
    if _REST_COMMENT_RE.match(line):  # comment or link target: skip it and its indented body
      ind = _indent(line)
      i += 1
      while i < n and lines[i].strip() and _indent(lines[i]) > ind:
        i += 1
      continue
    if _REST_UNDERLINE_RE.match(line):
      if out and out[-1].strip():  # a title underline: keep the title a paragraph of its own
        out.insert(len(out) - 1, "")
        out.append("")
      i += 1
      continue
    if _REST_GRID_RE.match(line):
      i += 1
      continue
    if re.match(r"^\s*:[\w-]+:\s*$", line):  # bare field-list markers (:orphan:, :Authors:)
      i += 1
      continue
    if stripped.endswith("::"):
      head = stripped[:-2].rstrip()
      if head:
        out.append(" " * _indent(line) + head + ":")
      out.append("")
      in_literal = _indent(line)
      i += 1
      continue
    if stripped.startswith("|") and stripped.endswith("|") and stripped.count("|") >= 2:
      line = re.sub(r"\s*\|\s*", "  ", line).rstrip()  # grid table row
    out.append(line.rstrip())
    i += 1
  # Inline markup may wrap over lines: clean each run of prose lines at once, literal blocks never.
  pieces, prose = [], []
  for line in out + [_LITERAL_MARK]:
    if line.startswith(_LITERAL_MARK):
      if prose:
        pieces.append(rest_inline("\n".join(prose)))
        prose = []
      pieces.append(line[1:])
    else:
      prose.append(line)
  return normalize(dedent_blocks("\n".join(pieces[:-1])))


def dedent_blocks(text: str) -> str:
  """Removes the common indentation left over from directive bodies, paragraph by paragraph."""
  paras = text.split("\n\n")
  result = []
  for p in paras:
    lines = p.split("\n")
    ind = min((_indent(l) for l in lines if l.strip()), default=0)
    result.append("\n".join(l[ind:] for l in lines))
  return "\n\n".join(result)


# ------------------------------------------------------------------------------------------------
# Perl POD

_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code(m: re.Match) -> str:
  code, body = m.group(1), m.group(2)
  if code in "XZ":
    return ""
  if code == "E":
    if body in _POD_ESCAPES:
      return _POD_ESCAPES[body]
    try:
      return chr(int(body, 16) if body.lower().startswith("0x") else int(body))
    except ValueError:
      return html.unescape(f"&{body};")
  if code == "L":
    if "|" in body:
      return body.split("|", 1)[0]
    if "/" in body and "://" not in body:
      page, sect = body.split("/", 1)
      sect = sect.strip('"')
      return f'"{sect}" in {page}' if page else f'"{sect}"'
    return body
  return body  # B I C F S: keep the text


def pod_inline(text: str) -> str:
  for k in (4, 3, 2):  # C<< ... >> forms may hold bare angle brackets
    text = re.sub(r"([A-Z])%s\s+(.*?)\s+%s" % ("<" * k, ">" * k), _pod_code, text, flags=re.S)
  prev = None
  while prev != text:  # innermost codes first, so nesting unwraps
    prev = text
    text = re.sub(r"([A-Z])<([^<>]*)>", _pod_code, text)
  return text


def clean_pod(src: str) -> str:
  """Plain text from Perl POD: headings kept, verbatim paragraphs kept, formatting codes removed."""
  out, in_pod, skip_format = [], True, False
  for para in re.split(r"\n\s*\n", src.replace("\r\n", "\n")):
    if not para.strip():
      continue
    if para.startswith("="):
      cmd, _, rest = para[1:].partition(" ")
      cmd = cmd.strip()
      rest = rest.strip()
      if cmd == "cut":
        in_pod = False
      elif cmd in ("pod", "encoding"):
        in_pod = True
      elif cmd.startswith("head") or cmd == "item":
        in_pod = True
        if rest and rest not in ("*", "o", "-"):
          out.append(pod_inline(re.sub(r"^\*\s+", "- ", rest)))
      elif cmd == "begin":
        skip_format = rest.split()[0] not in ("text",) if rest else True
      elif cmd == "end":
        skip_format = False
      continue
    if not in_pod or skip_format:
      continue
    out.append(para.rstrip() if para[:1] in " \t" else pod_inline(para))
  return "\n\n".join(out)


# ------------------------------------------------------------------------------------------------
# HTML

_BLOCK_TAGS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd", "pre",
               "table", "tr", "blockquote", "section", "article", "header", "footer", "figure",
               "figcaption", "hr", "br", "title", "caption", "tbody", "thead", "main", "aside", "address"}
_SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "template", "svg", "button", "form", "select"}
_INLINE_TAG_RE = re.compile(  # removed before parsing: they carry no layout and are most of the tags
    r"</?(?:a|span|code|em|strong|b|i|tt|abbr|acronym|sup|sub|kbd|var|samp|cite|q|small|big|u|s|font|mark"
    r"|dfn|time|wbr)\b[^>]*>", re.I)
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
              "source", "track", "wbr"}


_PRE_PROTECT = str.maketrans(" \t\n", "\x01\x02\x03")
_PRE_RESTORE = str.maketrans("\x01\x02\x03", " \t\n")


class _TextExtractor(html.parser.HTMLParser):
  """Collects visible text; block tags become paragraph breaks, whitespace collapses outside <pre>."""

  def __init__(self, skip_classes: frozenset[str], skip_ids: frozenset[str]):
    super().__init__(convert_charrefs=True)
    self.skip_classes, self.skip_ids = skip_classes, skip_ids
    self.parts: list[str] = []
    self.stack: list[tuple[str, bool]] = []  # (tag, starts a skipped subtree)
    self.skipping = 0
    self.pre = 0
    self.item_open = False  # after "- " and before the item's text: no paragraph breaks

  def _skips(self, tag: str, attrs) -> bool:
    if tag in _SKIP_TAGS:
      return True
    a = dict(attrs)
    classes = set((a.get("class") or "").split())
    return bool(classes & self.skip_classes) or (a.get("id") or "") in self.skip_ids

  def handle_starttag(self, tag, attrs):
    if tag in _VOID_TAGS:
      if tag in ("br", "hr") and not self.skipping:
        self.parts.append("\n")
      return
    skip = self._skips(tag, attrs)
    self.stack.append((tag, skip))
    if skip:
      self.skipping += 1
    if self.skipping:
      return
    if tag == "pre":
      self.pre += 1
    if tag in _BLOCK_TAGS and not (self.item_open and tag != "li"):
      self.parts.append("\n\n")
    if tag == "li":
      self.parts.append("- ")
      self.item_open = True
    elif tag in ("td", "th"):
      self.parts.append(" ")

  def handle_startendtag(self, tag, attrs):
    if tag in ("br", "hr") and not self.skipping:
      self.parts.append("\n")

  def handle_endtag(self, tag):
    if tag in _VOID_TAGS or not any(t == tag for t, _ in self.stack):
      return  # stray close tag
    while self.stack:
      t, skip = self.stack.pop()
      if not self.skipping and t == "pre":
        self.pre = max(0, self.pre - 1)
      if skip:
        self.skipping -= 1
      if t == tag:
        break
    if not self.skipping and tag in _BLOCK_TAGS:
      self.parts.append("\n\n")

  def handle_data(self, data):
    if self.skipping:
      return
    if self.item_open:
      if not data.strip():
        return
      self.item_open = False
      data = data.lstrip()
    if self.pre:  # protect preformatted whitespace from the collapsing done afterwards
      self.parts.append(_CONTROL_RE.sub("", data).translate(_PRE_PROTECT))
    else:
      self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(src: str, skip_classes: Iterable[str] = (), skip_ids: Iterable[str] = ()) -> str:
  """Visible text of an HTML page, without scripts, styles, head or elements of the given classes/ids.

  Inline elements (a, span, code, em, ...) are unwrapped first, so skip classes apply to block elements.
  """
  parser = _TextExtractor(frozenset(skip_classes), frozenset(skip_ids))
  parser.feed(_INLINE_TAG_RE.sub("", src))
  parser.close()
  text = "".join(parser.parts)
  paras = [re.sub(r"[ \t]*\n[ \t]*", "\n", p).strip() for p in re.split(r"\n[ \t]*\n", text)]
  return "\n\n".join(p.strip("\x03").translate(_PRE_RESTORE) for p in paras if p.strip())


# ------------------------------------------------------------------------------------------------
# MediaWiki wikitext

_WIKI_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                       "bibliography", "sources", "footnotes", "citations", "notes and references"}
_WIKI_DROP_LINK_NS = ("file:", "image:", "category:", "media:")


def _remove_nested(text: str, open_tok: str, close_tok: str) -> str:
  """Removes balanced open_tok ... close_tok spans, nesting included (templates, tables)."""
  out, depth, start = [], 0, 0
  for m in re.finditer(re.escape(open_tok) + "|" + re.escape(close_tok), text):
    if m.group() == open_tok:
      if depth == 0:
        out.append(text[start:m.start()])
      depth += 1
    elif depth:
      depth -= 1
      if depth == 0:
        start = m.end()
  if depth == 0:
    out.append(text[start:])
  return "".join(out)


_LINK_TOKEN_RE = re.compile(r"\[\[|\]\]")


def _link_text(inner: str) -> str:
  target = inner.split("|", 1)[0].strip().lower()
  if target.startswith(_WIKI_DROP_LINK_NS) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", target):
    return ""
  return (_replace_links(inner.split("|")[-1]) if "|" in inner else inner).lstrip(":")


def _replace_links(text: str) -> str:
  """[[target|label]] -> label, [[target]] -> target; File/Category/interlanguage links removed."""
  out, depth, start, open_at = [], 0, 0, 0
  for m in _LINK_TOKEN_RE.finditer(text):
    if m.group() == "[[":
      if depth == 0:
        out.append(text[start:m.start()])
        open_at = m.end()
      depth += 1
    elif depth:
      depth -= 1
      if depth == 0:
        out.append(_link_text(text[open_at:m.start()]))
        start = m.end()
  out.append(text[open_at - 2:] if depth else text[start:])
  return "".join(out)


def clean_wikitext(src: str) -> str:
  """Plain prose from MediaWiki markup: templates, tables, refs, files and categories removed."""
  t = html.unescape(src)
  t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
  t = re.sub(r"<ref[^>/]*/>", "", t)
  t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S | re.I)
  t = re.sub(r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source)[^>]*>.*?</\1>", "", t,
             flags=re.S | re.I)
  t = _remove_nested(t, "{{", "}}")
  t = _remove_nested(t, "{|", "|}")
  t = _replace_links(t)
  t = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]+)\]", r"\1", t)
  t = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\]", "", t)
  t = re.sub(r"<br\s*/?>", "\n", t, flags=re.I)
  t = re.sub(r"</?[a-zA-Z][^>]*>", "", t)
  t = re.sub(r"'{2,}", "", t)
  t = re.sub(r"__[A-Z]+__", "", t)
  out, dropping = [], None
  for line in t.split("\n"):
    h = re.match(r"^(=+)\s*(.*?)\s*\1\s*$", line)
    if h:
      level = len(h.group(1))
      if dropping is not None and level > dropping:
        continue
      dropping = level if h.group(2).lower() in _WIKI_DROP_SECTIONS else None
      if dropping is None:
        out.extend(["", h.group(2), ""])
      continue
    if dropping is not None:
      continue
    s = line.strip()
    if s.startswith(("|", "!")) or s in ("}", "{"):
      continue  # table residue
    lm = re.match(r"^([*#:;]+)\s*(.*)$", s)
    if lm:
      s = ("- " if lm.group(1)[-1] in "*#" else "") + lm.group(2) if lm.group(2) else ""
    out.append(s)
  text = "\n".join(out)
  text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # parentheses emptied by template removal
  text = re.sub(r"[ \t]{2,}", " ", text)
  text = re.sub(r" +([,.;:])", r"\1", text)
  return normalize(text)


# ------------------------------------------------------------------------------------------------
# Project Gutenberg boilerplate

_PG_START_RE = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END_RE = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                        re.M | re.I)


def strip_gutenberg(text: str) -> str:
  """Cuts the Project Gutenberg header and licence footer when present."""
  m = _PG_START_RE.search(text)
  if m:
    text = text[m.end():]
  m = _PG_END_RE.search(text)
  if m:
    text = text[:m.start()]
  return text.strip()
