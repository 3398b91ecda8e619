"""The paper's one-layer transformer (Towards Monosemanticity, Bricken et al. 2023) at full scale:
the job a TPU pod runs. Models A and B are two runs of this file with --config.seed=0 and 1.

  python -m monojax.main --config=configs/transformer.py --config.data.path=/path/to/pile
"""
from monojax.config import base_config


def get_config():
  c = base_config()
  c.name = "transformer"
  c.data.tokenizer = "gpt-neox-20b"   # the Pile's own tokenizer, vocab 50,277 (padded to 50,304)
  c.data.format = "packed"            # windows packed once, read by batch: batch i is a pure function of i
  c.data.seq_len = 256                # the paper samples 250 activations per context: >= 250
  c.data.global_batch = 256
  c.data.workers = 0                  # the packed reader needs no worker processes (BUILD_NOTES.md, "Performance, round two")
  c.data.count_tokens = False         # the real Pile is ~300B tokens; counting it is not worth hours
  c.train.steps = 200_000
  c.train.warmup_steps = 2_000
  c.train.eval_every = 5_000
  c.train.ckpt_every = 5_000
  c.train.loss_chunk = 64             # never materialise [batch x 256 x 50k] logits
  c.train.dtype = "bfloat16"          # fp32 master weights, fp32 loss
  # The paper's A/1 dictionary: 4,096 features, λ 0.004, batch 8,192, 2023 recipe.
  c.sae.saes = "4096:0.004:2023"
  c.sae.batch_size = 8192
  c.sae.start_step = 100_000          # co-train on the second half (frozen-LM protocol: configs/sae.py)
  c.sae.positions_per_context = 128   # 256 contexts x 128 = 32,768 vectors = 4 SAE batches per step
  c.sae.buffer_steps = 16
  return c
