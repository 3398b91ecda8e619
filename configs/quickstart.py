"""Quickstart: the paper's code path sized for a 2-core CPU, on the built-in default corpus.

  python -m monojax.main --config=configs/quickstart.py
"""
from monojax.config import base_config


def get_config():
  c = base_config()
  c.name = "quickstart"
  # An 8k byte-level BPE trained on the corpus: at d_model 128 a 50k vocabulary makes the
  # unembedding most of the compute (see BUILD_NOTES.md, "Tokenizer").
  c.data.tokenizer = "bpe:8192"
  c.data.seq_len = 128
  c.data.global_batch = 32
  return c
