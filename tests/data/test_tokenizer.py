"""The vendored GPT-NeoX-20B tokenizer, document encoding with EOS, long-document splitting, BPE."""
import numpy as np
import pytest

from monojax.data import tokenizer as tk


@pytest.fixture(scope="module")
def neox():
  return tk.TextTokenizer(tk.NEOX_NAME)


def test_neox_is_the_pile_tokenizer(neox):
  assert neox.vocab_size == 50_277
  assert neox.eos_id == 0 and neox.pad_id == 1
  assert tk.padded_vocab_size(neox.vocab_size) == 50_304
  # Reference ids of GPT-NeoX-20B (same as the public 20B_tokenizer.json).
  assert neox.hf.encode("Hello world").ids == [12092, 1533]
  assert neox.hf.encode("    x").ids[0] == 50274  # the 4-space run token: whitespace runs are kept
  assert neox.hf.token_to_id("|||EMAIL_ADDRESS|||") is None  # PII tokens removed


def test_literal_eos_in_text_is_text(neox):
  ids = neox.encode_documents(["a<|endoftext|>b"])
  assert list(ids).count(neox.eos_id) == 1 and ids[-1] == neox.eos_id
  assert neox.decode(ids[:-1]) == "a<|endoftext|>b"


def test_encode_documents_puts_eos_after_each(neox):
  docs = ["first document", "second one", "x" * 100_000]
  ids = neox.encode_documents(docs)
  assert ids.dtype == np.int32
  eos = np.flatnonzero(ids == neox.eos_id)
  assert len(eos) == 3 and eos[-1] == len(ids) - 1
  assert neox.decode(ids[:eos[0]]) == "first document"
  assert neox.decode(ids[eos[0] + 1:eos[1]]) == "second one"
  assert neox.decode(ids[eos[1] + 1:eos[2]]) == "x" * 100_000
  assert neox.encode_documents([]).size == 0


@pytest.mark.parametrize("text", ["short", "para one\n\npara two " * 5000, "nospaces" * 20_000,
                                  "line\n" * 30_000, "mixed words and\nlines\n\n" * 4000])
def test_split_long_text_is_lossless(text):
  pieces = tk.split_long_text(text, 1000)
  assert "".join(pieces) == text
  assert all(0 < len(p) <= 1000 for p in pieces)


def test_tokenizer_pickles_without_the_rust_object(neox):
  import pickle
  clone = pickle.loads(pickle.dumps(neox))
  assert clone._tok is None
  assert list(clone.encode_documents(["hi there"])) == list(neox.encode_documents(["hi there"]))


def test_train_bpe(tmp_path, pydoc_texts):
  path = tmp_path / "bpe.json"
  hf = tk.train_bpe(pydoc_texts[:20], 600, path)
  assert hf.get_vocab_size() == 600
  tok = tk.TextTokenizer(str(path))
  assert tok.eos_id == 0 and tok.pad_id == 1
  ids = tok.encode_documents(["def function(x): return x"])
  assert tok.decode(ids[:-1]) == "def function(x): return x"


def test_bad_tokenizer_spec(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.tokenizer"):
    tk.TextTokenizer(str(tmp_path / "nope.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="data.tokenizer"):
    tk.TextTokenizer(str(bad))
  with pytest.raises(ValueError, match="bpe_vocab_size"):
    tk.train_bpe(["abc"], 10)
