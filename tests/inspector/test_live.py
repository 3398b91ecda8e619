"""Live text activations (monojax/inspector/live.py) against the run's own functions: each seq_len
context of the text is run fresh from its start, the top-k lists are the strongest active features
in order, and the fixed batch shape compiles once per unit whatever the text's length."""
import numpy as np
import pytest

from monojax import errors, text as text_lib
from monojax.inspector import live
from monojax.run import Run

TEXT = ("The quick brown fox jumps over the lazy dog. Functions are defined with def, and classes with "
        "class; a for loop walks any iterable.\nNext line: ") * 2


@pytest.fixture(scope="module")
def run(inspector_run):
  return Run.open(inspector_run)


def _reference(run, tokens, unit):
  """Activations [N, width] of `tokens` cut into seq_len contexts, each run on its own (no padding)."""
  T = run.cfg.data.seq_len
  fn = (lambda x: run.mlp_acts(x)) if unit == "neurons" else (lambda x: run.features(x, unit))
  n_full = len(tokens) // T
  parts = [np.asarray(fn(tokens[:n_full * T].reshape(n_full, T))).reshape(n_full * T, -1)] if n_full else []
  if len(tokens) % T:
    parts.append(np.asarray(fn(tokens[n_full * T:][None]))[0])
  return np.concatenate(parts)


def _expected(acts_row, k):
  order = sorted(range(acts_row.size), key=lambda i: (-acts_row[i], i))  # descending, ties by index
  return [(i, acts_row[i]) for i in order[:k] if acts_row[i] > 0]


def _check_against(out, ref, k):
  assert len(out["features"]) == len(out["active"]) == ref.shape[0]
  for t, (got, row) in enumerate(zip(out["features"], ref)):
    want = _expected(row, k)
    assert [i for i, _ in got] == [i for i, _ in want], f"token {t}"
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5, atol=1e-6)
    assert out["active"][t] == int((row > 0).sum())


@pytest.mark.parametrize("unit", ["sae1", "neurons"])
def test_matches_run_features_context_by_context(run, unit):
  T = run.cfg.data.seq_len
  tokens = live.tokenize(run, TEXT)
  assert len(tokens) > 2 * T and len(tokens) % T, "the text must span contexts and end in a partial one"
  width = 96 if unit == "sae1" else run.cfg.model.d_mlp
  out = live.text_activations(run, TEXT, unit, top_k=width)
  assert out["unit"] == unit and out["seq_len"] == T and out["n_tokens"] == len(tokens) and not out["truncated"]
  assert out["tokens"] == tokens.tolist() == run.tokenizer.hf.encode(TEXT, add_special_tokens=False).ids  # no EOS
  assert "".join(out["pieces"]) == text_lib.visible(run.tokenizer.decode(tokens))   # the text, piece by piece
  ref = _reference(run, tokens, unit)
  assert ref.shape == (len(tokens), width)
  assert sum(out["active"]) > 0, "a run whose features never fire tests nothing"
  _check_against(out, ref, width)


def test_top_k_is_the_head_of_the_full_list(run):
  full = live.text_activations(run, TEXT, "sae0", top_k=64)
  top = live.text_activations(run, TEXT, "sae0", top_k=3)
  assert any(len(f) > 3 for f in full["features"]), "some token must have more than k active features"
  assert top["active"] == full["active"]  # counted over all features, not just the top k
  for t, (short, long) in enumerate(zip(top["features"], full["features"])):
    assert short == long[:3], f"token {t}"
    values = [v for _, v in short]
    assert values == sorted(values, reverse=True) and all(v > 0 for v in values)
    assert all(isinstance(i, int) and isinstance(v, float) for i, v in short)
    assert all(v == float(np.float32(v)) for v in values)  # float32 values


def test_truncation(run):
  full = live.text_activations(run, TEXT, "sae0")
  cut = live.text_activations(run, TEXT, "sae0", max_tokens=20)
  assert cut["truncated"] and cut["n_tokens"] == 20 and not full["truncated"]
  assert cut["tokens"] == full["tokens"][:20] and cut["pieces"] == full["pieces"][:20]
  assert cut["active"] == full["active"][:20]
  for got, want in zip(cut["features"], full["features"]):  # another batch shape: last-bit differences
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5, atol=1e-6)
  exact = live.text_activations(run, TEXT, "sae0", max_tokens=full["n_tokens"])
  assert not exact["truncated"] and exact["n_tokens"] == full["n_tokens"]


def test_one_compile_per_unit_whatever_the_length(run):
  live.text_activations(run, "a", "sae0")
  fn = run._features_fn(run.sae("sae0"))
  before = fn._cache_size()
  for text in ("ab", TEXT, TEXT[:77], TEXT * 3):
    live.text_activations(run, text, "sae0")
  assert fn._cache_size() == before


def test_units_and_errors(run):
  assert live.unit_names(run) == ["neurons", "sae0", "sae1"]
  with pytest.raises(errors.UserInputError, match="this run has neurons, sae0, sae1"):
    live.text_activations(run, TEXT, "sae7")
  with pytest.raises(errors.UserInputError, match="string"):
    live.text_activations(run, 42, "sae0")


def test_empty_text(run):
  out = live.text_activations(run, "", "sae0")
  assert out == {"unit": "sae0", "n_tokens": 0, "truncated": False, "seq_len": run.cfg.data.seq_len,
                 "tokens": [], "pieces": [], "features": [], "active": []}


def test_pieces_are_visible_text(run):
  text = "line one\nline\ttwo \x1b[31mred\u202e<script>window.__pwned=1</script>"
  out = live.text_activations(run, text, "neurons")
  joined = "".join(out["pieces"])
  assert "⏎" in joined and "⇥" in joined and "\\x1b" in joined and "<script>" in joined
  # never raw, whichever way the tokens split a character
  assert all(text_lib.visible(p) == p for p in out["pieces"])
  assert not any(c in joined for c in "\n\t\x1b\u202e")


def test_characters_split_over_tokens_show_whole(run):
  """A multi-byte character cut over byte tokens shows once, on the token that completes it (the
  tiny run's 400-token BPE splits Arabic and Cyrillic letters)."""
  text = "مرحبا بالعالم Привет"
  out = live.text_activations(run, text, "sae0")
  assert "".join(out["pieces"]) == text and "\ufffd" not in "".join(out["pieces"])
  alone = [run.tokenizer.decode([t]) for t in out["tokens"]]
  assert any("\ufffd" in a for a in alone), "the tiny BPE no longer splits these letters: the test tests nothing"
