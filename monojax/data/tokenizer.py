"""Tokenizers: the vendored GPT-NeoX-20B (the Pile's own) and optional byte-level BPEs trained on
the corpus.

`TextTokenizer` is what the pipeline uses: picklable (the HF object is created lazily in each
grain worker), encodes a batch of documents into one id stream with EOS after every document, and
splits long documents into ≤ `max_chunk_chars` pieces first so one 10 MB document cannot stall a
batch on one thread.
"""
from __future__ import annotations

import gzip
import importlib.resources
import os
from typing import Iterable, Sequence

import numpy as np
from etils import epath
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from monojax import errors

NEOX_NAME = "gpt-neox-20b"
NEOX_VOCAB_SIZE = 50_277
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
MAX_CHUNK_CHARS = 32_768


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
  """Embedding rows: the vocab rounded up to a multiple (Pythia pads 50,277 to 50,304)."""
  return -(-vocab_size // multiple) * multiple


def _read_tokenizer_json(spec: str) -> str:
  if spec == NEOX_NAME:
    data = importlib.resources.files("monojax.assets").joinpath("gpt-neox-20b.tokenizer.json.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")
  path = epath.Path(os.path.expanduser(spec))
  if not path.exists():
    raise errors.MissingInputError(f"data.tokenizer: {spec!r} is neither {NEOX_NAME!r} nor an existing tokenizer.json(.gz) file")
  data = path.read_bytes()
  if path.name.endswith(".gz"):
    data = gzip.decompress(data)
  return data.decode("utf-8")


def load_hf_tokenizer(spec: str) -> Tokenizer:
  """Loads 'gpt-neox-20b' (vendored) or a tokenizer.json(.gz) path."""
  try:
    tok = Tokenizer.from_str(_read_tokenizer_json(spec))
  except Exception as e:  # tokenizers raises a bare Exception on bad JSON
    if isinstance(e, FileNotFoundError):
      raise
    raise errors.ConfigError(f"data.tokenizer: {spec!r} is not a valid HF tokenizer.json ({e})") from None
  # Corpus text that literally contains "<|endoftext|>" must stay text; EOS is only what we insert.
  tok.encode_special_tokens = True
  if tok.token_to_id(EOS_TOKEN) is None:
    raise errors.ConfigError(f"data.tokenizer: {spec!r} has no {EOS_TOKEN!r} token; monojax needs it as the document separator")
  return tok


def split_long_text(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
  """Splits text into consecutive pieces of ≤ max_chars that concatenate back to `text` exactly.

  Cuts prefer a paragraph break, then a newline, then a space, in the last half of each window.
  """
  if len(text) <= max_chars:
    return [text]
  pieces, start = [], 0
  while len(text) - start > max_chars:
    window = text[start:start + max_chars]
    cut = -1
    for sep in ("\n\n", "\n", " "):
      i = window.rfind(sep, max_chars // 2)
      if i > 0:
        cut = i + len(sep)
        break
    if cut <= 0:
      cut = max_chars
    pieces.append(text[start:start + cut])
    start += cut
  pieces.append(text[start:])
  return pieces


class TextTokenizer:
  """Picklable wrapper: documents → one int32 id stream with EOS after each document."""

  def __init__(self, spec: str, max_chunk_chars: int = MAX_CHUNK_CHARS):
    self.spec = spec
    self.max_chunk_chars = max_chunk_chars
    self._tok: Tokenizer | None = None
    tok = self.hf  # validate eagerly so a bad spec fails at startup, not inside a worker
    self.vocab_size = tok.get_vocab_size()
    self.eos_id = tok.token_to_id(EOS_TOKEN)
    self.pad_id = tok.token_to_id(PAD_TOKEN)

  @property
  def hf(self) -> Tokenizer:
    if self._tok is None:
      self._tok = load_hf_tokenizer(self.spec)
    return self._tok

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tok"] = None
    return state

  def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
    """Concatenated ids of all documents, each followed by EOS."""
    chunks, owner = [], []
    for d, text in enumerate(texts):
      for piece in split_long_text(text, self.max_chunk_chars):
        chunks.append(piece)
        owner.append(d)
    encodings = self.hf.encode_batch(chunks, add_special_tokens=False) if chunks else []
    out: list[np.ndarray] = []
    for i, enc in enumerate(encodings):
      out.append(np.asarray(enc.ids, np.int32))
      if i + 1 == len(encodings) or owner[i + 1] != owner[i]:
        out.append(np.array([self.eos_id], np.int32))
    return np.concatenate(out) if out else np.zeros((0,), np.int32)

  def count_tokens(self, texts: Sequence[str]) -> int:
    """Tokens of the documents without the EOS separators."""
    return int(self.encode_documents(texts).size) - len(texts)

  def token_byte_lengths(self, size: int | None = None) -> np.ndarray:
    """UTF-8 bytes each token id stands for (EOS/padding and ids past the vocab: 0), for bits per byte.

    Byte-level BPE writes each byte as one character of the token string, so the length of the
    string is the byte count; added tokens (NeoX's whitespace runs) count their own UTF-8 bytes.
    """
    size = size or self.vocab_size
    out = np.zeros((size,), np.int32)
    added = self.hf.get_added_tokens_decoder()
    for i in range(min(size, self.vocab_size)):
      if i in added:
        out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
      else:
        tok = self.hf.id_to_token(i)
        out[i] = len(tok) if tok is not None else 0
    return out

  def decode(self, ids: Iterable[int]) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike | None = None,
              batch_docs: int = 64) -> Tokenizer:
  """Trains a byte-level BPE with NeoX-style specials (EOS id 0, padding id 1); optionally saves it."""
  if vocab_size < 300:
    raise errors.ConfigError(f"data.bpe_vocab_size must be ≥ 300 (256 bytes + specials + merges), got {vocab_size}")
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=[EOS_TOKEN, PAD_TOKEN])

  def batches():
    batch = []
    for t in texts:
      batch.append(t)
      if len(batch) == batch_docs:
        yield batch
        batch = []
    if batch:
      yield batch

  tok.train_from_iterator(batches(), trainer=trainer)
  if out_path is not None:
    out_path = epath.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f"{out_path.name}.tmp-{os.getpid()}"
    tmp.write_text(tok.to_str())
    tmp.replace(out_path)
  return tok


# ------------------------------------------------------------------------ the run's own tokenizer

RUN_TOKENIZER_FILE = "tokenizer.json"  # in a workdir: the exact tokenizer the run trained with


def save_for_run(tok: TextTokenizer, workdir: str) -> str | None:
  """Copies the tokenizer into the workdir, so every later use of the run reads exactly it (a
  `bpe:` vocabulary is never trained again). The vendored NeoX tokenizer ships with monojax and is
  not copied (returns None). An existing copy that differs is an error: the run was trained with
  another tokenizer, and the copy is not overwritten."""
  if tok.spec == NEOX_NAME:
    return None
  from monojax import files
  path = os.path.join(workdir, RUN_TOKENIZER_FILE)
  text = _read_tokenizer_json(tok.spec)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as fh:
      if fh.read() != text:
        raise errors.ConfigError(f"data.tokenizer: {tok.spec!r} is not the tokenizer this run was trained with "
                                 f"({path}); use that one, or another --workdir")
    return path
  os.makedirs(workdir, exist_ok=True)
  files.atomic_write(path, text)
  return path


def run_tokenizer_path(workdir: str) -> str | None:
  """The run's copy of its tokenizer, or None (the vendored NeoX tokenizer, or an older run)."""
  path = os.path.join(workdir, RUN_TOKENIZER_FILE)
  return path if os.path.exists(path) else None
