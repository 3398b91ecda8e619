"""A run's SAEs and LM in other libraries' formats (`python -m monojax.export`, its `__main__`):

  saelens          one SAELens 6 folder per SAE (cfg.json, sae_weights.safetensors): SAE.load_from_disk
                   reads it; encode/decode return monojax's reported activations / reconstruction
  transformerlens  config.json, model.safetensors, tokenizer.json: a HookedTransformer whose logits
                   are the run's (`transformerlens.load_hooked_transformer`)

`export_run` writes a folder whole: into OUT.tmp-<pid>, renamed onto OUT at the end; OUT may be
missing, empty or an earlier export (its MARKER file), never somebody else's folder.
"""
from __future__ import annotations

import json
import os
import shutil

from monojax import errors, files

FORMATS = ("saelens", "transformerlens")
MARKER = "monojax_export.json"  # in every export folder: what and where from
SCHEMA = "monojax.export/1"


def check_out(out: str) -> str:
  """The absolute --out, or a one-line error when it is a file or somebody else's non-empty folder."""
  path = os.path.abspath(os.path.expanduser(out))
  why = files.replace_refusal(path, MARKER, "monojax.export/")
  if why == "foreign":
    raise errors.UserInputError(f"--out={out}: a non-empty folder that is not a monojax export (no {MARKER}); "
                                "give a new or empty folder")
  if why:
    raise errors.UserInputError(f"--out={out}: exists and is {why}")
  if not os.path.isdir(os.path.dirname(path)):
    raise errors.MissingInputError(f"--out={out}: its parent folder {os.path.dirname(path)} does not exist")
  return path


def export_run(run, to: str, out: str, saes=None) -> str:
  """Writes `run` in format `to` (FORMATS) to folder `out`; saes: names/indices (saelens; default
  all). Returns the folder."""
  if to not in FORMATS:
    raise errors.UserInputError(f"--to={to}: choose one of {', '.join(FORMATS)}")
  out = check_out(out)
  picked = [run.sae(s) for s in (saes or run.saes)] if to == "saelens" else []
  if to == "saelens" and not picked:
    raise errors.UserInputError(f"{run.workdir}: an LM-only run has no SAEs to export (try --to=transformerlens)")
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    if to == "saelens":
      from monojax.export import saelens
      saelens.write(run, picked, tmp)
    else:
      from monojax.export import transformerlens
      transformerlens.write(run, tmp)
    record = {"schema": SCHEMA, "to": to, "run": run.workdir, "step": int(run.step),
              "saes": [{"name": s.name, "label": s.label} for s in picked]}
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
    files.replace_dir(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
