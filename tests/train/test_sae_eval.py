"""The held-out SAE evaluation's splice (train/cotrain.make_eval_step + summarize_eval) on SAEs whose
reconstruction is known exactly: an identity SAE recovers 100 % of the loss, a zero SAE 0 %, and a
half-scale SAE gives the loss of the LM with its MLP activations halved, computed separately."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monojax import sharding
from monojax.models import transformer
from monojax.sae import catalogue, core as sae_core
from monojax.train import cotrain, step as step_lib
from test_model_step import _tokens, tiny_cfg

V = 250


def _state_with(cfg, d):
  """Three 2023 SAEs of width d = d_mlp whose reconstructions are x (identity: W_e = W_d = I, x ≥ 0
  after the ReLU), 0 (nothing fires, b_d = 0) and x / 2 (W_d = I / 2)."""
  cfg.sae.saes = f"{d}:0.004:2023,{d}:0.004:2023,{d}:0.004:2023"
  state = sae_core.init_state(cfg.sae, d, jax.random.key(0), jnp.ones((8, d)), 10)
  (key,) = state["groups"]
  eye, zeros = np.eye(d, dtype=np.float32), np.zeros((d, d), np.float32)
  params = {"W_e": np.stack([eye, zeros, eye]), "W_d": np.stack([eye, eye, 0.5 * eye]),
            "b_e": np.stack([np.zeros(d), -np.ones(d), np.zeros(d)]).astype(np.float32),
            "b_d": np.zeros((3, d), np.float32)}
  state["groups"][key] = dict(state["groups"][key], params=jax.tree.map(jnp.asarray, params))
  return state


@pytest.fixture(scope="module")
def evaluated():
  cfg = tiny_cfg()
  cfg.model.vocab_size = 256
  graphdef, params = nnx.split(transformer.Transformer(cfg.model, rngs=nnx.Rngs(params=0)), nnx.Param)
  # A fresh model's logits hardly depend on anything (small W_out and W_U): scale both up so that
  # splicing the MLP changes the loss.
  scale = {"W_out": 20.0, "W_U": 100.0}
  params = jax.tree_util.tree_map_with_path(lambda p, x: x * scale.get(sharding.leaf_name(p), 1.0), params)
  d = cfg.model.d_mlp
  sae_state = _state_with(cfg, d)
  saes = catalogue.build(cfg.sae, d, layer=0)
  tokens = _tokens()
  step = jax.jit(cotrain.make_eval_step(graphdef, saes, vocab_size=V, dtype="float32", loss_chunk=0))
  sums = jax.device_get(step(params, sae_state, {"tokens": tokens}))
  fwd = lambda **kw: step_lib.lm_forward(graphdef, params, tokens, vocab_size=V, dtype=jnp.float32,  # noqa: E731
                                         loss_chunk=0, **kw)
  refs = {"clean": fwd(), "zero": fwd(mlp_replace={0: jnp.zeros_like}), "half": fwd(mlp_replace={0: lambda p: 0.5 * p})}
  return cotrain.summarize_eval(sums, cfg), refs, sums


def test_identity_recovers_all_and_zero_recovers_nothing(evaluated):
  ev, refs, _ = evaluated
  assert ev["sae_eval/loss_clean"] == pytest.approx(float(refs["clean"][0]), rel=1e-6)
  assert ev["sae_eval/loss_zero_ablated"] == pytest.approx(float(refs["zero"][0]), rel=1e-6)
  # (a random model: ablating its MLP changes the loss, in either direction; it must change it)
  assert abs(ev["sae_eval/loss_zero_ablated"] - ev["sae_eval/loss_clean"]) > 0.05
  assert ev["sae0_eval/loss_recovered"] == pytest.approx(1.0, abs=1e-4)
  assert ev["sae0_eval/fvu"] == pytest.approx(0.0, abs=1e-10) and ev["sae0_eval/mse"] == pytest.approx(0.0, abs=1e-12)
  assert ev["sae1_eval/loss_recovered"] == pytest.approx(0.0, abs=1e-4)
  assert ev["sae1_eval/l0"] == 0.0 and ev["sae1_eval/dead"] == 64


def test_half_scale_splice_matches_the_halved_mlp(evaluated):
  ev, refs, sums = evaluated
  clean, zero, half = (float(refs[k][0]) for k in ("clean", "zero", "half"))
  assert ev["sae2_eval/loss_spliced"] == pytest.approx(half, rel=1e-5)
  assert ev["sae2_eval/loss_recovered"] == pytest.approx((zero - half) / (zero - clean), rel=1e-4)
  assert abs(ev["sae2_eval/loss_recovered"] - 1.0) > 1e-3 and abs(ev["sae2_eval/loss_recovered"]) > 1e-3
  x = np.asarray(refs["clean"][1]["mlp_post"][0], np.float64).reshape(-1, 64)
  np.testing.assert_allclose(ev["sae2_eval/fvu"], (0.25 * x ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rtol=1e-5)
  np.testing.assert_allclose(ev["sae2_eval/l0"], (x > 0).sum(1).mean(), rtol=1e-6)
  assert int(sums["tokens"]) == x.shape[0]
