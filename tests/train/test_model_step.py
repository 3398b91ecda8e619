"""The transformer, its loss against a naive reference, and the sharded step on 1 and 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monojax import sharding
from monojax.config import base_config
from monojax.models import transformer
from monojax.train import state as st, step as sp

V = 250


def tiny_cfg(**model):
  c = base_config()
  c.model.vocab_size = 256
  c.model.d_model, c.model.d_mlp, c.model.n_heads, c.model.d_head = 32, 64, 2, 16
  c.data.seq_len = 16
  c.train.warmup_steps = 0
  for k, v in model.items():
    setattr(c.model, k, v)
  return c


def _tokens(b=8, t=17, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, V, (b, t)), jnp.int32)


@pytest.mark.parametrize("overrides", [{}, {"positional": "rotary"}, {"tied_embeddings": True}, {"n_layers": 2}])
def test_shapes_and_tap(overrides):
  c = tiny_cfg(**overrides)
  model = transformer.Transformer(c.model, rngs=nnx.Rngs(params=0))
  h, posts = model(_tokens()[:, :16])
  assert h.shape == (8, 16, 32)
  assert len(posts) == c.model.n_layers and posts[0].shape == (8, 16, 64)
  assert float(posts[0].min()) >= 0.0  # post-ReLU
  assert model.unembed_weight().shape == (32, 256)


def test_model_is_causal():
  c = tiny_cfg()
  model = transformer.Transformer(c.model, rngs=nnx.Rngs(params=0))
  a, b = _tokens()[:, :16], _tokens()[:, :16].at[:, 10:].set(3)
  ha, _ = model(a)
  hb, _ = model(b)
  np.testing.assert_allclose(ha[:, :10], hb[:, :10], atol=1e-6)
  assert not np.allclose(ha[:, 10:], hb[:, 10:])


@pytest.mark.parametrize("chunk", [0, 4, 5])
def test_cross_entropy_matches_naive_reference(chunk):
  rng = np.random.RandomState(1)
  h = rng.randn(3, 20, 8).astype(np.float32)
  w = rng.randn(8, 16).astype(np.float32)
  t = rng.randint(0, 12, (3, 20))
  ce, correct = sp.cross_entropy_terms(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t), 12, chunk)
  logits = (h.reshape(-1, 8) @ w)[:, :12].astype(np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
  ref = -logp[np.arange(60), t.reshape(-1)].sum()
  np.testing.assert_allclose(float(ce), ref, rtol=1e-5)
  assert int(correct) == int((logits.argmax(1) == t.reshape(-1)).sum())


@pytest.mark.parametrize("chunk", [0, 8])
def test_chunked_loss_never_materialises_all_logits(chunk):
  """The compiled gradient of the loss holds [B*chunk, V] logits, never the full [B*T, V] (chunk 0:
  the whole [B*T, V] once), and every GEMM runs on flattened 2-D rows."""
  B, T, d, V = 4, 32, 8, 1024
  h = jnp.ones((B, T, d), jnp.float32)
  w = jnp.ones((d, V), jnp.float32)
  t = jnp.zeros((B, T), jnp.int32)
  grad = jax.jit(jax.grad(lambda h, w: sp.cross_entropy_terms(h, w, t, V - 3, chunk)[0], argnums=(0, 1)))
  hlo = grad.lower(h, w).compile().as_text()
  assert (f"f32[{B * T},{V}]" in hlo) == (chunk == 0)
  if chunk:
    assert f"f32[{B * chunk},{V}]" in hlo
  dots = [line for line in hlo.splitlines() if " dot(" in line]
  assert dots and all("f32[" in line and line.split("=")[1].split("{")[0].count(",") == 1 for line in dots)


@pytest.mark.parametrize("layer", [0, 1])
def test_frozen_forward_stops_at_the_sae_layer(layer):
  """The frozen-LM step returns the same MLP activations as the full model, computes no unembedding
  (no GEMM with the vocab dimension) and changes nothing but the step counter."""
  c = tiny_cfg(n_layers=2)
  model = transformer.Transformer(c.model, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = _tokens()
  _, posts_full = model(tokens[:, :-1])
  fwd = jax.jit(sp.make_lm_forward_only(graphdef, layer=layer, dtype="float32"))
  state = {"params": params, "step": jnp.zeros((), jnp.int32)}
  new_state, metrics, posts = fwd(state, tokens)
  assert len(posts) == layer + 1 and metrics == {} and int(new_state["step"]) == 1
  np.testing.assert_allclose(posts[layer], posts_full[layer], rtol=1e-6, atol=1e-6)
  hlo = fwd.lower(state, tokens).compile().as_text()
  assert not [line for line in hlo.splitlines() if " dot(" in line and ",256]" in line.split("=")[1].split(" dot(")[0]]


def _run_steps(c, mesh, n=3, dtype="float32"):
  sched = st.make_schedule(c.train)
  tx = st.make_optimizer(c.train, sched)
  g, s, sh = st.init_state(c.model, tx, 0, mesh)
  bsh = {"tokens": sharding.batch_sharding(mesh)}
  f = jax.jit(sp.make_train_step(g, tx, sched, vocab_size=V, dtype=dtype, loss_chunk=4,
                                 token_bytes=jnp.ones(256, jnp.int32)),
              in_shardings=(sh, bsh), out_shardings=(sh, None), donate_argnums=0)
  losses = []
  for i in range(n):
    s, m = f(s, {"tokens": jax.device_put(_tokens(seed=i), bsh["tokens"])})
    losses.append(float(m["loss"]))
  return losses, s


def test_sharded_steps_match_one_device():
  c = tiny_cfg()
  c.mesh.shape = (1, 1)
  ref, _ = _run_steps(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
  assert ref[2] < ref[0]
  for shape in [(8, 1), (1, 8), (4, 2)]:
    c.mesh.shape = shape
    mesh = sharding.make_mesh(c.mesh)
    losses, s = _run_steps(c, mesh)
    np.testing.assert_allclose(losses, ref, rtol=2e-5, err_msg=str(shape))
    if shape[1] > 1:  # the wide dims really are split over "model"
      assert s["params"]["blocks"][0]["mlp"]["W_in"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
      assert s["params"]["W_U"].sharding.spec == jax.sharding.PartitionSpec(None, "model")


def test_bf16_compute_keeps_fp32_master_weights():
  c = tiny_cfg()
  c.mesh.shape = (1, 1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  ref, _ = _run_steps(c, mesh)
  losses, s = _run_steps(c, mesh, dtype="bfloat16")
  assert s["params"]["W_E"].dtype == jnp.float32
  np.testing.assert_allclose(losses, ref, rtol=2e-2)


def test_schedule_warmup_and_decay():
  c = tiny_cfg()
  c.train.steps, c.train.warmup_steps, c.train.lr, c.train.final_lr_ratio = 100, 10, 1e-3, 0.1
  for kind in ("cosine", "linear"):
    c.train.schedule = kind
    f = st.make_schedule(c.train)
    assert float(f(0)) == 0.0 and abs(float(f(10)) - 1e-3) < 1e-9 and abs(float(f(100)) - 1e-4) < 1e-9
