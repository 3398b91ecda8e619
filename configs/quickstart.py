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
  c.train.steps = 1000
  c.train.lr = 3e-3                   # held-out loss at step 400: 5.54 (3e-3) vs 5.73 (1e-3); unigram 7.03
  # One 8x SAE (4,096 features, 2023 recipe) co-trained in the same step once the LM has warmed up.
  # The paper's λ 0.004 on normalised inputs (sae.normalize_inputs, E‖c·x‖ = √512): on this LM's
  # activations (c ≈ 9) the same pressure as λ ≈ 0.0004 raw; the raw 0.004 would kill every feature.
  c.sae.saes = "4096:0.004:2023"
  c.sae.start_step = 300
  c.sae.positions_per_context = 128   # all 128 positions of 32 contexts = one SAE batch of 4,096 per step
  c.sae.batch_size = 4096
  c.sae.lr = 1e-3                     # ~700 SAE updates on CPU, not the paper's 1M: a higher lr
  return c
