"""Pile-format shards: zstd-compressed JSON lines `{"text": str, "meta": {"pile_set_name": str, ...}}`.

The writer is atomic (tmp file + rename) so an interrupted build never leaves a half shard that a
later run would take for a finished one. The reader applies the project's bad-input policy: every
malformed record either raises `CorruptInputError` naming the file and line, or (on_error="skip") is
counted in a `SkipCounts` and dropped. It never yields a partially decoded record.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
from typing import Any, Iterable, Iterator

import zstandard
from etils import epath
from monojax import errors

ON_ERROR_CHOICES = ("raise", "skip")
MAX_LINE_BYTES = 64 << 20  # data.max_line_bytes: a longer line (record) is a bad record, not a bigger buffer


class CorruptInputError(errors.UserInputError):
  """A data file holds something that is not a valid Pile record."""


class SkipCounts(collections.Counter):
  """Counts skipped records by reason (e.g. 'not_json', 'no_text', 'empty', 'too_long')."""

  def summary(self) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(self.items())) or "none"


def write_shard(path: str | os.PathLike, records: Iterable[dict[str, Any]], level: int = 10) -> dict[str, int]:
  """Writes records as one .jsonl.zst shard atomically; returns {"documents", "bytes"} (UTF-8 text bytes)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  docs = nbytes = 0
  cctx = zstandard.ZstdCompressor(level=level, threads=-1)
  try:
    with tmp.open("wb") as raw, cctx.stream_writer(raw, closefd=False) as out:
      for rec in records:
        if not isinstance(rec.get("text"), str) or "pile_set_name" not in rec.get("meta", {}):
          raise ValueError(f"{path}: record {docs} needs a str 'text' and meta.pile_set_name, got keys {sorted(rec)}")
        out.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        docs += 1
        nbytes += len(rec["text"].encode("utf-8"))
    tmp.replace(path)  # replace, not rename: an existing shard is overwritten
  finally:
    if tmp.exists():
      tmp.unlink()
  return {"documents": docs, "bytes": nbytes}


def _decompressed_chunks(path: epath.Path, fh) -> Iterator[bytes]:
  """Streams the decompressed bytes of a (multi-frame) zstd file; a truncated last frame raises."""
  dctx = zstandard.ZstdDecompressor()
  obj = dctx.decompressobj()
  in_frame = False
  while True:
    chunk = fh.read(1 << 20)
    if not chunk:
      break
    while chunk:
      out = obj.decompress(chunk)
      in_frame = not obj.eof
      if out:
        yield out
      if obj.eof:  # a frame ended: the rest (if any) starts the next frame
        chunk = obj.unused_data
        obj = dctx.decompressobj()
      else:
        chunk = b""
  if in_frame:
    raise zstandard.ZstdError("file ends inside a frame (truncated)")


def iter_lines(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
  """Yields (1-based line number, raw line bytes) of a .jsonl.zst (or plain .jsonl) file.

  A line longer than max_line_bytes yields (line number, None) as soon as it passes the cap, and its
  remaining bytes are dropped as they are read: memory stays within the cap plus one chunk (1 MiB of
  file, or what 1 MiB of zstd decompresses to), however long the line (a record without a newline
  is an error, not an out-of-memory).

  A truncated or corrupt zstd stream raises CorruptInputError naming the file and the line reached:
  nothing after a broken frame can be trusted, so there is no 'skip' for it.
  """
  path = epath.Path(path)
  if max_line_bytes < 1:
    raise errors.ConfigError(f"data.max_line_bytes must be at least 1, got {max_line_bytes}")
  lineno = 0
  pending: list[bytes] = []  # the start of the current line, read so far (joined once, at its end)
  pending_len = 0
  too_long = False  # inside a line already reported as too long: drop up to its newline
  with path.open("rb") as fh:
    chunks = _decompressed_chunks(path, fh) if path.name.endswith(".zst") else iter(lambda: fh.read(1 << 20), b"")
    try:
      for chunk in chunks:
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if lines:
          if too_long:  # this newline ends the over-long line
            too_long = False
          else:
            line = b"".join(pending) + lines[0] if pending else lines[0]
            lineno += 1
            yield lineno, (line if len(line) <= max_line_bytes else None)
          pending, pending_len = [], 0
          for line in itertools.islice(lines, 1, None):
            lineno += 1
            yield lineno, (line if len(line) <= max_line_bytes else None)
        elif too_long:
          continue
        if pending_len + len(tail) > max_line_bytes:
          lineno += 1
          pending, pending_len, too_long = [], 0, True
          yield lineno, None
        elif tail:
          pending.append(tail)
          pending_len += len(tail)
    except zstandard.ZstdError as e:
      raise CorruptInputError(f"{path}: corrupt zstd data after line {lineno}: {e}") from None
  if pending:
    yield lineno + 1, b"".join(pending)


def parse_record(path: Any, lineno: int, line: bytes) -> dict[str, Any]:
  """Parses one line into a record; raises CorruptInputError (with a `.reason`) naming file:line."""
  def bad(reason: str, msg: str) -> CorruptInputError:
    err = CorruptInputError(f"{path}:{lineno}: {msg}")
    err.reason = reason
    return err
  try:
    s = line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise bad("not_utf8", f"line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
  try:
    rec = json.loads(s)
  except json.JSONDecodeError as e:
    raise bad("not_json", f"line is not JSON ({e.msg}); expected {{\"text\": ..., \"meta\": {{...}}}}") from None
  if not isinstance(rec, dict) or "text" not in rec:
    raise bad("no_text", "record has no 'text' field")
  if not isinstance(rec["text"], str):
    raise bad("no_text", f"'text' is {type(rec['text']).__name__}, expected a string")
  meta = rec.get("meta")
  if not isinstance(meta, dict):
    meta = {}
  rec["meta"] = meta
  return rec


def read_records(path: str | os.PathLike, on_error: str = "raise", skips: SkipCounts | None = None,
                 max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (line number, record) of a Pile shard under the bad-input policy.

  Empty (or whitespace-only) documents carry no tokens: they are always dropped and counted as
  'empty', never an error. Blank lines are ignored. A line longer than max_line_bytes
  (data.max_line_bytes) is a bad record ('too_long'), read past with bounded memory.
  """
  if on_error not in ON_ERROR_CHOICES:
    raise errors.ConfigError(f"data.on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
  skips = skips if skips is not None else SkipCounts()
  for lineno, line in iter_lines(path, max_line_bytes):
    if line is None:
      if on_error == "raise":
        err = CorruptInputError(f"{path}:{lineno}: line is longer than data.max_line_bytes ({max_line_bytes:,} "
                                "bytes); raise the cap or set data.on_error='skip'")
        err.reason = "too_long"
        raise err
      skips["too_long"] += 1
      continue
    if not line.strip():
      continue
    try:
      rec = parse_record(path, lineno, line)
    except CorruptInputError as e:
      if on_error == "raise":
        raise
      skips[e.reason] += 1
      continue
    if not rec["text"].strip():
      skips["empty"] += 1
      continue
    yield lineno, rec
