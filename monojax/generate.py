"""Steering a run's LM through its SAE's features: clamp, scale or ablate features and sample.

  python -m monojax.generate --workdir=RUN --prompt=TEXT [--sae=sae0] [--clamp=ID=VALUE ...]
      [--scale=ID=FACTOR ...] [--ablate=ID ...] [--samples=N] [--max_new_tokens=32]
      [--temperature=T] [--top_p=P] [--seed=S]

At the SAE's layer the MLP activations x become x̂(f') + (x − x̂(f)): the SAE's error term is kept
and f' is the features f with the edits applied at every position (the prompt's and the generated
ones). Values are in the SAE's reported feature units, those the FeatureInspector shows. Prints the
shift of the next-token distribution after the prompt (tokens raised and lowered most, with their
probability before and after, and KL(clean‖edited)), then continuations without and with the edits
side by side, drawn with the same random numbers so they differ only by the intervention.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import sys

from monojax import errors
from monojax import text as text_lib

PROG = "python -m monojax.generate"
COLUMN = 44   # characters of continuation text per column line


def _feature_id(s: str) -> int:
  try:
    v = int(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a feature id (an integer ≥ 0), got {s!r}") from None
  if v < 0:
    raise argparse.ArgumentTypeError(f"expected a feature id (an integer ≥ 0), got {s!r}")
  return v


def _id_value(s: str) -> tuple[int, float]:
  feature, sep, value = s.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"expected ID=NUMBER, got {s!r}")
  try:
    number = float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected ID=NUMBER, got {s!r}") from None
  if not math.isfinite(number):
    raise argparse.ArgumentTypeError(f"expected a finite number in {s!r}")
  return _feature_id(feature.strip()), number


def _positive_int(s: str) -> int:
  try:
    v = int(s)
  except ValueError:
    v = 0
  if v < 1:
    raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {s!r}")
  return v


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="the run (a directory written by monojax.main)")
  p.add_argument("--prompt", required=True, help="the text to continue")
  p.add_argument("--sae", default="sae0", help="the SAE whose features are edited (name or index; default sae0)")
  p.add_argument("--clamp", type=_id_value, action="append", default=[], metavar="ID=VALUE",
                 help="set feature ID to VALUE (reported units) at every position; repeatable")
  p.add_argument("--scale", type=_id_value, action="append", default=[], metavar="ID=FACTOR",
                 help="multiply feature ID by FACTOR at every position; repeatable")
  p.add_argument("--ablate", type=_feature_id, action="append", default=[], metavar="ID",
                 help="zero feature ID at every position; repeatable")
  p.add_argument("--samples", type=_positive_int, default=1, help="continuations per column (default 1)")
  p.add_argument("--max_new_tokens", type=_positive_int, default=32, help="tokens per continuation (default 32)")
  p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy (default 1)")
  p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
  p.add_argument("--seed", type=int, default=0, help="random seed, the same for both columns (default 0)")
  return p


def _edits(args):
  from monojax import interventions
  return ([interventions.Edit(i, "clamp", v) for i, v in args.clamp]
          + [interventions.Edit(i, "scale", v) for i, v in args.scale]
          + [interventions.Edit(i, "zero") for i in args.ablate])


def _describe(edit) -> str:
  return {"clamp": f"clamp {edit.feature}={edit.value:g}", "scale": f"scale {edit.feature}×{edit.value:g}",
          "zero": f"ablate {edit.feature}"}[edit.mode]


def _token(tokenizer, t: int) -> str:
  return "'" + text_lib.visible(tokenizer.decode([int(t)])) + "'"


def _wrap(s: str, width: int) -> list[str]:
  return [s[i:i + width] for i in range(0, len(s), width)] or [""]


def report(run, prompt: str, sae, edits, *, samples: int, max_new_tokens: int, temperature: float, top_p: float,
           seed: int, k: int = 5) -> str:
  """The text `main` prints (see the module docstring)."""
  from monojax import interventions
  record = run.sae(sae)
  if not prompt:
    raise errors.UserInputError("--prompt: empty; give some text to continue")
  ids = run.tokenizer.encode_documents([prompt])[:-1]
  max_len = int(run.cfg.model.max_seq_len)
  if ids.size == 0:
    raise errors.UserInputError("--prompt: the text has no tokens")
  if ids.size >= max_len:
    raise errors.UserInputError(f"--prompt: {ids.size} tokens; the model reads at most model.max_seq_len={max_len} "
                                "tokens, prompt and continuation together")
  interventions.edit_arrays(edits, record, 1, 1)   # feature ids checked before anything compiles
  shift = interventions.feature_shift(run, ids[None], record, edits, k=k)
  kw = {"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "seed": seed}
  clean = interventions.generate(run, ids, **kw)
  edited = interventions.generate(run, ids, sae=record, edits=edits, **kw)
  tok = run.tokenizer
  lines = [f"run: {run.workdir} (step {run.step}); {record.name} [{record.label}] at layer {record.layer}",
           f"prompt: '{text_lib.visible(prompt)}' ({ids.size} tokens)",
           "edits: " + (", ".join(map(_describe, edits)) or "none")
           + f" (at every position; {record.name}'s reported feature units; its error term kept)", "",
           f"next token after the prompt: KL(clean‖edited) = {shift.kl[0, -1]:.4g} nats"]
  half = 2 * COLUMN // 3

  def cell(token, before, after):
    return f"{token[:half]:<{half}} {before + ' → ' + after:<22}"
  rows = [(cell("raised most", "p clean", "edited"), cell("lowered most", "p clean", "edited"))]
  for j in range(shift.up_ids.shape[-1]):
    rows.append((cell(_token(tok, shift.up_ids[0, -1, j]), f"{shift.up_before[0, -1, j]:.3g}",
                      f"{shift.up_after[0, -1, j]:.3g}"),
                 cell(_token(tok, shift.down_ids[0, -1, j]), f"{shift.down_before[0, -1, j]:.3g}",
                      f"{shift.down_after[0, -1, j]:.3g}")))
  lines += [f"  {up} | {down}".rstrip() for up, down in rows]
  n = clean.shape[1]
  lines += ["", (f"continuations ({samples} sample(s), {n} tokens, temperature {temperature:g}, top_p {top_p:g}, "
                 f"seed {seed}; the same random draws in both columns):"),
            f"   {'clean':<{COLUMN}} | edited"]
  for i in range(clean.shape[0]):
    left = _wrap(text_lib.visible(tok.decode(clean[i])), COLUMN)
    right = _wrap(text_lib.visible(tok.decode(edited[i])), COLUMN)
    for j, (a, b) in enumerate(itertools.zip_longest(left, right, fillvalue="")):
      lines.append(f"{f'#{i}' if j == 0 else '':<3}{a:<{COLUMN}} | {b}")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for name in ("absl", "jax", "orbax", "etils", "grain"):
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    if not args.prompt:
      raise errors.UserInputError("--prompt: empty; give some text to continue")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
      raise errors.UserInputError(f"--temperature={args.temperature}: must be ≥ 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
      raise errors.UserInputError(f"--top_p={args.top_p}: must be in (0, 1]")
    from monojax.run import Run, check_workdir
    workdir = check_workdir(args.workdir)
    run = Run.open(workdir, log=logging.debug)
    sae = int(args.sae) if args.sae.isdigit() else args.sae
    print(report(run, args.prompt, sae, _edits(args), samples=args.samples, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, seed=args.seed))
    return 0
  except errors.UserInputError as e:
    print(f"monojax.generate: {text_lib.visible(str(e))}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.exit(main())
