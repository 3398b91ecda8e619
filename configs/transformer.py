"""The paper's one-layer transformer (Towards Monosemanticity, Bricken et al. 2023) at full scale:
the job a TPU pod runs. Models A and B are two runs of this file with --config.seed=0 and 1.

  python -m monojax.main --config=configs/transformer.py --config.data.path=/path/to/pile
"""
from monojax.config import base_config


def get_config():
  c = base_config()
  c.name = "transformer"
  c.data.tokenizer = "gpt-neox-20b"   # the Pile's own tokenizer, vocab 50,277 (padded to 50,304)
  c.data.format = "tfds"              # pre-packed windows: batch i is a pure function of i
  c.data.seq_len = 256                # the paper samples 250 activations per context: >= 250
  c.data.global_batch = 256
  c.data.workers = 2
  c.data.count_tokens = False         # the real Pile is ~300B tokens; counting it is not worth hours
  return c
