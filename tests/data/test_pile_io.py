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
