"""A run's LM as TransformerLens files (read against transformer-lens 2.18.0's HookedTransformerConfig,
components/abstract_attention.py and components/layer_norm.py):

  config.json        HookedTransformerConfig keyword arguments (dtype as a string: "float32")
  model.safetensors  the HookedTransformer state dict (parameters only; TL rebuilds its buffers:
                     attention masks, IGNORE, rotary sin/cos), fp32
  tokenizer.json     the run's tokenizer (its workdir copy, or the vendored NeoX one)
  monojax_export.json  where it came from

`load_hooked_transformer(folder)` builds the model from them (torch and transformer_lens are
imported lazily; neither is a monojax dependency). Its logits equal `Run.logits` (fp32; a run
trained in bf16 computes its own in bf16, so there they agree to bf16 rounding).

Layouts (monojax/models/transformer.py names follow TL): W_Q/W_K/W_V [d_model, heads, d_head] ->
[heads, d_model, d_head]; everything else as is. W_E and W_U are cut to the tokenizer's vocabulary
(monojax pads the table to a multiple of 128; Run.logits drops those columns), a tied W_U is written
as W_Eᵀ, and unembed.b_U (which monojax lacks) is 0. Both LayerNorms centre, divide by
sqrt(mean(x²) + eps) with eps 1e-5, then w·x + b ("LN", eps 1e-5). Rotary: GPT-NeoX rotate-half over
the whole head (rotary_dim = d_head, base 10000, rotary_adjacent_pairs False); the attention scale
is sqrt(d_head) on both sides.
"""
from __future__ import annotations

import json
import os

import numpy as np

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
LN_EPS = 1e-5  # models/transformer.LayerNorm


def _blocks(params) -> list:
  blocks = params["blocks"]
  if isinstance(blocks, dict):
    return [blocks[k] for k in sorted(blocks, key=int)]
  return list(blocks)


def state_dict(params: dict, *, n_ctx: int | None = None, d_vocab: int | None = None) -> dict[str, np.ndarray]:
  """TL state dict (fp32 numpy) of monojax LM parameters (a nested dict, as nnx.State.to_pure_dict()
  gives them). n_ctx: rows of W_pos kept (default all); d_vocab: rows of W_E / columns of W_U kept
  (default all: the padded table)."""
  p = params
  W_E = np.asarray(p["W_E"], np.float32)
  W_U = np.asarray(p["W_U"], np.float32) if "W_U" in p else W_E.T  # tied embeddings written untied
  d_vocab = W_E.shape[0] if d_vocab is None else int(d_vocab)
  out = {"embed.W_E": W_E[:d_vocab]}
  if "W_pos" in p:
    W_pos = np.asarray(p["W_pos"], np.float32)
    out["pos_embed.W_pos"] = W_pos[: W_pos.shape[0] if n_ctx is None else int(n_ctx)]
  for i, blk in enumerate(_blocks(p)):
    att, mlp, pre = blk["attn"], blk["mlp"], f"blocks.{i}."
    out.update({
        pre + "ln1.w": blk["ln1"]["w"], pre + "ln1.b": blk["ln1"]["b"],
        pre + "ln2.w": blk["ln2"]["w"], pre + "ln2.b": blk["ln2"]["b"],
        pre + "attn.W_Q": np.transpose(att["W_Q"], (1, 0, 2)), pre + "attn.W_K": np.transpose(att["W_K"], (1, 0, 2)),
        pre + "attn.W_V": np.transpose(att["W_V"], (1, 0, 2)), pre + "attn.W_O": att["W_O"],
        pre + "attn.b_Q": att["b_Q"], pre + "attn.b_K": att["b_K"], pre + "attn.b_V": att["b_V"],
        pre + "attn.b_O": att["b_O"],
        pre + "mlp.W_in": mlp["W_in"], pre + "mlp.b_in": mlp["b_in"], pre + "mlp.W_out": mlp["W_out"],
        pre + "mlp.b_out": mlp["b_out"],
    })
  out.update({"ln_final.w": p["ln_final"]["w"], "ln_final.b": p["ln_final"]["b"],
              "unembed.W_U": W_U[:, :d_vocab], "unembed.b_U": np.zeros((d_vocab,), np.float32)})
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def tl_config(run) -> dict:
  """HookedTransformerConfig keyword arguments of the run's LM (json-able; dtype as a string)."""
  from monojax.export import saelens
  m = run.cfg.model
  cfg = {
      "model_name": saelens.model_name(run), "original_architecture": "monojax",
      "n_layers": int(m.n_layers), "d_model": int(m.d_model), "n_heads": int(m.n_heads), "d_head": int(m.d_head),
      "d_mlp": int(m.d_mlp), "d_vocab": int(run.tokenizer.vocab_size), "d_vocab_out": int(run.tokenizer.vocab_size),
      "n_ctx": int(m.max_seq_len), "act_fn": "relu", "normalization_type": "LN", "eps": LN_EPS,
      "positional_embedding_type": "rotary" if m.positional == "rotary" else "standard",
      "attn_only": False, "tie_word_embeddings": False, "tokenizer_name": None, "default_prepend_bos": False,
      "init_weights": False, "dtype": "float32",
  }
  if m.positional == "rotary":
    cfg.update(rotary_dim=int(m.d_head), rotary_base=10000, rotary_adjacent_pairs=False)
  return cfg


