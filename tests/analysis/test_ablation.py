"""Ablation effects (analysis/ablation.py) against a slow explicit recomputation: the whole model
run again with the feature removed from the MLP activations over the whole context
(x̂(f') + (x − x̂(f)) with f'_i = 0), on a tiny analysed run."""
import numpy as np
import pytest

from monojax.analysis import ablation, database
from monojax.run import Run
from run_fixtures import copy_run

quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def analysed(analysed_run_template, tmp_path_factory):
  """This module's copy of the session's analysed tiny run (tests/conftest.py: its pass wrote the
  ablation effects)."""
  workdir = copy_run(analysed_run_template, str(tmp_path_factory.mktemp("abl") / "run"))
  return Run.open(workdir, log=quiet), database.open_database(workdir)


def _slow(run, sae, tokens, feature):
  """Log-probs [T, vocab] of one sequence, clean and with `feature` removed at every position."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from monojax.sae import core as sae_core
  model = nnx.merge(run.graphdef, run.params)
  f = np.asarray(run.features(tokens[None], sae))[0][:, feature]
  d = np.asarray(sae_core.decoder_directions(run.sae_state, sae))[feature]
  replace = {sae.layer: lambda post: post - jnp.asarray(f)[None, :, None] * jnp.asarray(d)[None, None, :]}
  out = []
  for r in (None, replace):
    h, _ = model(jnp.asarray(tokens[None], jnp.int32), mlp_replace=r)
    z = jnp.einsum("btd,dv->btv", h, model.unembed_weight(), precision=jax.lax.Precision.HIGHEST)
    out.append(np.asarray(jax.nn.log_softmax(z[0, :, :run.tokenizer.vocab_size], axis=-1)))
  return out


def test_effects_match_a_full_recomputation(analysed):
  run, db = analysed
  sae = run.sae("sae0")
  unit = db.unit("sae0")
  assert ablation.applies(run, sae)
  fired = np.flatnonzero(np.asarray(unit.array("fired")) > 0)
  checked = 0
  for feature in fired[:3]:
    effects = unit.ablation(int(feature))
    assert effects, feature
    examples = {e["slot"]: e for e in unit.examples(int(feature))}
    for slot, items in list(effects.items())[:2]:
      ex = examples[slot]
      tokens = np.asarray(db.tokens[ex["seq"]], np.int32)
      clean, abl = _slow(run, sae, tokens, int(feature))
      for d in items:
        t = ex["pos"] - ex["center"] + d["offset"]   # window offset → position in the sequence
        assert ex["acts"][d["offset"]] > 0
        if t + 1 < len(tokens):
          want = -(abl[t, tokens[t + 1]] - clean[t, tokens[t + 1]])
          assert d["dloss"] == pytest.approx(want, abs=2e-5, rel=1e-3)
        else:
          assert np.isnan(d["dloss"])
        diff = abl[t] - clean[t]
        assert np.allclose([v for _, v in d["up"]], np.sort(diff)[::-1][:5], atol=2e-5)
        assert np.allclose(diff[[tok for tok, _ in d["up"]]], [v for _, v in d["up"]], atol=2e-5)
        assert np.allclose([v for _, v in d["down"]], np.sort(diff)[:5], atol=2e-5)
        checked += 1
  assert checked >= 3


def test_no_effect_where_the_feature_is_off(analysed):
  """Only positions where the feature fired are ablated (elsewhere the edit is the identity)."""
  _, db = analysed
  unit = db.unit("sae0")
  for feature in range(4):
    for slot, items in unit.ablation(feature).items():
      ex = next(e for e in unit.examples(feature) if e["slot"] == slot)
      assert all(ex["acts"][d["offset"]] > 0 for d in items)
      assert len(items) <= ablation.ABL_POSITIONS
