"""Token-level proxy labels from the token text, for judging SAE features by specificity and
sensitivity (paper-spec §6.1-§6.2, Towards Monosemanticity "proxies").

`ProxyLabeler(tokenizer).labels(tokens int[B, T]) -> float32[P, B, T]`, P = len(PROXIES), one 0/1
label per proxy and token. Sequences are packed windows: documents joined by EOS, and a window may
start or end mid-document (even mid-character). Special tokens (EOS, padding) and ids outside the
vocabulary are separators: they are labelled 0 and no match runs across them, nor across the
boundary between two rows.

How a label is computed. Each row is turned into its UTF-8 byte stream (byte-level BPE tokens are
byte strings; a token may hold part of a character). Every byte knows the token that holds it.

* Script proxies (arabic, ..., cjk) are per CHARACTER: the bytes are decoded (vectorised UTF-8,
  numpy) and each character's code point is looked up in the script's Unicode blocks. A token
  belongs to a script when every non-whitespace character it touches (holds at least one byte
  of) is in the script's blocks, and it touches at least one. So both halves of a split
  character are labelled: the token holding the lead byte and the one completing it (the paper's
  A/1/3399 and A/1/3450 fire on those). Whitespace and ZWJ/ZWNJ/ZWSP are neutral; digits, Latin
  letters, punctuation outside the blocks and broken UTF-8 (e.g. a continuation byte at the start
  of a window, whose lead byte fell in the previous window) make a token non-script. This is the
  paper's script proxy binarised: P(script|s) is 1 when every character of s is in the blocks,
  else 1e-10, so log P(s|script) − log P(s) = −log P(script) > 0 or ≈ −23, and its sign is
  exactly this rule, evaluated on the token's characters in context instead of the paper's
  sampled estimate for partial-character tokens.
* Pattern proxies (base64, hex, dna, url, code_keyword) need the neighbours: compiled regexes run
  over the row's bytes (every pattern is ASCII, so a byte span is a character span) and a token
  is labelled when any of its bytes falls inside an accepted match (for code_keyword: inside one
  of the match's keyword groups). Matches are maximal runs with boundary checks, then filtered
  by the rules in `describe` (e.g. base64 needs a digit, an upper- and a lower-case letter and a
  high rate of character-class switches and few lower-case runs of 3+ letters, which rejects
  CamelCase identifiers and paths).

Labels are boolean by design: the paper binarises its LLR proxies by sign (§6.1); correlations
and specificity/sensitivity tables use the binarised value.

Speed: numpy plus one C-level regex scan per pattern proxy per call; 8,000 x 128 = 1,024,000
tokens took 2.0-3.6 s on one core (English docs, mixed scripts and patterns, random ids), and
building the per-vocabulary byte table in __init__ 0.5 s.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import pairwise

import numpy as np

# ----------------------------------------------------------------------------- script blocks

# (script, inclusive code-point ranges). Disjoint; the ids below follow this order (1-based).
_BLOCKS: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("arabic", ((0x0600, 0x06FF), (0x0750, 0x077F), (0x0870, 0x089F), (0x08A0, 0x08FF),
                (0xFB50, 0xFDFF), (0xFE70, 0xFEFC), (0x10E60, 0x10E7F), (0x1EE00, 0x1EEFF))),
    ("hebrew", ((0x0590, 0x05FF), (0xFB1D, 0xFB4F))),
    ("cyrillic", ((0x0400, 0x04FF), (0x0500, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF),
                  (0xA640, 0xA69F))),
    ("greek", ((0x0370, 0x03FF), (0x1F00, 0x1FFF))),
    ("armenian", ((0x0530, 0x058F), (0xFB13, 0xFB17))),
    ("georgian", ((0x10A0, 0x10FF), (0x1C90, 0x1CBF), (0x2D00, 0x2D2F))),
    ("devanagari", ((0x0900, 0x097F), (0xA8E0, 0xA8FF))),
    ("thai", ((0x0E00, 0x0E7F),)),
    ("han", ((0x2E80, 0x2FDF), (0x3005, 0x3007), (0x3021, 0x3029), (0x3038, 0x303B),
             (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F),
             (0x30000, 0x323AF))),
    ("kana", ((0x3040, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F),
              (0x1B000, 0x1B16F))),
    ("hangul", ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7AF),
                (0xD7B0, 0xD7FF), (0xFFA0, 0xFFDC))),
    # CJK punctuation and full-width forms: part of "cjk" only (shared by Chinese, Japanese, Korean).
    ("_cjk_shared", ((0x3001, 0x3004), (0x3008, 0x3020), (0x302A, 0x3037), (0x303C, 0x303F),
                     (0x3100, 0x312F), (0x31A0, 0x31BF), (0x31C0, 0x31EF), (0x3200, 0x33FF),
                     (0xFE30, 0xFE4F), (0xFF00, 0xFF65), (0xFFE0, 0xFFEF))),
)
# Whitespace and invisible joiners: ignored when deciding a token's script.
_NEUTRAL = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x2000, 0x200D), (0x2028, 0x2029),
            (0x202F, 0x202F), (0x205F, 0x2060), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
_SCRIPT_ID = {name: i + 1 for i, (name, _) in enumerate(_BLOCKS)}
_NEUTRAL_ID = len(_BLOCKS) + 1

SCRIPT_PROXIES: dict[str, tuple[str, ...]] = {  # proxy -> the blocks it accepts
    "arabic": ("arabic",), "hebrew": ("hebrew",), "cyrillic": ("cyrillic",), "greek": ("greek",),
    "armenian": ("armenian",), "georgian": ("georgian",), "devanagari": ("devanagari",),
    "thai": ("thai",), "han": ("han",), "kana": ("kana",), "hangul": ("hangul",),
    "cjk": ("han", "kana", "hangul", "_cjk_shared"),
}
PATTERN_PROXIES = ("base64", "hex", "dna", "url", "code_keyword")
PROXIES: tuple[str, ...] = tuple(SCRIPT_PROXIES) + PATTERN_PROXIES

_DESCRIPTIONS = {
    "arabic": "Arabic script (U+0600-06FF, 0750-077F, 0870-08FF, presentation forms FB50-FDFF, FE70-FEFC; also Farsi, Urdu)",
    "hebrew": "Hebrew script (U+0590-05FF, FB1D-FB4F)",
    "cyrillic": "Cyrillic script (U+0400-052F, 1C80-1C8F, 2DE0-2DFF, A640-A69F)",
    "greek": "Greek script (U+0370-03FF, extended 1F00-1FFF)",
    "armenian": "Armenian script (U+0530-058F, FB13-FB17)",
    "georgian": "Georgian script (U+10A0-10FF, 1C90-1CBF, 2D00-2D2F)",
    "devanagari": "Devanagari script (U+0900-097F, A8E0-A8FF; Hindi, Marathi, Nepali, Sanskrit)",
    "thai": "Thai script (U+0E00-0E7F)",
    "han": "Han ideographs (CJK unified and compatibility ideographs, radicals, 々〆〇)",
    "kana": "Japanese hiragana and katakana (incl. half-width katakana)",
    "hangul": "Korean hangul (syllables and jamo)",
    "cjk": "any of han, kana, hangul, plus CJK punctuation, bopomofo and full-width forms",
    "base64": "a maximal run of >= 20 [A-Za-z0-9+/] (then <= 2 '=') with a digit, an upper- and a lower-case letter, "
              ">= 30% class switches, <= 75% of its lower-case letters in runs of >= 3 (CamelCase), not glued to [._%-] (URLs, paths)",
    "hex": "a whole word of >= 8 hex digits mixing digits and letters in one case, a 0x literal with >= 2 digits, or a UUID",
    "dna": "a whole word (or space-separated blocks of >= 10) of [ACGTN] letters in either case, >= 16 bases, >= 3 of A/C/G/T, N <= half",
    "url": "http(s)/ftp(s)://... or www.<name>.<...> over RFC 3986 characters, trailing punctuation and unbalanced ) ] trimmed",
    "code_keyword": "a whole-word programming keyword that is not an English word (def, elif, typedef, sizeof, nullptr, "
                    "printf, const, int, impl, func, ...), a #include/#define-style directive, or line-initial import / from-import",
}


def describe(name: str) -> str:
  """One line on what proxy `name` labels (for a report table)."""
  try:
    return _DESCRIPTIONS[name]
  except KeyError:
    raise KeyError(f"unknown proxy {name!r}; known: {', '.join(PROXIES)}") from None


# ---------------------------------------------------------------------------- pattern rules

_B64 = re.compile(rb"(?<![A-Za-z0-9+/_.%-])[A-Za-z0-9+/]{20,}={0,2}(?![A-Za-z0-9+/=_%-]|\.[A-Za-z0-9])")
_HEX = re.compile(rb"(?<![A-Za-z0-9_])(?:[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}"
                  rb"|0[xX][0-9A-Fa-f]{2,}|[0-9a-f]{8,}|[0-9A-F]{8,})(?![A-Za-z0-9_])")
_DNA = re.compile(rb"(?<![A-Za-z0-9])(?:[ACGTNacgtn]{10,}(?: [ACGTNacgtn]{10,})+|[ACGTNacgtn]{16,})(?![A-Za-z0-9])")
_URL_CHARS = rb"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]"
_URL = re.compile(rb"(?<![A-Za-z0-9_@./-])(?:(?:https?|ftps?)://" + _URL_CHARS + rb"+|www\.[A-Za-z0-9-]+\." + _URL_CHARS + rb"+)")

_KEYWORDS = (
    # Python
    "def", "elif", "nonlocal", "isinstance", "kwargs", "__init__", "__name__", "__main__",
    # C / C++
    "typedef", "struct", "sizeof", "nullptr", "constexpr", "static_cast", "reinterpret_cast",
    "dynamic_cast", "const_cast", "malloc", "calloc", "realloc", "printf", "fprintf", "sprintf",
    "snprintf", "strlen", "strcmp", "strcpy", "memcpy", "memset", "cout", "endl", "size_t",
    "uint8_t", "uint16_t", "uint32_t", "uint64_t", "int8_t", "int16_t", "int32_t", "int64_t",
    "const", "int", "bool", "enum", "namespace",
    # JS / TS / Java / C#
    "typeof", "instanceof", "async", "println", "boolean", "foreach",
    # Rust / Go / shell
    "impl", "mut", "usize", "isize", "i32", "i64", "u32", "u64", "f32", "f64", "func", "fmt", "esac",
)
_CODE = re.compile(
    rb"(?<![A-Za-z0-9_$])(" + b"|".join(re.escape(k.encode()) for k in sorted(_KEYWORDS, key=len, reverse=True))
    + rb"|console\.log|#[ \t]*(?:include|define|ifdef|ifndef|endif|pragma|undef))(?![A-Za-z0-9_$])"
    rb"|(?m:^)[ \t]*(import)(?=[ \t]+[A-Za-z_*{])"
    rb"|(?m:^)[ \t]*(from)[ \t]+[A-Za-z_.][A-Za-z0-9_.]*[ \t]+(import)(?=[ \t]+[A-Za-z_*(])")

_LEAD_LEN = np.zeros(256, np.int64)  # UTF-8 length announced by a non-ASCII lead byte (0: not a lead)
_LEAD_LEN[0xC2:0xE0] = 2
_LEAD_LEN[0xE0:0xF0] = 3
_LEAD_LEN[0xF0:0xF5] = 4

_CLASS = np.zeros(256, np.int8)  # 1 lower, 2 upper, 3 digit, 4 other (+ / =)
_CLASS[np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)] = 1
_CLASS[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)] = 2
_CLASS[np.frombuffer(b"0123456789", np.uint8)] = 3
_CLASS[np.frombuffer(b"+/=", np.uint8)] = 4


_LOWER_WORD = re.compile(rb"[a-z]{3,}")


def _accept_base64(m: re.Match) -> bool:
  s = m.group().rstrip(b"=")
  c = _CLASS[np.frombuffer(s, np.uint8)]
  if not ((c == 1).any() and (c == 2).any() and (c == 3).any()):
    return False
  if np.count_nonzero(c[1:] != c[:-1]) < 0.3 * (len(c) - 1):
    return False
  # CamelCase identifiers are mostly lower-case runs of >= 3 letters; in random base64 about a third.
  worded = sum(len(w) for w in _LOWER_WORD.findall(s))
  return worded <= 0.75 * np.count_nonzero(c == 1)


def _accept_hex(m: re.Match) -> bool:
  s = m.group()
  if s[:2] in (b"0x", b"0X") or b"-" in s:
    return True
  return any(ch in b"0123456789" for ch in s) and any(ch not in b"0123456789" for ch in s)


def _accept_dna(m: re.Match) -> bool:
  s = m.group().upper().replace(b" ", b"")
  bases = len(s) - s.count(b"N")
  return bases >= 16 and s.count(b"N") * 2 <= len(s) and sum(s.count(x) > 0 for x in b"ACGT") >= 3


def _url_span(m: re.Match) -> tuple[int, int] | None:
  s = m.group()
  end = len(s)
  while end:
    last = s[end - 1:end]
    unbalanced = last in (b")", b"]") and s[:end].count(b"(" if last == b")" else b"[") < s[:end].count(last)
    if last in (b".", b",", b";", b":", b"!", b"?", b"*", b"'") or unbalanced:
      end -= 1
    else:
      break
  body = s[:end]
  rest = body.split(b"://", 1)[1] if b"://" in body else body[4:]
  if not rest or not any(ch in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" for ch in rest):
    return None
  return m.start(), m.start() + end


def _keyword_spans(m: re.Match) -> list[tuple[int, int]]:
  return [m.span(g) for g in range(1, (m.lastindex or 0) + 1) if m.start(g) >= 0]


def _spans(pattern: re.Pattern, spans_of, data: bytes) -> list[tuple[int, int]]:
  """Byte spans to mark: `spans_of(match)` gives each match's (possibly none)."""
  out = []
  for m in pattern.finditer(data):
    out.extend(spans_of(m))
  return out


