"""Every rule a config must satisfy, in one table, checked once at the entry point before anything
is read or written (`validate`). A broken rule is one line naming the field and what was expected
(errors.ConfigError: the entry point prints `monojax: error: <field>: ...` and exits 2).

The table holds what can be checked from the config alone; what needs the data or a device (the
validation split's size, the devices a mesh needs, a frozen LM's layers) is checked where it is
known, with the same kind of error.
"""
from __future__ import annotations

import math
import os

from monojax import errors

ANY = None
# field: allowed values
CHOICES = {
    "mode": ("lm", "cotrain", "frozen", "toy"),
    "data.format": ("raw", "packed"),
    "data.on_error": ("raise", "skip"),
    "model.positional": ("learned", "rotary"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.dtype": ("float32", "bfloat16"),
    "train.ce_kernel": ("auto", "on", "off"),
    "sae.sparse_update": ("auto", "on", "off"),
    "sae.screen_bf16": ("auto", "on", "off"),
    "toy.magnitude": ("uniform", "exponential", "constant"),
    "analysis.autointerp": ("offline", ""),   # a language model needs flags and a key: python -m monojax.autointerp
}
# field: (low, high, low inclusive, high inclusive); ANY = unbounded on that side
RANGES = {
    "seed": (0, ANY, True, True),
    "data.seed": (0, ANY, True, True),
    "data.seq_len": (1, ANY, True, True),
    "data.global_batch": (1, ANY, True, True),
    "data.shuffle_windows": (0, ANY, True, True),
    "data.num_threads": (1, ANY, True, True),
    "data.prefetch": (0, ANY, True, True),
    "data.workers": (0, ANY, True, True),
    "data.tokenize_batch_docs": (1, ANY, True, True),
    "data.max_chunk_chars": (1, ANY, True, True),
    "data.device_prefetch": (0, ANY, True, True),
    "data.count_tokens_mb_per_file": (0, ANY, False, True),
    "data.bpe_train_mb": (0, ANY, False, True),
    "data.max_line_bytes": (1, ANY, True, True),
    "model.d_model": (1, ANY, True, True),
    "model.d_mlp": (1, ANY, True, True),
    "model.n_layers": (1, ANY, True, True),
    "model.n_heads": (1, ANY, True, True),
    "model.d_head": (1, ANY, True, True),
    "model.init_std": (0, ANY, False, True),
    "train.steps": (1, ANY, True, True),
    "train.lr": (0, ANY, False, True),
    "train.warmup_steps": (0, ANY, True, True),
    "train.final_lr_ratio": (0, 1, True, True),
    "train.weight_decay": (0, ANY, True, True),
    "train.b1": (0, 1, True, False),
    "train.b2": (0, 1, True, False),
    "train.eps": (0, ANY, False, True),
    "train.grad_clip": (0, ANY, True, True),
    "train.loss_chunk": (0, ANY, True, True),
    "train.log_every": (1, ANY, True, True),
    "train.eval_every": (0, ANY, True, True),
    "train.eval_batches": (1, ANY, True, True),
    "train.ckpt_every": (1, ANY, True, True),
    "train.keep_checkpoints": (1, ANY, True, True),
    "train.peak_flops": (0, ANY, True, True),
    "train.debug_step_delay_s": (0, ANY, True, True),
    "sae.layer": (0, ANY, True, True),
    "sae.start_step": (0, ANY, True, True),
    "sae.positions_per_context": (1, ANY, True, True),
    "sae.buffer_steps": (1, ANY, True, True),
    "sae.init_inputs": (1, ANY, True, True),
    "sae.batch_size": (1, ANY, True, True),
    "sae.lr": (0, ANY, False, True),
    "sae.lr_2024": (0, ANY, False, True),
    "sae.lr_topk": (0, ANY, False, True),
    "sae.b1": (0, 1, True, False),
    "sae.b2": (0, 1, True, False),
    "sae.eps": (0, ANY, False, True),
    "sae.dead_window": (0, 1, False, True),
    "sae.resample_inputs": (1, ANY, True, True),
    "sae.resample_encoder_scale": (0, ANY, False, True),
    "sae.lambda_warmup_frac": (0, 1, True, True),
    "sae.lr_decay_frac": (0, 1, True, True),
    "sae.grad_clip": (0, ANY, True, True),
    "sae.init_decoder_norm": (0, ANY, False, True),
    "sae.topk_k": (1, ANY, True, True),
    "sae.aux_k": (0, ANY, True, True),
    "sae.aux_k_coef": (0, ANY, True, True),
    "sae.density_window": (0, 1, False, True),
    "sae.ultralow_density": (0, 1, False, False),
    "sae.dense_density": (0, 1, False, True),
    "sae.min_ablation_gap": (0, ANY, True, True),
    "sae.alarm_dead_frac": (0, 1, False, True),
    "preview_batches": (0, ANY, True, True),
    "analysis.tokens": (0, ANY, True, True),
    "toy.n_features": (1, ANY, True, True),
    "toy.d": (1, ANY, True, True),
    "toy.p_active": (0, 1, False, True),
    "toy.scale_min": (0, ANY, False, True),
    "toy.scale_max": (0, ANY, False, True),
    "toy.corr": (0, 1, True, False),
    "toy.corr_block": (1, ANY, True, True),
    "toy.offset_norm": (0, ANY, True, True),
    "toy.noise_std": (0, ANY, True, True),
    "toy.steps": (1, ANY, True, True),
    "toy.eval_samples": (1, ANY, True, True),
    "toy.recovered_cos": (0, 1, False, True),
}


def _get(cfg, field: str):
  node = cfg
  for part in field.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _range_text(low, high, low_in, high_in) -> str:
  if high is ANY:
    return f"a number {'≥' if low_in else '>'} {low:g}"
  return f"a number in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def validate(cfg, workdir: str | None = None) -> None:
  """Raises errors.ConfigError (one line, the field named) for the first rule `cfg` breaks."""
  for field, allowed in CHOICES.items():
    v = _get(cfg, field)
    if v is not _MISSING and v not in allowed:
      raise errors.ConfigError(f"{field}: expected one of {', '.join(allowed)}; got {v!r}")
  for field, (low, high, low_in, high_in) in RANGES.items():
    v = _get(cfg, field)
    if v is _MISSING:
      continue
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= low if low_in else v > low) and (high is ANY or (v <= high if high_in else v < high))
    if not ok:
      raise errors.ConfigError(f"{field}: expected {_range_text(low, high, low_in, high_in)}; got {v!r}")
  _cross_field(cfg)
  for field, path in (("--workdir", workdir), ("data.index_dir", cfg.data.index_dir), ("data.packed_dir", cfg.data.packed_dir)):
    if path and "://" in str(path):
      raise errors.ConfigError(f"{field}: {path} is an object-store URL; monojax commits its files and caches by "
                               "renaming directories, which object stores cannot do: mount the bucket (e.g. "
                               "gcsfuse) and give the mounted path")


