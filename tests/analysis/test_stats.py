"""The streaming statistics of the analysis pass (monojax/analysis/stats.py, finalize.py) against slow
numpy references over all the tokens at once: counts, sums, histogram, top-k / bottom-k with their
windows, neuron and proxy sums, the stratified samples, the paper's intervals and repeat flags."""
import jax
import numpy as np
import pytest

from monojax.analysis import database, finalize, stats

B, T, F, D, P = 4, 32, 7, 3, 2
N_BATCHES = 3


def _np_hash(x):
  x = x.astype(np.uint32)
  with np.errstate(over="ignore"):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _np_priority(gidx, feat):
  with np.errstate(over="ignore"):
    h = _np_hash(gidx.astype(np.uint32) * np.uint32(0x9E3779B1) + _np_hash(feat.astype(np.uint32) + np.uint32(1)))
  return (h >> np.uint32(1)).astype(np.int64)


@pytest.fixture(scope="module")
def streamed():
  rng = np.random.default_rng(0)
  spec = stats.Spec(width=F, n_proxies=P, d_neurons=D, top_k=5, bottom_k=4, samples=2)
  acc = stats.init(spec)
  upd = jax.jit(stats.update, static_argnums=0)
  fs, xs, labs = [], [], []
  for i in range(N_BATCHES):
    # sparse, with a dead feature (column 6), ties (column 5 constant when firing) and a wide range
    f = np.maximum(rng.normal(size=(B, T, F)) * 10.0 ** rng.uniform(-3, 1, size=(1, 1, F)) - 0.5
                   * 10.0 ** rng.uniform(-3, 1, size=(1, 1, F)), 0).astype(np.float32)
    f[..., 6] = 0
    f[..., 5] = np.where(f[..., 5] > 0, 0.25, 0)
    x = rng.random((B, T, D)).astype(np.float32)
    lab = (rng.random((P, B, T)) < 0.3).astype(np.float32)
    acc = upd(spec, acc, f, i * B, neurons=x, proxies=lab)
    fs.append(f), xs.append(x), labs.append(lab)
  acc = {k: np.asarray(v) for k, v in jax.device_get(acc).items()}
  return spec, acc, np.concatenate(fs), np.concatenate(xs), np.concatenate(labs, axis=1)


def test_sums_counts_max_histogram(streamed):
  spec, acc, f, x, lab = streamed
  flat = f.reshape(-1, F).astype(np.float64)
  np.testing.assert_array_equal(acc["fired"], (flat > 0).sum(0))
  np.testing.assert_allclose(acc["sum"], flat.sum(0), rtol=1e-5)
  np.testing.assert_allclose(acc["sum_sq"], (flat ** 2).sum(0), rtol=1e-5)
  np.testing.assert_array_equal(acc["max"], flat.max(0).astype(np.float32))
  edges = np.log10(stats.hist_edges())
  for j in range(F):
    v = np.log10(flat[flat[:, j] > 0, j])
    ref = np.histogram(np.clip(v, edges[0], edges[-1] - 1e-9), bins=edges)[0]
    np.testing.assert_array_equal(acc["hist"][j], ref)
  np.testing.assert_allclose(acc["neuron_sum"], flat.T @ x.reshape(-1, D), rtol=1e-5)
  L = lab.reshape(P, -1)
  np.testing.assert_allclose(acc["proxy_sum"], L @ flat, rtol=1e-5)
  np.testing.assert_allclose(acc["proxy_fired"], L @ (flat > 0), rtol=1e-6)


def _ref_window(f, s, t, j):
  w = np.full(stats.WINDOW, np.nan)
  for k in range(stats.WINDOW):
    tt = t - stats.LEFT + k
    if 0 <= tt < T:
      w[k] = f[s, tt, j]
  return w