def _whole(accept):
  return lambda m: [m.span()] if accept(m) else []


_PATTERNS = {"base64": (_B64, _whole(_accept_base64)), "hex": (_HEX, _whole(_accept_hex)),
             "dna": (_DNA, _whole(_accept_dna)), "url": (_URL, lambda m: [s for s in [_url_span(m)] if s]),
             "code_keyword": (_CODE, _keyword_spans)}


# ------------------------------------------------------------------------------ token bytes

def _byte_decoder() -> dict[str, int]:
  """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> tuple[list[bytes | None], np.ndarray]:
  """The UTF-8 bytes each vocabulary id stands for, and which ids are special (EOS, padding).

  Byte-level BPE tokens map each character of the token string back to one byte; added non-special
  tokens (NeoX's whitespace runs) are their UTF-8 content; a non-byte-level tokenizer falls back to
  decoding the id alone. Special ids get None."""
  hf = tokenizer.hf
  size = tokenizer.vocab_size
  added = hf.get_added_tokens_decoder()
  byte_level = type(hf.decoder).__name__ == "ByteLevel"
  dec = _byte_decoder()
  out: list[bytes | None] = []
  special = np.zeros((size,), bool)
  for i in range(size):
    if i in added:
      if added[i].special:
        special[i] = True
        out.append(None)
      else:
        out.append(added[i].content.encode("utf-8"))
      continue
    tok = hf.id_to_token(i)
    if tok is None:
      special[i] = True
      out.append(None)
    elif byte_level and all(ch in dec for ch in tok):
      out.append(bytes(dec[ch] for ch in tok))
    else:
      out.append(hf.decode([i], skip_special_tokens=False).encode("utf-8"))
  return out, special


# ----------------------------------------------------------------------------------- labeler

def _script_lookup() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rows = [(lo, hi, _SCRIPT_ID[name]) for name, ranges in _BLOCKS for lo, hi in ranges]
  rows += [(lo, hi, _NEUTRAL_ID) for lo, hi in _NEUTRAL]
  rows.sort()
  for (_, hi0, _), (lo1, _, _) in pairwise(rows):
    assert hi0 < lo1, "script blocks overlap"
  lo, hi, sid = (np.array(c, np.int64) for c in zip(*rows))
  return lo, hi, sid.astype(np.int8)


class ProxyLabeler:
  """Labels packed token windows with the proxies in PROXIES (see the module docstring)."""

  SEPARATOR = b"\n"  # stands for special tokens and row ends: whitespace, so no match crosses it

  def __init__(self, tokenizer, proxies: Sequence[str] = PROXIES):
    unknown = [p for p in proxies if p not in PROXIES]
    if unknown:
      raise KeyError(f"unknown proxies {unknown}; known: {', '.join(PROXIES)}")
    self.proxies = tuple(proxies)
    self.tokenizer = tokenizer
    pieces, special = token_bytes(tokenizer)
    v = len(pieces)
    # Id v is the separator: every special id and every id outside [0, v) is remapped to it.
    self._sep_id = v
    self._special = np.concatenate([special, [True]])
    pieces = [self.SEPARATOR if p is None else p for p in pieces] + [self.SEPARATOR]
    self._len = np.array([len(p) for p in pieces], np.int64)
    self._off = np.concatenate([[0], np.cumsum(self._len)[:-1]]).astype(np.int64)
    self._bytes = np.frombuffer(b"".join(pieces), np.uint8)
    self._lo, self._hi, self._sid = _script_lookup()
    # member[p, sid]: script ids accepted by each script proxy (0 = other, NEUTRAL never counted).
    scripts = [p for p in self.proxies if p in SCRIPT_PROXIES]
    self._script_rows = [self.proxies.index(p) for p in scripts]
    self._member = np.zeros((len(scripts), _NEUTRAL_ID + 1), bool)
    for r, p in enumerate(scripts):
      for block in SCRIPT_PROXIES[p]:
        self._member[r, _SCRIPT_ID[block]] = True

  @staticmethod
  def describe(name: str) -> str:
    return describe(name)

  def labels(self, tokens) -> np.ndarray:
    """float32 [P, B, T] (or [P, T] for a 1-D input): 1 where the token carries the proxy."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
      return self.labels(tokens[None])[:, 0]
    if tokens.ndim != 2 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
      raise ValueError(f"tokens must be an integer array [B, T], got {tokens.dtype} {tokens.shape}")
    b, t = tokens.shape
    out = np.zeros((len(self.proxies), b, t), np.float32)
    if tokens.size == 0:
      return out
    ids = tokens.astype(np.int64)
    ids = np.where((ids < 0) | (ids >= self._sep_id), self._sep_id, ids)
    ids = np.concatenate([ids, np.full((b, 1), self._sep_id, np.int64)], axis=1).reshape(-1)  # a separator ends each row
    n = ids.size
    lens = self._len[ids]
    total = int(lens.sum())
    owner = np.repeat(np.arange(n, dtype=np.int64), lens)
    first = np.cumsum(lens) - lens  # stream offset of each token's first byte
    pos = np.arange(total, dtype=np.int64) + np.repeat(self._off[ids] - first, lens)
    stream = self._bytes[pos]
    flat = np.zeros((len(self.proxies), n), np.float32)
    if self._script_rows:
      flat[self._script_rows] = self._script_labels(stream, owner, n)
    data = stream.tobytes()
    for r, p in enumerate(self.proxies):
      if p in _PATTERNS:
        flat[r] = self._mark(_spans(*_PATTERNS[p], data), owner, n)
    flat[:, self._special[ids]] = 0.0
    return flat.reshape(len(self.proxies), b, t + 1)[:, :, :t].copy()

  # Per-byte code points, vectorised. ASCII bytes are themselves. Among the other bytes, every
  # non-continuation byte starts a character; a start with lead length k owns the k-1 continuation
  # bytes right after it when they are there, else its group is broken (code point -1), as is a
  # continuation byte with no lead before it (after ASCII, or at the start of a window).
  @staticmethod
  def _code_points(s: np.ndarray) -> np.ndarray:
    cp = s.astype(np.int32)
    hi = np.flatnonzero(s >= 0x80)
    if not hi.size:
      return cp
    sub = s[hi]
    m = sub.size
    ar = np.arange(m, dtype=np.int64)
    gap = np.ones(m, bool)
    gap[1:] = hi[1:] != hi[:-1] + 1
    is_start = ((sub & 0xC0) != 0x80) | gap
    start = np.maximum.accumulate(np.where(is_start, ar, 0))
    need = _LEAD_LEN[sub[start]]
    starts = np.flatnonzero(is_start)
    gsize = np.zeros(m, np.int64)
    gsize[starts] = np.diff(np.append(starts, m))
    gsize = gsize[start]
    ok = (need > 0) & (gsize >= need) & (ar - start < need)
    pad = np.concatenate([sub, np.zeros(3, np.uint8)]).astype(np.int32)
    b0, b1, b2, b3 = pad[start], pad[start + 1] & 0x3F, pad[start + 2] & 0x3F, pad[start + 3] & 0x3F
    val = np.where(need == 2, ((b0 & 0x1F) << 6) | b1,
                   np.where(need == 3, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                            ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
    cp[hi] = np.where(ok, val, -1)
    return cp

  def _script_labels(self, stream: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    cp = self._code_points(stream)
    i = np.searchsorted(self._lo, cp, side="right") - 1
    ic = np.maximum(i, 0)
    sid = np.where((i >= 0) & (cp <= self._hi[ic]), self._sid[ic], 0)
    counted = sid != _NEUTRAL_ID
    n_counted = np.bincount(owner, weights=counted, minlength=n)
    out = np.zeros((len(self._script_rows), n), np.float32)
    for r, member in enumerate(self._member):
      hits = np.bincount(owner, weights=member[sid], minlength=n)
      out[r] = (n_counted > 0) & (hits == n_counted)
    return out

  @staticmethod
  def _mark(spans: list[tuple[int, int]], owner: np.ndarray, n: int) -> np.ndarray:
    if not spans:
      return np.zeros(n, np.float32)
    sp = np.array(spans, np.int64)
    sp = sp[sp[:, 1] > sp[:, 0]]
    diff = np.zeros(n + 1, np.int64)
    np.add.at(diff, owner[sp[:, 0]], 1)
    np.add.at(diff, owner[sp[:, 1] - 1] + 1, -1)
    return (np.cumsum(diff[:-1]) > 0).astype(np.float32)
