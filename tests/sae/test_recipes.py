"""SAE recipes and core: specs/groups, inits, losses vs naive formulas, the decoder constraint,
schedules, firing tracking, resampling, the vmapped λ sweep, sharding and donation.
§ numbers: docs/paper-notes.md."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from monojax import errors
from monojax.sae import catalogue, core, recipes, resample, sae_config

D, M, B, T = 16, 64, 64, 100


def cfg_for(saes, **overrides):
  c = sae_config()
  c.saes = saes
  c.normalize_inputs = False  # the paper's 2023 rule on raw activations (the normalised one: its own test)
  c.topk_k, c.aux_k = 4, 8
  c.lr = c.lr_2024 = c.lr_topk = 1e-3
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def acts(n=256, seed=0):
  """Non-negative, offset, sparse-ish activations (like post-ReLU MLP outputs)."""
  rng = np.random.RandomState(seed)
  return jnp.asarray(np.maximum(rng.randn(n, D) + 0.3, 0.0) + 0.1 * rng.rand(D), jnp.float32)


def make(saes, **overrides):
  c = cfg_for(saes, **overrides)
  return c, tuple(core.groups_from_config(c)), core.init_state(c, D, jax.random.key(0), acts(), T)


def group(state, i=0):
  return list(state["groups"].values())[i]


# ---------------------------------------------------------------------------- specs and groups

def test_parse_specs_and_groups():
  specs = core.parse_specs("64:0.004:2023, 64::2024,32:0.01:2023,64:0.002:2023,64:0:topk")
  assert specs[1] == core.SAESpec(64, 5.0, "2024")  # empty l1: the recipe default (§4.2)
  groups = core.make_groups(specs)
  assert [(g.width, g.recipe, g.members, g.l1s) for g in groups] == [
      (64, "2023", (0, 3), (0.004, 0.002)), (64, "2024", (1,), (5.0,)), (32, "2023", (2,), (0.01,)),
      (64, "topk", (4,), (0.0,))]
  assert groups[3].key(cfg_for("")) == "g3_topk_w64_s4_k4"
  for bad in ["", "64:0.1", "64:x:2023", "64:0.1:2025", "-1:0.1:2023", "64:0.1:topk"]:
    with pytest.raises(errors.ConfigError):
      core.parse_specs(bad)


def test_resample_steps():
  c = cfg_for("64:0.004:2023")
  assert core.resample_steps(c, 1_000_000) == [25_000, 50_000, 75_000, 100_000]  # §3.5
  assert core.resample_steps(c, 100) == [2, 5, 8, 10]
  assert core.resample_steps(cfg_for("64::2024"), 1_000_000) == []


# ----------------------------------------------------------------------------------------- inits

def naive_geometric_median(x, iters=2000):
  y = x.mean(0)
  for _ in range(iters):
    w = 1.0 / np.maximum(np.linalg.norm(x - y, axis=1), 1e-12)
    y = (w[:, None] * x).sum(0) / w.sum()
  return y


def test_geometric_median_matches_naive_reference():
  x = np.asarray(acts(), np.float64)
  x[:10] += 25.0  # outliers pull the mean, not the median
  ours = np.asarray(recipes.geometric_median(x))
  ref = naive_geometric_median(x)
  np.testing.assert_allclose(ours, ref, atol=2e-4)
  cost = lambda y: np.linalg.norm(x - y, axis=1).sum()  # noqa: E731
  assert cost(ours) <= cost(ref) * (1 + 1e-6) < cost(x.mean(0))


# ------------------------------------------------------------------------------ losses, gradients

def _params(seed=0, width=M):
  rng = np.random.RandomState(seed)
  return {"W_e": 0.3 * rng.randn(D, width), "b_e": 0.1 * rng.randn(width), "W_d": 0.3 * rng.randn(width, D),
          "b_d": 0.1 * rng.randn(D)}


def _f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_losses_match_naive_formulas():
  x = np.asarray(acts(B), np.float64)
  p = _params()
  c, no_dead = cfg_for(""), jnp.zeros(M, bool)
  got23, got24 = jax.jit(lambda p, x: (recipes.get("2023").loss(c, p, x, 0.01, no_dead)[0],
                                       recipes.get("2024").loss(c, p, x, 5.0, no_dead)[0]))(_f32(p), _f32(x))
  f = np.maximum((x - p["b_d"]) @ p["W_e"] + p["b_e"], 0)
  x_hat = f @ p["W_d"] + p["b_d"]
  np.testing.assert_allclose(got23, np.mean(np.mean((x - x_hat) ** 2, axis=1) + 0.01 * f.sum(1)), rtol=1e-5)  # §3.1
  f = np.maximum(x @ p["W_e"] + p["b_e"], 0)
  x_hat = f @ p["W_d"] + p["b_d"]
  want = np.mean(((x - x_hat) ** 2).sum(1) + 5.0 * (f * np.linalg.norm(p["W_d"], axis=1)).sum(1))  # §4.2
  np.testing.assert_allclose(got24, want, rtol=1e-5)


def _sub_jaxprs(params):
  for v in params.values():
    for item in v if isinstance(v, (tuple, list)) else (v,):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def _big_dots(jaxpr, flops):
  """Number of dot_generals (nested jaxprs included) with exactly `flops` multiply-adds."""
  n = 0
  for eqn in jaxpr.eqns:
    for sub in _sub_jaxprs(eqn.params):
      n += _big_dots(sub, flops)
    if eqn.primitive.name == "dot_general":
      out = np.prod(eqn.outvars[0].aval.shape)
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      n += out * np.prod([eqn.invars[0].aval.shape[d] for d in lhs_contract]) == flops
  return n


def test_pre_bias_trick_same_gradients_five_gemms():
  """The tied pre-encoder bias costs 5 [B,d,m] GEMMs with the stop-gradient form, 6 naively, and
  both give the same loss and gradients (docs/cpu-notes.md §3)."""
  c, rec, x = cfg_for(""), recipes.get("2023"), acts(B)

  def naive(p):
    f = jax.nn.relu((x - p["b_d"]) @ p["W_e"] + p["b_e"])
    return jnp.square(f @ p["W_d"] + p["b_d"] - x).mean() + 0.01 * f.sum(-1).mean()

  ours = lambda p: rec.loss(c, p, x, 0.01, jnp.zeros(M, bool))[0]  # noqa: E731
  p = _f32(_params())
  (l1, g1), (l2, g2) = jax.jit(lambda p: (jax.value_and_grad(ours)(p), jax.value_and_grad(naive)(p)))(p)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
  assert _big_dots(jax.make_jaxpr(jax.value_and_grad(ours))(p).jaxpr, B * D * M) == 5
  assert _big_dots(jax.make_jaxpr(jax.value_and_grad(naive))(p).jaxpr, B * D * M) == 6


def test_gradient_projection_removes_parallel_component():
  p = _f32(_params())
  c, rec, x = cfg_for(""), recipes.get("2023"), acts(B)

  @jax.jit
  def grads(p):
    W_d = recipes.unit_rows(p["W_d"])
    g = jax.grad(lambda w: rec.loss(c, dict(p, W_d=w), x, 0.01, jnp.zeros(M, bool))[0])(W_d)
    return W_d, g, recipes.project_out_parallel(W_d, g)

  W_d, g, g_proj = (np.asarray(a, np.float64) for a in grads(p))
  np.testing.assert_allclose((g_proj * W_d).sum(-1), 0.0, atol=1e-7)  # nothing left along each row
  parallel = (g * W_d).sum(-1, keepdims=True) * W_d
  np.testing.assert_allclose(g_proj + parallel, g, atol=1e-7)         # the perpendicular part is kept
  assert np.abs(parallel).max() > 1e-4                                # and there was something to remove


def test_topk_keeps_k_and_kth_largest_exact():
  x = np.random.RandomState(5).randn(B, M).astype(np.float32)
  x[0] = -np.abs(x[0])  # a row with no positive pre-activation
  ks = (1, 4, 17, M)
  kths = jax.jit(lambda x: [recipes.kth_largest(x, k)[:, 0] for k in ks])(x)
  for k, kth in zip(ks, kths):
    np.testing.assert_array_equal(kth, -np.sort(-x, axis=1)[:, k - 1])
  params = _f32(dict(_params(), b_d=np.zeros(D)))
  _, f, _ = jax.jit(lambda p, x: recipes.get("topk").forward(p, x, 4))(params, acts(B))
  l0 = np.asarray((f > 0).sum(1))
  assert l0.max() == 4 and l0.mean() > 3  # ReLU after top-k may drop negatives, never adds


# --------------------------------------------------------------------------------------- updates
# One mixed state (a 3-λ 2023 group, a 2024 SAE, a TopK SAE) trained once for the module: every
# update test reads its snapshots, so the suite compiles the update program once.

MIXED = "64:0.004:2023,64:0.01:2023,64:0.02:2023,64::2024,256:0:topk"  # wide TopK: some latents go unused
N_STEPS = 6
SAES = catalogue.build(cfg_for(MIXED), D)


@pytest.fixture(scope="module")
def mixed():
  c, groups, state = make(MIXED, dead_window=0.03, density_window=0.03)  # 3-step windows
  # Host copies (a zero-copy numpy view of a CPU buffer would keep XLA from donating it).
  host = lambda tree: jax.tree.map(lambda a: np.array(a, copy=True), tree)  # noqa: E731
  first = host(state)
  step = core.make_update_fn(c, groups, T)  # donating, as the loop runs it
  snapshots, metrics = [first], []
  for i in range(N_STEPS):
    old_leaf = group(state)["params"]["W_e"]
    state, m = step(state, acts(B, 1 + i), jax.random.key(i))
    assert old_leaf.is_deleted()  # the state was donated
    snapshots.append(host(state))
    metrics.append(host(m))
  return c, groups, snapshots, metrics


def test_init_2023(mixed):
  _, _, snaps, _ = mixed
  p = group(snaps[0])["params"]
  np.testing.assert_allclose(np.linalg.norm(p["W_d"], axis=-1), 1.0, atol=1e-6)  # unit dictionary vectors
  assert np.abs(p["W_e"]).max() <= 1 / np.sqrt(D) and p["W_e"].std() > 0.5 / np.sqrt(3 * D)  # U(±1/√d)
  np.testing.assert_allclose(p["b_d"][1], naive_geometric_median(np.asarray(acts(), np.float64)), atol=2e-4)
  assert not p["b_e"].any()
  assert not np.allclose(p["W_e"][0], p["W_e"][1])  # members get their own streams


def test_init_2024_and_topk(mixed):
  c, _, snaps, _ = mixed
  state = snaps[0]
  p24, pk = group(state, 1)["params"], group(state, 2)["params"]
  np.testing.assert_array_equal(p24["W_e"][0], p24["W_d"][0].T)  # W_e = W_dᵀ at init (§4.2)
  np.testing.assert_allclose(np.linalg.norm(p24["W_d"], axis=-1), c.init_decoder_norm, rtol=1e-5)
  assert not p24["b_d"].any() and not p24["b_e"].any()
  np.testing.assert_array_equal(pk["W_e"][0], pk["W_d"][0].T)
  np.testing.assert_allclose(np.linalg.norm(pk["W_d"], axis=-1), 1.0, rtol=1e-5)
  x = np.asarray(acts())  # the input scale makes E‖c·x‖ = √n on the sample
  np.testing.assert_allclose(np.linalg.norm(x * state["input_scale"], axis=1).mean(), np.sqrt(D), rtol=1e-5)
  np.testing.assert_allclose(pk["b_d"][0], group(state)["params"]["b_d"][0] * state["input_scale"], rtol=1e-5)
  # Member i's init depends only on (key, i), not on which group or config it sits in.
  _, _, alone = make("64:0.004:2023")
  np.testing.assert_array_equal(group(alone)["params"]["W_e"][0], group(state)["params"]["W_e"][0])


def test_2023_unit_decoder_and_firing_counts(mixed):
  _, _, snaps, ms = mixed
  g = group(snaps[-1])
  np.testing.assert_allclose(np.linalg.norm(g["params"]["W_d"], axis=-1), 1.0, atol=1e-6)  # §3.2
  assert set(ms[0]) == set(core.METRIC_NAMES)
  assert all(v.shape == (5,) and v.dtype == np.float32 and np.isfinite(v).all() for v in ms[-1].values())
  # Firing after step 1 is exactly this batch's f > 0 under the initial params.
  first = jax.tree.map(jnp.asarray, snaps[0])
  encoded = views(first, acts(B, 1))
  for i in range(5):
    fired = np.asarray(encoded[i][0] > 0)
    sae = SAES[i]
    np.testing.assert_array_equal(snaps[1]["groups"][sae.group]["fired_count"][sae.member], fired.sum(0))
    np.testing.assert_array_equal(snaps[1]["groups"][sae.group]["last_fired"][sae.member], np.where(fired.any(0), 1, 0))


def test_density_windows_rotate(mixed):
  _, _, snaps, _ = mixed
  assert [int(s["density_tokens"]) for s in snaps] == [0, B, 2 * B, 3 * B, B, 2 * B, 3 * B]
  assert [int(s["density_tokens_last"]) for s in snaps] == [0, 0, 0, 0, 3 * B, 3 * B, 3 * B]
  g3, g4 = group(snaps[3]), group(snaps[4])
  np.testing.assert_array_equal(g4["fired_count_last"], g3["fired_count"])  # window 1 closed at step 3
  counts, n = core.density(jax.tree.map(jnp.asarray, snaps[4]), SAES[0])
  assert n == 3 * B
  np.testing.assert_array_equal(counts, g3["fired_count"][0])
  counts, n = core.density(jax.tree.map(jnp.asarray, snaps[2]), SAES[0])  # before any complete window
  assert n == 2 * B


def test_2024_schedules(mixed):
  c = cfg_for("64::2024")
  r = recipes.get("2024")
  lr = lambda s: float(r.lr(c, s, 1000))  # noqa: E731
  lam = lambda s: float(r.l1_factor(c, s, 1000))  # noqa: E731
  assert lr(0) == lr(799) == lr(800) == pytest.approx(1e-3)           # decay over the last 20 % (§4.2)
  assert lr(900) == pytest.approx(0.5e-3) and lr(999) == pytest.approx(1e-3 / 200) and lr(1000) == 0.0
  assert lam(0) == 0.0 and lam(25) == pytest.approx(0.5) and lam(50) == lam(700) == 1.0  # 5 % warm-up
  r23 = recipes.get("2023")
  assert float(r23.lr(c, 999, 1000)) == pytest.approx(1e-3)
  assert float(r23.l1_factor(c, 0, 1000)) == 1.0
  # The update used them (T = 100: λ warms up over 5 steps; 2023 λ constant).
  _, _, _, ms = mixed
  np.testing.assert_allclose([m["l1_coef"][3] for m in ms], [5.0 * min(s / 5, 1) for s in range(N_STEPS)], rtol=1e-6)
  np.testing.assert_allclose(ms[0]["l1_coef"][:3], [0.004, 0.01, 0.02], rtol=1e-6)
  assert all(float(m["lr"][3]) == pytest.approx(1e-3) for m in ms)


def test_2024_free_decoder_norms_and_clipping(mixed):
  c, _, snaps, ms = mixed
  norms = np.linalg.norm(group(snaps[-1], 1)["params"]["W_d"], axis=-1)
  assert np.abs(norms - c.init_decoder_norm).max() > 1e-4 and np.abs(norms - 1.0).min() > 0.5  # unconstrained
  # Clipping: grad_norm is the raw norm (before the optimizer chain). Adam's first update does not
  # see a global gradient scale, but its first moment does: after update 1, mu = (1 - b1)·g_clipped.
  raw = float(ms[0]["grad_norm"][3])
  assert raw > 1.5 * c.grad_clip  # update 1's raw gradient is well above the clip
  mu = group(snaps[1], 1)["opt"][-1].mu
  assert int(group(snaps[1], 1)["opt"][-1].count[0]) == 1
  mu_norm = np.sqrt(sum(np.square(np.asarray(v[0], np.float64)).sum() for v in mu.values()))
  np.testing.assert_allclose(mu_norm, (1 - c.b1) * min(raw, c.grad_clip), rtol=1e-4, err_msg=f"raw norm {raw}")


def test_topk_l0_and_aux_k(mixed):
  _, _, snaps, ms = mixed
  assert all(float(m["l0"][4]) <= 4 for m in ms)
  assert float(ms[0]["aux_k"][4]) == 0.0  # nothing can be dead before dead_window steps
  dead_at = [float(m["dead_frac"][4]) for m in ms]
  assert dead_at[-1] > 0 and float(ms[-1]["aux_k"][4]) > 0  # with dead latents AuxK is on
  np.testing.assert_allclose(np.linalg.norm(group(snaps[-1], 2)["params"]["W_d"], axis=-1), 1.0, atol=1e-6)


def test_vmapped_sweep_equals_separate_runs(mixed):
  """The 3-λ group equals 3 SAEs each updated on its own (S = 1, no batching), from the same
  initial state on the same batches (§3.4's λ sweep, batched)."""
  c, _, snaps, ms = mixed
  lams = (0.004, 0.01, 0.02)
  singles = tuple(core.Group(j, 64, "2023", (j,), (lam,)) for j, lam in enumerate(lams))
  first = snaps[0]
  swept = group(first)
  state = dict(first, groups={g.key(c): jax.tree.map(lambda a, j=j: a[j:j + 1], swept) for j, g in enumerate(singles)})
  state = jax.tree.map(jnp.asarray, state)
  step = core.make_update_fn(c, singles, T, donate=False)
  for i in range(3):
    state, m = step(state, acts(B, 1 + i), jax.random.key(i))
    for j in range(3):
      for name in m:
        np.testing.assert_allclose(m[name][j], ms[i][name][j], rtol=1e-5, atol=1e-6, err_msg=f"{name} step {i}")
  for j, g in enumerate(singles):
    jax.tree.map(lambda a, b, j=j: np.testing.assert_allclose(a[j:j + 1], b, rtol=2e-5, atol=1e-6),
                 group(snaps[3]), jax.device_get(state["groups"][g.key(c)]))


def test_sharded_update_equals_single_device(mixed):
  c, groups, snaps, ms = mixed
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)  # as sharding.make_mesh
  state = jax.tree.map(jnp.asarray, snaps[0])
  sh = core.shardings(state, mesh)
  p = sh["groups"]["g0_2023_w64_s0_1_2"]
  assert p["params"]["W_e"].spec == P(None, None, "model") and p["params"]["W_d"].spec == P(None, "model", None)
  assert p["params"]["b_d"].spec == P(None, None) and p["last_fired"].spec == P(None, "model")
  assert p["opt"][0].mu["W_e"].spec == P(None, None, "model") and p["opt"][0].count.spec == P()
  step = core.make_update_fn(c, groups, T)
  out, m = step(jax.device_put(state, sh), jax.device_put(acts(B, 1), NamedSharding(mesh, P("data"))),
                jax.random.key(0))
  assert out["groups"]["g0_2023_w64_s0_1_2"]["params"]["W_e"].sharding.num_devices == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), (snaps[1], ms[0]),
               jax.device_get((out, m)))