@pytest.mark.parametrize("which", ["top", "bot"])
def test_top_and_bottom_k_against_a_full_sort(streamed, which):
  spec, acc, f, _, _ = streamed
  k = spec.top_k if which == "top" else spec.bottom_k
  for j in range(F):
    col = f[:, :, j].ravel()
    live = np.flatnonzero(col > 0)
    key = -col[live] if which == "top" else col[live]
    order = live[np.argsort(key, kind="stable")][:k]
    got_val = acc[f"{which}_val"][j]
    ok = np.isfinite(got_val)
    assert ok.sum() == min(k, live.size)
    want = col[order] if which == "top" else -col[order]
    np.testing.assert_array_equal(got_val[ok], want.astype(np.float32))
    if j == 5:  # ties: any tied position is right, the values and windows must agree
      continue
    np.testing.assert_array_equal(acc[f"{which}_seq"][j][ok], order // T)
    np.testing.assert_array_equal(acc[f"{which}_pos"][j][ok], order % T)
    for slot in np.flatnonzero(ok):
      np.testing.assert_array_equal(acc[f"{which}_win"][j, slot],
                                    _ref_window(f, acc[f"{which}_seq"][j, slot], acc[f"{which}_pos"][j, slot], j))


def test_stratified_samples_against_a_reference(streamed):
  spec, acc, f, _, _ = streamed
  N = B * T
  bits = int(np.ceil(np.log2(N)))
  edges = np.log10(stats.hist_edges())
  for j in range(F):
    winners = {}   # bin -> list of (key, seq, pos) in batch order
    for i in range(N_BATCHES):
      fb = f[i * B:(i + 1) * B, :, j].ravel()
      gidx = (i * B + np.arange(N) // T) * T + np.arange(N) % T
      prio = _np_priority(gidx, np.full(N, j))
      comp = ((prio >> bits) << bits) | np.arange(N)
      bins = np.clip(np.floor((np.log10(np.maximum(fb, 1e-30)) - edges[0]) / (edges[1] - edges[0])), 0, 39).astype(int)
      for b in np.unique(bins[fb > 0]):
        m = (fb > 0) & (bins == b)
        n = int(np.flatnonzero(m)[np.argmax(comp[m])])
        winners.setdefault(int(b), []).append((int(comp[n] >> bits), i * B + n // T, n % T))
    for b in range(stats.HIST_BINS):
      got = [(int(acc["smp_key"][j, b, s]), int(acc["smp_seq"][j, b, s]), int(acc["smp_pos"][j, b, s]))
             for s in range(spec.samples) if acc["smp_key"][j, b, s] >= 0]
      want = sorted(winners.get(b, []), key=lambda w: -w[0])[:spec.samples]
      assert sorted(got) == sorted(want), (j, b)
      for s, (_, sq, ps) in enumerate(got):
        assert acc["smp_val"][j, b, s] == f[sq, ps, j] > 0
        np.testing.assert_array_equal(acc["smp_win"][j, b, s], _ref_window(f, sq, ps, j))


def test_intervals_against_a_reference(streamed):
  spec, acc, f, _, _ = streamed
  val, seq, pos, win = finalize.interval_examples(acc["smp_key"], acc["smp_val"], acc["smp_seq"], acc["smp_pos"],
                                                  acc["smp_win"], acc["max"])
  per = database.PER_INTERVAL
  for j in range(F):
    cands = [(acc["smp_key"][j, b, s], acc["smp_val"][j, b, s], acc["smp_seq"][j, b, s], acc["smp_pos"][j, b, s])
             for b in range(stats.HIST_BINS) for s in range(spec.samples) if acc["smp_key"][j, b, s] >= 0]
    for i in range(1, database.N_INTERVALS + 1):
      lo, hi = (10 - i) / 10 * acc["max"][j], (11 - i) / 10 * acc["max"][j]
      inside = sorted([c for c in cands if lo < c[1] <= hi or (i == 10 and 0 < c[1] <= hi)], key=lambda c: -c[0])[:per]
      got = [(val[j, s], seq[j, s], pos[j, s]) for s in range((i - 1) * per, i * per) if seq[j, s] >= 0]
      assert [(c[1], c[2], c[3]) for c in inside] == got, (j, i)
  assert (seq[6] == -1).all()  # the dead feature has no examples


def test_examples_layout_and_repeats():
  tokens = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 9, 9]], np.int32)
  seq = np.array([[0, 1, 2, 0, -1]])
  pos = np.array([[3, 3, 3, 3, 0]])
  rep = finalize.repeated_flags(tokens, seq, pos)
  # slot 1 repeats slot 0's text at another datapoint; slot 3 is slot 0's token again (no repeat of
  # slot 0) but the same text as slot 1's datapoint: a repeat; -1 is empty
  assert rep.tolist() == [[False, True, False, True, False]]
  assert finalize.repeated_flags(tokens, seq[:, [0, 3]], pos[:, [0, 3]]).tolist() == [[False, False]]
  w = finalize.window_tokens(tokens, np.array([0]), np.array([1]))[0]
  assert w[stats.LEFT - 1:stats.LEFT + 5].tolist() == [1, 2, 3, 4, 5, 6] and w[0] == -1
  assert len(database.EX_GROUP) == database.EXAMPLE_SLOTS == 90
