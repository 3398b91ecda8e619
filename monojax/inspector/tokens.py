"""Token display strings. A byte-level BPE token can hold part of a UTF-8 character (Arabic, CJK,
emoji split over two or three tokens), which decodes to U+FFFD on its own. In running text each
token shows instead the characters its bytes complete, given the tokens before it: the last token
of a split character shows the character and the ones before it show "" (drawn as a thin mark).
All strings pass through text.visible (control and bidi characters become visible escapes)."""
from __future__ import annotations

import codecs
import functools

import numpy as np

from monojax import text as text_lib
from monojax.analysis import proxies


class TokenBytes:
  """The bytes each token id stands for (added and special tokens: their text), and `vocab`: each
  token's display string on its own (U+FFFD for part of a character)."""

  def __init__(self, tokenizer):
    self.vocab = [text_lib.visible(tokenizer.decode([t])) for t in range(tokenizer.vocab_size)]
    table, _ = proxies.token_bytes(tokenizer)   # special ids (None): their text, as decode shows them
    self.table = [b if b is not None else tokenizer.decode([i]).encode("utf-8") for i, b in enumerate(table)]

  @functools.cached_property
  def partial(self):
    """bool[vocab]: tokens that are not whole characters on their own (only windows holding one can
    show other than their vocabulary strings)."""
    return np.array(["\ufffd" in v for v in self.vocab], bool)

  def pieces(self, ids) -> list[str]:
    """The display string of each token of a running sequence (-1: padding, "")."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, last = [], -1
    for k, t in enumerate(ids):
      t = int(t)
      if t < 0 or t >= len(self.table):
        out.append("")
        continue
      out.append(decoder.decode(self.table[t]))
      last = k
    tail = decoder.decode(b"", final=True)   # an unfinished character at the end: U+FFFD
    if tail and last >= 0:
      out[last] += tail
    return [text_lib.visible(p) for p in out]

  def pieces_text(self, ids) -> str:
    """The text of a token sequence (-1 skipped), decoded from its bytes as a whole."""
    return b"".join(self.table[int(t)] for t in ids if 0 <= int(t) < len(self.table)).decode("utf-8", errors="replace")
