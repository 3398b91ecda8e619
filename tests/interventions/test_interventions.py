"""Feature edits and KV-cached sampling (monojax/interventions) and `python -m monojax.generate`, on
the session's tiny co-trained run (1 layer, learned positions, untied; 2 SAEs of 64 and 96 features)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monojax import generate as generate_cli
from monojax import interventions
from monojax.analysis import logit_effects
from monojax.interventions import decode
from monojax.interventions import edit as edit_lib
from monojax.models import transformer
from monojax.run import Run
from monojax.sae import core as sae_core

Edit = interventions.Edit


@pytest.fixture(scope="module")
def run(cotrained_run_template):
  return Run.open(cotrained_run_template, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def tokens(run, pydoc_texts):
  """int32[4, 16]: the starts of four real documents."""
  return np.stack([run.tokenizer.encode_documents([t])[:16] for t in pydoc_texts[:4]]).astype(np.int32)


def _logits_with(run, tokens, replace):
  """The slow reference: Transformer.__call__ with a hand-written mlp_replace at the SAEs' layer."""
  @jax.jit
  def logits(params, tokens):
    model = nnx.merge(run.graphdef, params)
    h, _ = model(tokens, mlp_replace={run.cfg.sae.layer: replace})
    return jnp.einsum("btd,dv->btv", h, model.unembed_weight())[..., :run.tokenizer.vocab_size]
  return np.asarray(logits(run.params, jnp.asarray(tokens)))


def test_no_feature_changed_is_the_clean_model(run, tokens):
  clean = np.asarray(run.logits(tokens))
  for sae in run.saes:   # an empty edit set, for every SAE of the run
    np.testing.assert_allclose(np.asarray(interventions.intervened_logits(run, tokens, sae, [])), clean,
                               rtol=1e-5, atol=1e-5)
  # every feature clamped to its own value at one position: nothing changes anywhere
  f = np.asarray(run.features(tokens, "sae0"))
  edits = [Edit(i, "clamp", float(f[1, 7, i]), positions=np.arange(16)[None] == np.array([[-1], [7], [-1], [-1]]))
           for i in range(f.shape[-1])]
  out = np.asarray(interventions.intervened_logits(run, tokens, "sae0", edits))
  np.testing.assert_allclose(out, clean, rtol=1e-5, atol=1e-5)
  # scale by 1 everywhere: the same
  out = interventions.intervened_logits(run, tokens, "sae1", [Edit(i, "scale", 1.0) for i in range(0, 96, 7)])
  np.testing.assert_allclose(np.asarray(out), clean, rtol=1e-5, atol=1e-5)


def test_zeroing_changes_logits_only_where_the_features_fired(run, tokens):
  sae = run.sae("sae0")
  f = np.asarray(run.features(tokens, sae))
  fired = (f > 0).mean((0, 1))
  chosen = [int(i) for i in np.argsort(np.abs(fired - 0.3))[:3]]   # features that fire on some tokens only
  where = (f[..., chosen] > 0).any(-1)
  assert where.any() and not where.all()
  out = np.asarray(interventions.intervened_logits(run, tokens, sae, [Edit(i, "zero") for i in chosen]))
  clean = np.asarray(run.logits(tokens))
  # 1 layer: a position's MLP edit reaches only its own logits
  np.testing.assert_array_equal(np.abs(out - clean).max(-1) > 0, where)
  D = np.asarray(sae_core.decoder_directions(run.sae_state, sae))

  def replace(post):   # x − Σ f_i d_i (paper-spec §6.4), written out by hand
    return post - jnp.asarray(f[..., chosen] @ D[chosen])
  np.testing.assert_allclose(out, _logits_with(run, tokens, replace), rtol=1e-4, atol=1e-4)


def test_clamping_up_raises_the_features_logit_effect_tokens(run, tokens):
  sae = run.sae("sae1")
  f = np.asarray(run.features(tokens, sae))
  i = int(np.argmax(f.max((0, 1))))
  lm = logit_effects.lm_weights(nnx.merge(run.graphdef, run.params), sae.layer)
  dirs = logit_effects.feature_resid_directions(run.sae_state, sae, lm["W_out"])[i:i + 1]
  effect = logit_effects.logit_weights(dirs, lm["ln_gamma"], lm["W_U"], run.tokenizer.vocab_size)[0]
  top = np.argsort(-effect)[:5]
  value = 4 * float(f.max()) + 1
  out = np.asarray(interventions.intervened_logits(run, tokens, sae, [Edit(i, "clamp", value)]))
  delta = out - np.asarray(run.logits(tokens))
  delta = delta - np.median(delta, -1, keepdims=True)   # softmax is shift-invariant
  assert (delta[..., top].mean(-1) > 0).all()
  shift = interventions.feature_shift(run, tokens, sae, [Edit(i, "clamp", value)], k=5)
  assert (shift.kl > 0).all() and shift.up_ids.shape == (4, 16, 5)
  assert (shift.up_after > shift.up_before).all() and (shift.down_after < shift.down_before).all()
  assert len(set(shift.up_ids[..., 0].ravel()) & set(np.argsort(-effect)[:20])) > 0


def _greedy_reference(run, prompt, n, logits_fn):
  """Greedy tokens by repeated full forward passes (a fixed-length buffer: causal attention keeps the
  padding after position t from reaching it)."""
  L = int(run.cfg.model.max_seq_len)
  seq = np.zeros((1, L), np.int32)
  seq[0, :prompt.size] = prompt
  for t in range(prompt.size, prompt.size + n):
    seq[0, t] = int(np.argmax(np.asarray(logits_fn(seq))[0, t - 1]))
  return seq[0, prompt.size:prompt.size + n]