def _cross_field(cfg) -> None:
  d, t, m, s = cfg.data, cfg.train, cfg.model, cfg.sae
  if t.loss_chunk and d.seq_len % t.loss_chunk:
    raise errors.ConfigError(f"train.loss_chunk: expected 0 or a divisor of data.seq_len={d.seq_len}; got {t.loss_chunk}")
  if cfg.mode != "frozen" and m.positional == "learned" and m.max_seq_len is not None and m.max_seq_len < d.seq_len:
    raise errors.ConfigError(f"model.max_seq_len: expected ≥ data.seq_len={d.seq_len}; got {m.max_seq_len}")
  tok = str(d.tokenizer)
  if tok.startswith("bpe:"):
    if not tok[4:].isdigit() or int(tok[4:]) < 300:
      raise errors.ConfigError(f"data.tokenizer: expected 'bpe:<vocab size ≥ 300>'; got {tok!r}")
  elif tok != "gpt-neox-20b" and "://" not in tok and not os.path.exists(os.path.expanduser(tok)):
    raise errors.ConfigError(f"data.tokenizer: expected 'gpt-neox-20b', 'bpe:<vocab>' or an existing tokenizer.json "
                             f"path; got {tok!r}")
  shape, axes = tuple(cfg.mesh.shape), tuple(cfg.mesh.axes)
  if len(shape) != len(axes) or any(not isinstance(n, int) or (n < 1 and n != -1) for n in shape) \
      or list(shape).count(-1) > 1:
    raise errors.ConfigError(f"mesh.shape: expected one positive size (at most one -1) per axis of {axes}; got {shape}")
  if cfg.mode == "frozen" and not cfg.lm_checkpoint:
    raise errors.ConfigError("lm_checkpoint: frozen mode needs the workdir of a finished LM run "
                             "(--config.lm_checkpoint=runs/quickstart)")
  if cfg.mode not in ("frozen",) and cfg.lm_checkpoint:
    raise errors.ConfigError(f"lm_checkpoint: only read in frozen mode (configs/sae.py); mode is {cfg.mode!r}")
  if cfg.mode in ("cotrain", "frozen") and s.enabled:
    _sae_rules(cfg)


def _sae_rules(cfg) -> None:
  from monojax.sae import catalogue  # parses sae.saes with its own one-line errors
  d, t, s = cfg.data, cfg.train, cfg.sae
  catalogue.parse_specs(s.saes)
  if cfg.mode != "frozen" and s.layer >= cfg.model.n_layers:  # a frozen run's layers are the LM's: job setup
    raise errors.ConfigError(f"sae.layer: expected < model.n_layers={cfg.model.n_layers}; got {s.layer}")
  per_step = d.global_batch * min(s.positions_per_context, d.seq_len)
  if per_step % s.batch_size:
    raise errors.ConfigError(
        f"sae.batch_size: expected a divisor of data.global_batch x sae.positions_per_context = {per_step} (each "
        f"sampled vector is used once); got {s.batch_size}")
  first_sae_step = s.start_step + s.buffer_steps
  if t.steps <= first_sae_step:
    raise errors.ConfigError(
        f"train.steps: expected > sae.start_step + sae.buffer_steps = {first_sae_step} (the SAE trains after its "
        f"buffer fills); got {t.steps}")
  fractions = tuple(s.resample_at)
  if any(not isinstance(f, (int, float)) or not 0 < f < 1 for f in fractions):
    raise errors.ConfigError(f"sae.resample_at: expected fractions of the SAE run in (0, 1); got {fractions}")