@jax.jit
def views(state, x):
  """(encode, decoder_directions, reconstruct) of every SAE in the mixed state, in one program; the
  state is a traced argument: group keys are static structure, so SAE lookups work under jit."""
  return [(core.encode(state, sae, x), core.decoder_directions(state, sae), core.reconstruct(state, sae, x))
          for sae in SAES]


def test_encode_reconstruct_directions_consistent(mixed):
  _, _, snaps, _ = mixed
  state = jax.tree.map(jnp.asarray, snaps[-1])
  x = acts(B, 9)
  for i, (f, dirs, x_hat) in enumerate(views(state, x)):
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, rtol=1e-6)
    sae = SAES[i]
    scale = state["input_scale"] if sae.scaled else 1.0
    b_d = state["groups"][sae.group]["params"]["b_d"][sae.member] / scale
    np.testing.assert_allclose(x_hat, f @ dirs + b_d, rtol=1e-4, atol=1e-5)
  # 2024 reports f_i·‖W_d,i‖ in the original units (§4.2); 2023 reports f_i.
  f24, f23 = views(state, x)[3][0], views(state, x)[0][0]
  p24, p23 = core.member_params(state, SAES[3]), core.member_params(state, SAES[0])
  raw = np.maximum(np.asarray(x) * float(state["input_scale"]) @ p24["W_e"] + p24["b_e"], 0)
  np.testing.assert_allclose(f24, raw * np.linalg.norm(p24["W_d"], axis=1) / state["input_scale"], rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(f23, np.maximum((np.asarray(x) - p23["b_d"]) @ p23["W_e"] + p23["b_e"], 0), rtol=1e-4,
                             atol=1e-6)
  # bf16 LM activations are cast: the outputs stay fp32.
  out = jax.eval_shape(lambda s, x: core.reconstruct(s, SAES[4], x), state, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.float32 and out.shape == (B, D)


# ------------------------------------------------------------------------------------ resampling

def test_resampling_touches_only_dead_features(mixed):
  c, groups, snaps, _ = mixed
  step = int(snaps[-1]["step"])
  # Make a known set dead (fired long ago) in member 0 and none in members 1, 2.
  dead = np.zeros((3, M), bool)
  dead[0, [3, 10, 11, 40]] = True
  (key0, g0), *_ = snaps[-1]["groups"].items()
  state = dict(snaps[-1], groups=dict(snaps[-1]["groups"]))  # host copy; its device copy is donated
  state["groups"][key0] = dict(g0, last_fired=np.where(dead, -100, step).astype(np.int32))
  sample = acts(512, 11)
  new, info = core.make_resample_fn(c, groups, T)(jax.tree.map(jnp.asarray, state), sample, jax.random.key(3))
  new = jax.device_get(new)
  np.testing.assert_array_equal(info["resampled"], [4, 0, 0, 0, 0])
  old_g, new_g = group(state), group(new)
  # Every entry that does not belong to a dead feature is bitwise unchanged (params and Adam).
  masks = {"W_e": dead[:, None, :], "b_e": dead, "W_d": dead[:, :, None], "b_d": np.zeros((3, D), bool)}
  for tree in ("params", "mu", "nu"):
    get = (lambda g: g["params"]) if tree == "params" else (lambda g, t=tree: getattr(g["opt"][0], t))  # noqa: E731
    for name, mask in masks.items():
      a, b = np.asarray(get(old_g)[name]), np.asarray(get(new_g)[name])
      mask = np.broadcast_to(mask, a.shape)
      np.testing.assert_array_equal(a[~mask], b[~mask])
      if tree != "params" and mask.any():
        assert not b[mask].any()  # Adam moments of the changed entries reset (§3.5 step 6)
  np.testing.assert_array_equal(old_g["opt"][0].count, new_g["opt"][0].count)
  for i in (1, 2):  # the 2024 and TopK groups are untouched
    jax.tree.map(np.testing.assert_array_equal, group(state, i), group(new, i))
  # New decoder rows: unit sample inputs; encoder columns: same direction, 0.2 × mean alive norm; b_e 0.
  p, p_old = new_g["params"], old_g["params"]
  W_d = np.asarray(p["W_d"][0])[dead[0]]
  np.testing.assert_allclose(np.linalg.norm(W_d, axis=1), 1.0, rtol=1e-6)
  unit_inputs = np.asarray(sample) / np.linalg.norm(sample, axis=1, keepdims=True)
  assert (np.abs(W_d @ unit_inputs.T).max(1) > 1 - 1e-5).all()
  assert len({tuple(r) for r in W_d.round(6)}) == 4  # drawn without replacement
  alive_norm = np.linalg.norm(np.asarray(p_old["W_e"][0])[:, ~dead[0]], axis=0).mean()
  W_e = np.asarray(p["W_e"][0])[:, dead[0]]
  np.testing.assert_allclose(np.linalg.norm(W_e, axis=0), 0.2 * alive_norm, rtol=1e-5)
  np.testing.assert_allclose((W_e / np.linalg.norm(W_e, axis=0)).T, W_d, atol=1e-6)
  assert not np.asarray(p["b_e"][0])[dead[0]].any()
  assert (np.asarray(new_g["last_fired"][0])[dead[0]] == step).all()


def test_resample_draws_favour_high_loss_inputs():
  weights = jnp.asarray([0.0, 1.0, 0.0, 100.0, 1e-3])
  keys = jax.random.split(jax.random.key(0), 50)
  first = np.asarray(jax.jit(jax.vmap(lambda k: resample.draw_inputs(k, weights, 3)))(keys))
  assert (first[:, 0] == 3).sum() > 40                         # ∝ weight (§3.5: ∝ loss²)
  assert (np.sort(first, axis=1) == [1, 3, 4]).all()           # without replacement; zero weight never


def test_optimizer_state_is_adam_last():
  for name in recipes.NAMES:
    st = jax.eval_shape(recipes.get(name).optimizer(sae_config()).init, _f32(_params()))
    assert isinstance(st[-1], optax.ScaleByAdamState)


def test_normalised_2023_lambda_means_the_same_at_any_activation_scale():
  """sae.normalize_inputs: a 2023 SAE trains on c·x with E‖c·x‖ = √n, so the same λ trains the same
  SAE on activations 10x larger (what makes one default λ live on any LM), and its reported
  features and reconstructions stay in the original units. On raw activations (the paper's rule)
  the same λ gives a different SAE."""
  def train(scale, normalize):
    c = cfg_for("64:0.004:2023", normalize_inputs=normalize)
    x = [acts(B, 20 + i) * scale for i in range(4)]
    state = core.init_state(c, D, jax.random.key(0), acts(256, 0) * scale, T)
    step = core.make_update_fn(c, tuple(core.groups_from_config(c)), T, donate=False)
    for i, xi in enumerate(x):
      state, m = step(state, xi, jax.random.key(i))
    sae = catalogue.build(c, D)[0]
    return state, sae, m

  s1, sae1, m1 = train(1.0, True)
  s10, _, m10 = train(10.0, True)
  assert sae1.scaled and float(s10["input_scale"]) == pytest.approx(float(s1["input_scale"]) / 10, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               group(s1)["params"], group(s10)["params"])
  x = acts(B, 30)
  np.testing.assert_allclose(core.encode(s10, sae1, 10 * x), 10 * np.asarray(core.encode(s1, sae1, x)), rtol=1e-3,
                             atol=1e-4)
  np.testing.assert_allclose(core.reconstruct(s10, sae1, 10 * x), 10 * np.asarray(core.reconstruct(s1, sae1, x)),
                             rtol=1e-3, atol=1e-3)
  assert float(m10["l0"][0]) == pytest.approx(float(m1["l0"][0]), rel=1e-3)
  r1, _, _ = train(1.0, False)
  r10, _, _ = train(10.0, False)  # raw inputs: the same λ, another SAE (its pressure depends on the scale)
  assert np.abs(np.asarray(group(r10)["params"]["W_e"]) - np.asarray(group(r1)["params"]["W_e"])).max() > 1e-3
