"""SAEs on a frozen, finished LM (the paper's protocol): the same step code with the LM forward only,
activations streamed from the grain pipeline through the mixing buffer.

  python -m monojax.main --config=configs/sae.py --config.lm_checkpoint=runs/quickstart
  # a λ sweep of three 8x SAEs, one batched update:
  python -m monojax.main --config=configs/sae.py --config.lm_checkpoint=runs/quickstart \
      --config.sae.saes=4096:0.002:2023,4096:0.004:2023,4096:0.008:2023

The model and tokenizer are read from the LM run's config.json; data.seq_len may differ (≤ the LM's).
"""
from monojax.config import base_config


def get_config():
  c = base_config()
  c.name = "sae"
  c.mode = "frozen"
  c.lm_checkpoint = ""             # required: the LM run's workdir
  c.data.seq_len = 128
  c.data.global_batch = 32
  c.train.steps = 1000             # LM forward passes; SAE updates = (steps - sae.buffer_steps) x updates/step
  c.train.eval_every = 250
  c.train.ckpt_every = 250
  c.sae.start_step = 0
  c.sae.positions_per_context = 128
  c.sae.batch_size = 4096
  c.sae.lr = 1e-3                  # CPU-length runs (~1k updates); the paper's 1M-step runs use a far lower lr
  return c