def _tokenizer_text(run) -> str:
  from monojax.data import tokenizer as tokenizer_lib
  path = tokenizer_lib.run_tokenizer_path(run.workdir)
  spec = run.tokenizer.spec
  if path is None and spec == tokenizer_lib.NEOX_NAME:
    import gzip
    import importlib.resources
    data = importlib.resources.files("monojax.assets").joinpath("gpt-neox-20b.tokenizer.json.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")
  with open(path or spec, encoding="utf-8") as f:  # an older run: the cached BPE it used (run.py)
    return f.read()


def write(run, out_dir: str) -> str:
  """Writes config.json, model.safetensors and tokenizer.json into out_dir; returns out_dir."""
  import jax
  from flax import nnx
  from safetensors.numpy import save_file
  cfg = tl_config(run)
  params = jax.device_get(nnx.to_pure_dict(run.params))
  sd = state_dict(params, n_ctx=cfg["n_ctx"], d_vocab=cfg["d_vocab"])
  os.makedirs(out_dir, exist_ok=True)
  save_file(sd, os.path.join(out_dir, WEIGHTS_FILE))
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=1)
  with open(os.path.join(out_dir, TOKENIZER_FILE), "w", encoding="utf-8") as f:
    f.write(_tokenizer_text(run))
  return out_dir


def load_hooked_transformer(path: str, device: str = "cpu", tokenizer: bool = True):
  """A HookedTransformer (eval mode) from an export folder, offline. tokenizer: attach
  tokenizer.json as a transformers PreTrainedTokenizerFast (monojax adds no BOS; `<|endoftext|>`
  separates documents)."""
  import torch
  from safetensors.torch import load_file
  from transformer_lens import HookedTransformer, HookedTransformerConfig
  with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
    cfg = json.load(f)
  cfg = dict(cfg, dtype=getattr(torch, cfg.get("dtype", "float32")), device=device)
  model = HookedTransformer(HookedTransformerConfig(**cfg))
  if tokenizer and os.path.exists(os.path.join(path, TOKENIZER_FILE)):
    from transformers import PreTrainedTokenizerFast
    # Set directly, as TL's set_tokenizer ends: that method reloads a tokenizer by name to add a BOS
    # (monojax has none; <|endoftext|> separates documents and stands in as TL's BOS).
    eos = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, TOKENIZER_FILE), eos_token=eos, bos_token=eos,
                                  padding_side="right")
    tok.pad_token = "<|padding|>" if "<|padding|>" in tok.get_vocab() else eos  # monojax's pad, where it has one
    model.tokenizer = tok
    model.cfg.tokenizer_prepends_bos = False
  theirs = model.state_dict()
  ours = load_file(os.path.join(path, WEIGHTS_FILE), device=str(device))
  buffers = ("mask", "IGNORE", "rotary_sin", "rotary_cos")  # TL computes these itself
  unknown = sorted(set(ours) - set(theirs))
  missing = sorted(k for k in set(theirs) - set(ours) if k.rsplit(".", 1)[-1] not in buffers)
  if unknown or missing:
    raise KeyError(f"{path}: the state dict does not fit this TransformerLens (unknown {unknown[:5]}, "
                   f"missing {missing[:5]})")
  theirs.update(ours)
  model.load_state_dict(theirs)
  return model.eval()
