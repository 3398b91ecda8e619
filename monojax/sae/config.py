"""The `sae` config section (the main config includes it as `c.sae = sae_config()`); every field is
documented here, once. Step-based fields are FRACTIONS of the SAE run length (`total_steps`, passed
to the SAE functions by the loop), so a short CPU run and the paper's 1M steps share one config.
Recipe rules: docs/paper-notes.md §3 (2023), §4.2 (April 2024), §9 (side by side).
"""
from __future__ import annotations

from ml_collections import config_dict


def sae_config() -> config_dict.ConfigDict:
  s = config_dict.ConfigDict()
  s.enabled = True                 # train SAEs on the MLP activations (False: LM only)
  # Comma-separated "width:l1:recipe" list; recipe is 2023 | 2024 | topk. SAEs with equal
  # (width, recipe) are stacked into one vmapped group, so a lambda sweep costs one batched update.
  # An empty l1 ("4096::2024") takes the recipe's default (2023: 0.004, §3.4; 2024: 5.0, §4.2);
  # topk has no l1 (write 0 or leave it empty): its sparsity is topk_k.
  s.saes = "4096:0.004:2023"
  s.batch_size = 4096              # activations per SAE step (paper 8,192, §3.3; April replications 4,096)
  s.sparse_update = "auto"         # exact sparse ReLU-SAE update on CPU (sae/sparse): auto | on | off
  s.screen_bf16 = "auto"           # its encoder GEMM in bf16 with an exact f32 recheck (sae/sparse/update.py):
                                   # auto (on where the CPU has AVX512-BF16 or AMX) | on | off
  s.normalize_inputs = True        # 2023 SAEs train on c·x with E‖c·x‖ = √n (the 2024 rule; 2024 and topk always
                                   # do), so λ means the same on any LM: λ on raw activations ≈ λ / c. False: raw
                                   # activations as the paper, where λ must suit the LM's scale (docs/paper-notes.md §3.4)

  # Adam, shared by all recipes (2023 betas/eps unstated -> PyTorch defaults; 2024 uses 0.9/0.999).
  s.lr = 1e-4                      # 2023 learning rate, constant (unstated in the paper; 1e-4 as Neel Nanda's 1L)
  s.lr_2024 = 5e-5                 # April-2024 peak learning rate (§4.2, from replications)
  s.lr_topk = 2e-4                 # TopK learning rate, constant (sparsify's 2e-4 at 16k latents)
  s.b1 = 0.9
  s.b2 = 0.999
  s.eps = 1e-8

  # 2023 dead-feature resampling (§3.5); 2023 groups only.
  s.resample_at = (0.025, 0.05, 0.075, 0.1)  # resample at these fractions of the SAE steps (25k..100k of 1M)
  s.dead_window = 0.0125           # "dead" = not fired in this fraction of the steps (12,500 of 1M); also TopK's AuxK
  s.resample_inputs = 819_200      # inputs whose loss seeds new features (100 x 8,192); capped by what the loop has
  s.resample_encoder_scale = 0.2   # new encoder row norm = this x mean alive encoder-row norm

  # April 2024 (§4.2); 2024 groups only.
  s.lambda_warmup_frac = 0.05      # l1 coefficient ramps linearly from 0 over this fraction of steps
  s.lr_decay_frac = 0.2            # lr decays linearly to 0 over this last fraction of steps
  s.grad_clip = 1.0                # global-norm clipping, per SAE (0 = off)
  s.init_decoder_norm = 0.1        # decoder columns start in random directions with this L2 norm (0.05-1 quoted)

  # TopK (OpenAI/sparsify practice; not part of the paper): unit-norm decoder, ReLU after top-k.
  s.topk_k = 32                    # active latents per token
  s.aux_k = 256                    # AuxK: the dead latents' top-k that model the residual (0 = off)
  s.aux_k_coef = 1.0 / 32          # AuxK loss weight (OpenAI's 1/32)

  # Feature density (§5.1, §3.6).
  s.density_window = 0.0125        # firing counts are kept per window of this fraction of the steps
                                   # (~100M tokens at paper scale, like the paper's density set); the
                                   # last complete window is what `core.density` reports
  s.ultralow_density = 1e-6        # features firing on fewer than this fraction of tokens (paper: < 1 in 1e6)
  s.dense_density = 0.01           # "dense": density above 1 %, many of which mean l1 is too low (§3.6)
  s.min_ablation_gap = 0.01        # nats: loss recovered is undefined (not reported) when zero-ablating the MLP
                                   # changes the held-out loss by less than this (or than 2 standard errors)
  s.alarm_dead_frac = 0.9          # warn (log + metrics "<sae>/alarm") when an SAE's dead share passes this or
                                   # its L0 falls below 1 during training: λ too large for these activations?
  return s
