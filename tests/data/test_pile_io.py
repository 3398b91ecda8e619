"""Pile shard reader/writer and every bad input of the issue: each raises a clear error naming the
file and line, or with on_error="skip" is dropped and counted."""
import json

import pytest
import zstandard

from monojax.data import pile_io
from monojax.data.pile_io import CorruptInputError


def _write_raw(path, lines: list[bytes]):
  path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(l + b"\n" for l in lines)))
  return path


def _rec(text, **meta):
  return json.dumps({"text": text, "meta": {"pile_set_name": "s", **meta}}).encode()


def test_round_trip_is_exact(tmp_path):
  recs = [{"text": f"doc {i} \u00e9\u4e2d<script>", "meta": {"pile_set_name": "x", "id": i}} for i in range(100)]
  stats = pile_io.write_shard(tmp_path / "a.jsonl.zst", recs)
  assert stats["documents"] == 100
  got = [r for _, r in pile_io.read_records(tmp_path / "a.jsonl.zst")]
  assert got == recs
  assert not list(tmp_path.glob("*.tmp"))


def test_multi_frame_file_reads_all_frames(tmp_path):
  c = zstandard.ZstdCompressor()
  data = c.compress(_rec("one") + b"\n") + c.compress(_rec("two") + b"\n")
  (tmp_path / "m.jsonl.zst").write_bytes(data)
  assert [r["text"] for _, r in pile_io.read_records(tmp_path / "m.jsonl.zst")] == ["one", "two"]


def test_truncated_zstd_names_file(tmp_path):
  p = _write_raw(tmp_path / "t.jsonl.zst", [_rec("x" * 1000 + str(i)) for i in range(50)])
  p.write_bytes(p.read_bytes()[:-7])
  with pytest.raises(CorruptInputError, match=r"t\.jsonl\.zst.*(truncated|corrupt)"):
    list(pile_io.read_records(p, on_error="skip"))  # no skip past a broken frame


def test_corrupt_zstd_bytes_names_file(tmp_path):
  p = _write_raw(tmp_path / "c.jsonl.zst", [_rec(f"hello {i}") for i in range(2000)])
  data = bytearray(p.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 32):
    data[i] ^= 0xFF
  p.write_bytes(bytes(data))
  with pytest.raises(CorruptInputError, match=r"c\.jsonl\.zst"):
    list(pile_io.read_records(p))


def test_not_zstd_at_all(tmp_path):
  p = tmp_path / "plain.jsonl.zst"
  p.write_bytes(b'{"text": "not compressed"}\n')
  with pytest.raises(CorruptInputError, match="plain.jsonl.zst"):
    list(pile_io.read_records(p))


