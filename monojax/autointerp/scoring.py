"""Scores of an explanation, in fp64, each with its definition:

  simulation  Spearman correlation between predicted (0-9) and true activations over every predicted
              token of the simulation examples (the paper's score); Pearson beside it. A constant
              prediction or constant truth scores 0, as the paper counts "all zeros".
  detection   balanced accuracy of "is the feature active in this context" (delphi)
  fuzzing     balanced accuracy of "are the marked tokens the active ones" (delphi)
  logits      accuracy of "would this token plausibly come next" over the 10th-60th largest logit
              effects and as many random tokens; chance is 0.5
"""
from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
  """Average ranks (ties share the mean of their positions), as scipy.stats.rankdata."""
  order = np.argsort(x, kind="mergesort")
  xs = x[order]
  ranks = np.empty(len(x), np.float64)
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and xs[j + 1] == xs[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
    i = j + 1
  return ranks


def pearson(pred, true) -> float:
  p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  if p.shape != t.shape or p.size < 2:
    raise ValueError(f"need two equal-length sequences of ≥ 2 values, got {p.shape} and {t.shape}")
  p, t = p - p.mean(), t - t.mean()
  denom = np.sqrt((p * p).sum() * (t * t).sum())
  return float((p * t).sum() / denom) if denom > 0 else 0.0


def spearman(pred, true) -> float:
  p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  if p.shape != t.shape or p.size < 2:
    raise ValueError(f"need two equal-length sequences of ≥ 2 values, got {p.shape} and {t.shape}")
  return pearson(_ranks(p), _ranks(t))


def balanced_accuracy(pred, truth) -> float | None:
  """Mean of the true-positive and true-negative rates (None without both classes)."""
  p, t = np.asarray(pred, bool), np.asarray(truth, bool)
  if not t.any() or t.all():
    return None
  return float(0.5 * ((p & t).sum() / t.sum() + (~p & ~t).sum() / (~t).sum()))


def accuracy(pred, truth) -> float | None:
  p, t = np.asarray(pred, bool), np.asarray(truth, bool)
  return float((p == t).mean()) if t.size else None
