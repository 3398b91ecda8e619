"""A run's SAEs in SAELens' on-disk format (the sae-lens 6 series; read against 6.18.0's
`sae_lens/saes/sae.py`, `standard_sae.py`, `topk_sae.py`, `constants.py` and
`loading/pretrained_sae_loaders.py`): one folder per SAE with

  cfg.json                 SAEConfig.to_dict(): architecture ("standard", or "topk" with k), d_in,
                           d_sae, dtype "float32", device "cpu", apply_b_dec_to_input true,
                           normalize_activations "none", reshape_activations "none", metadata
                           {sae_lens_version "6.18.0" (the format; an older or missing one sends the
                           loader down its pre-6 conversion), hook_name "blocks.<L>.mlp.hook_post",
                           model_name, context_size, prepend_bos false, ..., monojax {run, step, sae,
                           label, recipe, ...}}
  sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], fp32

so that `sae_lens.SAE.load_from_disk(folder)` builds a StandardSAE (TopKSAE) whose `encode(x)` on RAW
MLP activations x returns monojax's reported feature activations (`Run.features`, `core.encode`) and
whose `decode` returns monojax's reconstruction in the input's units (`core.reconstruct`).

The mapping. monojax (sae/recipes.py, sae/core.py), per SAE with parameters W_e [d, m], b_e, W_d
[m, d], b_d, input scale c (`run.input_scale(sae)`: 1 for an SAE on raw activations), pre-encoder
bias p = b_d for the 2023 and topk recipes (p = 0 for 2024) and reporting factor r_i
(`Recipe.reported_factor`: ‖W_d,i‖ / c for 2024, 1 / c for the unit-norm decoders):

  pre = (c·x − p) W_e + b_e      f = act(pre)      a = r ⊙ f      x̂ = (f W_d + b_d) / c

SAELens (standard; topk keeps the k largest of the pre-activation, then ReLU):

  a' = act((x − b_dec) W_enc + b_enc)      x̂' = a' W_dec + b_dec

With ReLU (and TopK, for r > 0 and equal across features, as it is for topk) commuting with a
positive per-feature factor, a' = a and x̂' = x̂ for every x when

  b_dec        = b_d / c
  W_enc[:, i]  = c · r_i · W_e[:, i]
  b_enc[i]     = r_i · (b_e + (b_d − p) W_e)[i]          (= r_i · b_e[i] where p = b_d)
  W_dec[i, :]  = W_d[i, :] / (c · r_i)                   (W_d's unit rows for 2024; W_d itself otherwise)

(a feature with r_i = 0, a 2024 decoder row of norm 0, gets zero columns/rows: it is 0 on both sides).
The folding is done in float64 and stored as float32. No activation normalisation is left for
SAELens to apply (normalize_activations "none"): the constant c is inside the weights.
"""
from __future__ import annotations

import json
import os

import numpy as np

SAE_LENS_VERSION = "6.18.0"  # the on-disk format written (benchmarks/setup_anchors.sh pins this sae-lens)
WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
CFG_FILE = "cfg.json"                     # sae_lens.constants.SAE_CFG_FILENAME


def hook_name(layer: int) -> str:
  """TransformerLens' name of the MLP post-ReLU activations of block `layer` (what the SAEs read)."""
  return f"blocks.{int(layer)}.mlp.hook_post"


def model_name(run) -> str:
  """The name both exports give the run's LM (TL's cfg.model_name, SAELens' metadata.model_name)."""
  return f"monojax-{os.path.basename(run.workdir.rstrip(os.sep))}"


def sae_weights(run, sae) -> dict[str, np.ndarray]:
  """{W_enc, b_enc, W_dec, b_dec} (fp32 numpy) of `sae` in SAELens' convention (the module docstring)."""
  import jax
  from monojax.sae import core as sae_core
  sae = run.sae(sae)
  params = {k: np.asarray(v, np.float64) for k, v in jax.device_get(sae_core.member_params(run.sae_state, sae)).items()}
  W_e, b_e, W_d, b_d = params["W_e"], params["b_e"], params["W_d"], params["b_d"]
  c = float(run.input_scale(sae))
  recipe = sae.rules
  if recipe.unit_norm_decoder:
    r = np.full((sae.width,), 1.0 / c)
  else:
    r = np.linalg.norm(W_d, axis=-1) / c
  p = b_d if recipe.pre_bias else np.zeros_like(b_d)
  cr = c * r
  safe = np.where(cr > 0, cr, 1.0)
  out = {
      "W_enc": W_e * cr[None, :],
      "b_enc": r * (b_e + (b_d - p) @ W_e),
      "W_dec": np.where((cr > 0)[:, None], W_d / safe[:, None], 0.0),
      "b_dec": b_d / c,
  }
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def sae_config(run, sae) -> dict:
  """SAELens 6's cfg.json for `sae` (SAEConfig.to_dict() of a StandardSAEConfig or TopKSAEConfig)."""
  sae = run.sae(sae)
  cfg = {
      "architecture": "topk" if sae.k else "standard",
      "d_in": int(sae.d_in), "d_sae": int(sae.width), "dtype": "float32", "device": "cpu",
      "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
  }
  if sae.k:
    cfg.update(k=min(int(sae.k), int(sae.width)), rescale_acts_by_decoder_norm=False)  # monojax clamps k too
  cfg["metadata"] = {
      "sae_lens_version": SAE_LENS_VERSION, "sae_lens_training_version": None,
      "model_name": model_name(run), "model_class_name": "HookedTransformer", "hook_name": hook_name(sae.layer),
      "hook_head_index": None, "context_size": int(run.cfg.data.seq_len), "prepend_bos": False,
      "seqpos_slice": [None], "model_from_pretrained_kwargs": {},
      "monojax": {"run": run.workdir, "step": int(run.step), "sae": sae.name, "label": sae.label,
                  "recipe": sae.recipe, "width": int(sae.width), "l1": float(sae.l1), "k": int(sae.k),
                  "layer": int(sae.layer), "input_scale": float(run.input_scale(sae)), "scaled": bool(sae.scaled),
                  "train_dtype": str(run.cfg.train.dtype)},
  }
  return cfg


def write(run, saes, out_dir: str) -> list[str]:
  """Writes out_dir/<sae name>/{cfg.json, sae_weights.safetensors} for each SAE; returns the folders."""
  from safetensors.numpy import save_file
  folders = []
  for s in saes:
    s = run.sae(s)
    folder = os.path.join(out_dir, s.name)
    os.makedirs(folder, exist_ok=True)
    save_file(sae_weights(run, s), os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CFG_FILE), "w", encoding="utf-8") as f:
      json.dump(sae_config(run, s), f, indent=1)
    folders.append(folder)
  return folders