BAD_LINES = {
    "not_json": b"{this is not json",
    "no_text": json.dumps({"meta": {"pile_set_name": "s"}}).encode(),
    "not_utf8": b'{"text": "caf\xe9 \xff"}',
    "text_not_str": json.dumps({"text": 42}).encode(),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_raises_with_file_and_line(tmp_path, kind):
  p = _write_raw(tmp_path / "bad.jsonl.zst", [_rec("good one"), BAD_LINES[kind], _rec("good two")])
  with pytest.raises(CorruptInputError, match=r"bad\.jsonl\.zst:2: "):
    list(pile_io.read_records(p))


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_skipped_and_counted(tmp_path, kind):
  p = _write_raw(tmp_path / "bad.jsonl.zst", [_rec("good one"), BAD_LINES[kind], _rec("good two")])
  skips = pile_io.SkipCounts()
  got = [r["text"] for _, r in pile_io.read_records(p, on_error="skip", skips=skips)]
  assert got == ["good one", "good two"]
  assert sum(skips.values()) == 1
  assert ("no_text" if kind == "text_not_str" else kind) in skips


def test_empty_documents_are_counted_not_fed(tmp_path):
  p = _write_raw(tmp_path / "e.jsonl.zst", [_rec(""), _rec("   \n "), _rec("real"), b""])
  skips = pile_io.SkipCounts()
  assert [r["text"] for _, r in pile_io.read_records(p, skips=skips)] == ["real"]
  assert skips == {"empty": 2}


def test_ten_megabyte_document(tmp_path):
  big = ("word " * 2_000_000)[:10_000_000]
  p = _write_raw(tmp_path / "big.jsonl.zst", [_rec("small"), _rec(big), _rec("after")])
  got = [r["text"] for _, r in pile_io.read_records(p)]
  assert got == ["small", big, "after"]


def test_bad_policy_value(tmp_path):
  p = _write_raw(tmp_path / "x.jsonl.zst", [_rec("a")])
  with pytest.raises(ValueError, match="data.on_error"):
    list(pile_io.read_records(p, on_error="ignore"))


def test_writer_rejects_records_without_set_name(tmp_path):
  with pytest.raises(ValueError, match="pile_set_name"):
    pile_io.write_shard(tmp_path / "w.jsonl.zst", [{"text": "a", "meta": {}}])
  assert not (tmp_path / "w.jsonl.zst").exists()
  assert not list(tmp_path.glob("*.tmp"))


def test_writer_overwrites_an_existing_shard_atomically(tmp_path):
  path = tmp_path / "o.jsonl.zst"
  pile_io.write_shard(path, [{"text": "old", "meta": {"pile_set_name": "s"}}])
  pile_io.write_shard(path, [{"text": "new", "meta": {"pile_set_name": "s"}}, {"text": "2", "meta": {"pile_set_name": "s"}}])
  assert [r["text"] for _, r in pile_io.read_records(path)] == ["new", "2"]
  with pytest.raises(ValueError):  # a failed rewrite leaves the previous shard whole
    pile_io.write_shard(path, [{"text": "x", "meta": {}}])
  assert [r["text"] for _, r in pile_io.read_records(path)] == ["new", "2"] and not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------------------------
# A line longer than data.max_line_bytes: an error naming file and line, or skipped and counted,
# never an unbounded buffer.


def test_over_long_line_raises_with_file_and_line(tmp_path):
  p = _write_raw(tmp_path / "long.jsonl.zst", [_rec("before"), _rec("y" * 10_000), _rec("after")])
  with pytest.raises(CorruptInputError, match=r"long\.jsonl\.zst:2: line is longer than data\.max_line_bytes "
                                              r"\(1,024 bytes\)") as e:
    list(pile_io.read_records(p, max_line_bytes=1024))
  assert "\n" not in str(e.value) and e.value.reason == "too_long"


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_over_long_line_skipped_and_counted(tmp_path, trailing_newline):
  lines = [_rec("before"), _rec("y" * 10_000), _rec("after"), _rec("z" * 5_000)]
  data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
  for name, raw in (("s.jsonl.zst", zstandard.ZstdCompressor().compress(data)), ("s.jsonl", data)):
    (tmp_path / name).write_bytes(raw)
    skips = pile_io.SkipCounts()
    got = [(n, r["text"]) for n, r in pile_io.read_records(tmp_path / name, on_error="skip", skips=skips,
                                                           max_line_bytes=1024)]
    assert got == [(1, "before"), (3, "after")], name  # line numbers after the long line stay right
    assert skips == {"too_long": 2}


def test_line_at_the_cap_is_kept(tmp_path):
  rec = _rec("q" * 1000)
  p = _write_raw(tmp_path / "edge.jsonl.zst", [rec, _rec("next")])
  assert [r["text"] for _, r in pile_io.read_records(p, max_line_bytes=len(rec))] == ["q" * 1000, "next"]
  with pytest.raises(CorruptInputError, match=r"edge\.jsonl\.zst:1: "):
    list(pile_io.read_records(p, max_line_bytes=len(rec) - 1))


def test_over_long_line_is_read_in_bounded_memory(tmp_path):
  """A 24 MB record (random hex: zstd cannot shrink it much, so it decompresses chunk by chunk) with
  a 1 MB cap: peak Python memory stays a few MB, not the line's size."""
  import os
  import tracemalloc
  big = os.urandom(12 << 20).hex()
  p = tmp_path / "huge.jsonl.zst"
  p.write_bytes(zstandard.ZstdCompressor(level=1).compress(_rec("first") + b"\n" + _rec(big) + b"\n" + _rec("last") + b"\n"))
  del big
  skips = pile_io.SkipCounts()
  tracemalloc.start()
  try:
    got = [r["text"] for _, r in pile_io.read_records(p, on_error="skip", skips=skips, max_line_bytes=1 << 20)]
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert got == ["first", "last"] and skips == {"too_long": 1}
  assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MB while skipping a 24 MB line"


def test_max_line_bytes_is_a_config_field():
  from monojax import config
  assert config.base_config().data.max_line_bytes == pile_io.MAX_LINE_BYTES == 64 << 20


def test_max_line_bytes_reaches_the_readers(tmp_path):
  """The document index (data/sources.py), the token counter (corpus_stats) and the packer
  (packed, from data.max_line_bytes) read with the cap; a non-default cap gets its own cache key."""
  from monojax import config
  from monojax.data import corpus_stats, sources, packed
  p = _write_raw(tmp_path / "cap.jsonl.zst", [_rec("short one"), _rec("y" * 10_000), _rec("short two")])
  src = sources.JsonlZstSource([str(p)], on_error="skip", index_dir=str(tmp_path / "idx"), log=lambda _: None,
                               max_line_bytes=1024)
  assert len(src) == 2 and src.skips == {"too_long": 1}
  assert sources._key([str(p)], "skip", 1024) != sources._key([str(p)], "skip")
  assert sources._key([str(p)], "skip") == sources._key([str(p)], "skip", pile_io.MAX_LINE_BYTES)
  with pytest.raises(CorruptInputError, match=r"cap\.jsonl\.zst:2: "):
    sources.JsonlZstSource([str(p)], on_error="raise", index_dir=str(tmp_path / "idx2"), max_line_bytes=1024)

  class Tok:
    class hf:
      @staticmethod
      def encode_batch(texts, add_special_tokens=False):
        return [type("E", (), {"ids": t.split()}) for t in texts]
  counted = corpus_stats._count_file(str(p), Tok, "skip", 1 << 20, max_line_bytes=1024)
  assert counted["skips"] == {"too_long": 1} and counted["sets"]["s"]["documents"] == 2

  cfg = config.base_config().data
  assert packed._max_line_bytes(cfg) == 64 << 20
  cfg.max_line_bytes = 1024
  assert packed._max_line_bytes(cfg) == 1024


@pytest.mark.parametrize("seed", range(5))
def test_iter_lines_matches_a_plain_split_at_any_chunk_boundary(tmp_path, monkeypatch, seed):
  """Lines cut across decompressed chunks anywhere (1 byte to 40 bytes) come out as a plain split
  would give them, with the ones over the cap as None."""
  import random
  rng = random.Random(seed)
  lines = [bytes(rng.choice(b"ab{}") for _ in range(rng.choice([0, 1, 5, 16, 17, 18, 60]))) for _ in range(200)]
  data = b"\n".join(lines) + rng.choice([b"", b"\n"])
  p = _write_raw(tmp_path / "c.jsonl.zst", [])

  def chunks(path, fh):
    pos = 0
    while pos < len(data):
      n = rng.randint(1, 40)
      yield data[pos:pos + n]
      pos += n
  monkeypatch.setattr(pile_io, "_decompressed_chunks", chunks)
  want = data.split(b"\n")
  if want[-1] == b"":
    want.pop()
  got = list(pile_io.iter_lines(p, max_line_bytes=17))
  assert got == [(i + 1, l if len(l) <= 17 else None) for i, l in enumerate(want)]