def test_kv_cached_greedy_decoding_matches_full_forward_passes(run, tokens):
  prompt = tokens[2, :4]
  n = int(run.cfg.model.max_seq_len) - prompt.size
  got = interventions.generate(run, prompt, max_new_tokens=100, temperature=0.0)   # cut to max_seq_len
  assert got.shape == (1, n)
  np.testing.assert_array_equal(got[0], _greedy_reference(run, prompt, n, run.logits))
  f = np.asarray(run.features(tokens, "sae0"))
  edits = [Edit(int(np.argmax(f.max((0, 1)))), "clamp", 3 * float(f.max())), Edit(5, "zero")]
  got = interventions.generate(run, prompt, sae="sae0", edits=edits, max_new_tokens=n, temperature=0.0)
  want = _greedy_reference(run, prompt, n, lambda s: interventions.intervened_logits(run, s, "sae0", edits))
  np.testing.assert_array_equal(got[0], want)


def test_sampling_seed_top_p_and_padding(run, tokens):
  prompt = tokens[0, :5]
  kw = {"samples": 3, "max_new_tokens": 8}
  a = interventions.generate(run, prompt, temperature=3.0, seed=7, **kw)
  assert len({tuple(row) for row in a}) > 1   # the samples of one call differ
  np.testing.assert_array_equal(a, interventions.generate(run, prompt, temperature=3.0, seed=7, **kw))
  assert (a >= 0).all() and (a < run.tokenizer.vocab_size).all()   # padding columns are never drawn
  assert not np.array_equal(a, interventions.generate(run, prompt, temperature=3.0, seed=8, **kw))
  greedy = interventions.generate(run, prompt, temperature=0.0, **kw)
  np.testing.assert_array_equal(interventions.generate(run, prompt, top_p=1e-6, seed=3, **kw), greedy)
  with pytest.raises(Exception, match="max_seq_len"):
    interventions.generate(run, np.zeros(16, np.int32))


def test_the_decode_path_reproduces_a_rotary_tied_model():
  """A 2-layer model (rotary positions, tied unembedding; the run's model is learned and untied), fresh
  weights: prefill + one token at a time == Transformer.__call__."""
  from monojax.config import base_config
  cfg = base_config().model
  cfg.vocab_size, cfg.d_model, cfg.d_mlp, cfg.n_layers, cfg.n_heads, cfg.d_head = 128, 16, 32, 2, 2, 8
  cfg.max_seq_len, cfg.positional, cfg.tied_embeddings = 10, "rotary", True
  graphdef, abstract = transformer.abstract_model(cfg)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), abstract)
  toks = jnp.asarray(rng.integers(0, 128, (2, 10)), jnp.int32)

  @jax.jit
  def both(params, toks):   # one program: the model's own forward, then prefill 4 + one token at a time
    model = nnx.merge(graphdef, params)
    caches = tuple((jnp.zeros((2, 10, 2, 8)), jnp.zeros((2, 10, 2, 8))) for _ in range(2))
    h, caches = decode.forward_chunk(model, toks[:, :4], 0, caches)

    def step(caches, t):
      h, caches = decode.forward_chunk(model, jax.lax.dynamic_slice_in_dim(toks, t, 1, axis=1), t, caches)
      return caches, h[:, 0]
    _, rest = jax.lax.scan(step, caches, jnp.arange(4, 10))
    return model(toks)[0], jnp.concatenate([h, rest.transpose(1, 0, 2)], 1)
  want, got = both(params, toks)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_edit_arrays_check_their_input(run):
  sae = run.sae("sae0")
  with pytest.raises(Exception, match="features 0..63"):
    edit_lib.edit_arrays([Edit(64)], sae, 1, 4)
  with pytest.raises(Exception, match="mode"):
    edit_lib.edit_arrays([Edit(1, "boost", 2.0)], sae, 1, 4)
  with pytest.raises(Exception, match="outside"):
    edit_lib.edit_arrays([Edit(1, positions=[4])], sae, 1, 4)
  arrays = edit_lib.edit_arrays([Edit(1, positions=[-1, 0])], sae, 2, 4)
  np.testing.assert_array_equal(arrays.where[0], [[1, 0, 0, 1]] * 2)


# --------------------------------------------------------------------------------------- the CLI

def _cli(capsys, *argv):
  rc = generate_cli.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def test_cli_prints_the_shift_and_both_columns(run, capsys):
  rc, out, err = _cli(capsys, f"--workdir={run.workdir}", "--prompt=The list", "--clamp=3=5.5", "--ablate=1",
                      "--scale=2=2", "--max_new_tokens=12", "--seed=1", "--top_p=0.9")
  assert rc == 0, err
  print(out)
  assert "KL(clean‖edited) =" in out and "raised most" in out and "lowered most" in out
  assert "clamp 3=5.5, scale 2×2, ablate 1" in out
  assert "| edited" in out and "#0 " in out


@pytest.mark.parametrize("args,message", [
    (["--clamp=3:5"], "expected ID=NUMBER"),
    (["--clamp=x=5"], "feature id"),
    (["--scale=3=nan"], "finite"),
    (["--sae=sae9"], "no SAE 'sae9'"),
    (["--ablate=64"], "features 0..63"),
    (["--prompt="], "--prompt: empty"),
    (["--prompt=" + "word " * 40], "max_seq_len=16"),
])
def test_cli_errors_are_one_line(run, capsys, args, message):
  argv = [f"--workdir={run.workdir}", "--prompt=The list", *args]
  try:
    rc = generate_cli.main(argv)
  except SystemExit as e:   # argparse's own errors
    rc = e.code
  out, err = capsys.readouterr()
  assert rc == 2 and out == ""
  assert err.startswith("monojax.generate: ") and err.count("\n") == 1 and message in err, err
