"""python -m monojax.export: SAELens and TransformerLens files of a run. The format tests need no torch
(safetensors' numpy API, json, and a numpy re-implementation of SAELens' encode/decode); the interop
test loads both exports with sae_lens and transformer_lens where they are installed (the anchors venv:
bash benchmarks/setup_anchors.sh)."""
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from monojax import export
from monojax.export import __main__ as cli, saelens, transformerlens


# ------------------------------------------------------------------------------- helpers

def _json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _sae_lens_encode(w, cfg, x):
  """SAELens 6 StandardSAE / TopKSAE encode on fp32 numpy (sae.py process_sae_in + encode)."""
  pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
  if cfg["architecture"] == "topk":
    keep = np.argpartition(-pre, cfg["k"] - 1, axis=-1)[..., :cfg["k"]]
    out = np.zeros_like(pre)
    np.put_along_axis(out, keep, np.maximum(np.take_along_axis(pre, keep, -1), 0), -1)
    return out
  return np.maximum(pre, 0)


def _sae_lens_decode(w, f):
  return f @ w["W_dec"] + w["b_dec"]


def _close(got, want, rel=2e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.abs(want).max(), 1e-6)
  assert np.abs(got - want).max() <= rel * scale, f"max abs diff {np.abs(got - want).max():.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def run(cotrained_run_template):
  from monojax.run import Run
  return Run.open(cotrained_run_template)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  base = tmp_path_factory.mktemp("exports")
  return {"saelens": export.export_run(run, "saelens", str(base / "sae")),
          "transformerlens": export.export_run(run, "transformerlens", str(base / "tl"))}


def _tokens(run, shape=(2, 16), seed=0):
  return np.random.default_rng(seed).integers(0, run.tokenizer.vocab_size, shape, dtype=np.int32)


# ------------------------------------------------------------------------------- SAELens

def test_saelens_files_keys_shapes_and_cfg(run, exported):
  out = exported["saelens"]
  assert sorted(os.listdir(out)) == sorted([s.name for s in run.saes] + [export.MARKER])
  marker = _json(os.path.join(out, export.MARKER))
  assert marker["schema"] == export.SCHEMA and marker["to"] == "saelens" and marker["step"] == run.step
  for s in run.saes:
    folder = os.path.join(out, s.name)
    assert sorted(os.listdir(folder)) == ["cfg.json", "sae_weights.safetensors"]
    w = load_file(os.path.join(folder, "sae_weights.safetensors"))
    want = {"W_enc": (s.d_in, s.width), "b_enc": (s.width,), "W_dec": (s.width, s.d_in), "b_dec": (s.d_in,)}
    assert {k: v.shape for k, v in w.items()} == want
    assert all(v.dtype == np.float32 for v in w.values())
    cfg = _json(os.path.join(folder, "cfg.json"))
    assert cfg["architecture"] == "standard" and (cfg["d_in"], cfg["d_sae"]) == (s.d_in, s.width)
    assert (cfg["dtype"], cfg["device"], cfg["apply_b_dec_to_input"]) == ("float32", "cpu", True)
    assert (cfg["normalize_activations"], cfg["reshape_activations"]) == ("none", "none")
    md = cfg["metadata"]
    assert md["hook_name"] == f"blocks.{s.layer}.mlp.hook_post" and md["sae_lens_version"].startswith("6.")
    assert md["model_name"] == saelens.model_name(run) and md["context_size"] == run.cfg.data.seq_len
    assert md["monojax"]["run"] == run.workdir and md["monojax"]["step"] == run.step
    assert (md["monojax"]["sae"], md["monojax"]["label"], md["monojax"]["recipe"]) == (s.name, s.label, s.recipe)


def test_saelens_encode_decode_equal_monojax_on_the_run(run, exported):
  from monojax.sae import core as sae_core
  tokens = _tokens(run)
  x = np.asarray(run.mlp_acts(tokens)).reshape(-1, run.cfg.model.d_mlp)
  for s in run.saes:
    folder = os.path.join(exported["saelens"], s.name)
    w, cfg = load_file(os.path.join(folder, "sae_weights.safetensors")), _json(os.path.join(folder, "cfg.json"))
    f = _sae_lens_encode(w, cfg, x)
    want = np.asarray(run.features(tokens, s)).reshape(f.shape)
    assert (want > 0).any()
    _close(f, want)
    _close(_sae_lens_decode(w, f), sae_core.reconstruct(run.sae_state, s, x))


def test_mapping_of_every_recipe():
  """The folding for 2023 (scaled and on raw inputs), 2024 and topk on random parameters (free decoder
  norms, non-zero biases, a 2024 decoder row of norm 0) against sae.core's encode / reconstruct."""
  import dataclasses
  from monojax.config import base_config
  from monojax.run import Run
  from monojax.sae import catalogue, core as sae_core
  d, rng = 24, np.random.default_rng(1)
  acts = np.maximum(rng.standard_normal((64, d)) * 2 + 0.5, 0).astype(np.float32)
  cfg = base_config()
  cfg.sae.saes, cfg.sae.topk_k = "40::2024,32:0:topk,36:0.004:2023", 5
  saes = catalogue.build(cfg.sae, d, layer=0)
  saes += (dataclasses.replace(saes[2], index=3, scaled=False),)  # the same 2023 SAE on raw activations
  groups = {}
  for s in saes[:3]:
    W_d = rng.standard_normal((1, s.width, d)).astype(np.float32)
    if s.recipe == "2024":
      W_d[:, 3] = 0.0
    else:
      W_d /= np.linalg.norm(W_d, axis=-1, keepdims=True)
    groups[s.group] = {"params": {"W_e": rng.standard_normal((1, d, s.width)).astype(np.float32) * 0.3,
                                  "b_e": rng.standard_normal((1, s.width)).astype(np.float32) * 0.3,
                                  "W_d": W_d, "b_d": rng.standard_normal((1, d)).astype(np.float32) * 0.3}}
  state = {"groups": groups, "input_scale": np.float32(0.37)}
  fake = Run(workdir="/nowhere/run", cfg=cfg, step=10, tokenizer=None, graphdef=None, params=None,
             sae_state=state, saes=saes, mesh=None)
  encode, reconstruct = jax.jit(sae_core.encode, static_argnums=1), jax.jit(sae_core.reconstruct, static_argnums=1)
  for s in saes:
    w, c = saelens.sae_weights(fake, s), saelens.sae_config(fake, s)
    assert c["architecture"] == ("topk" if s.recipe == "topk" else "standard")
    assert c.get("k") == (5 if s.recipe == "topk" else None)
    assert c["metadata"]["monojax"]["input_scale"] == pytest.approx(0.37 if s.scaled else 1.0)
    f = _sae_lens_encode(w, c, acts)
    want = np.asarray(encode(state, s, acts))
    assert (want > 0).any() and (want == 0).any(), s
    _close(f, want)
    _close(_sae_lens_decode(w, f), reconstruct(state, s, acts))


# ------------------------------------------------------------------------------- TransformerLens

def test_transformerlens_files_keys_and_shapes(run, exported, cotrained_run_template):
  out = exported["transformerlens"]
  assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", "tokenizer.json", export.MARKER])
  cfg = _json(os.path.join(out, "config.json"))
  m = run.cfg.model
  assert (cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_mlp"]) == (
      m.n_layers, m.d_model, m.n_heads, m.d_head, m.d_mlp)
  assert cfg["d_vocab"] == cfg["d_vocab_out"] == run.tokenizer.vocab_size < m.vocab_size  # padding rows dropped
  assert (cfg["act_fn"], cfg["normalization_type"], cfg["eps"], cfg["positional_embedding_type"]) == (
      "relu", "LN", 1e-5, "standard")
  assert cfg["n_ctx"] == m.max_seq_len and cfg["tokenizer_name"] is None and cfg["default_prepend_bos"] is False
  sd = load_file(os.path.join(out, "model.safetensors"))
  D, H, K, M, V, L = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_mlp"], cfg["d_vocab"], cfg["n_layers"]
  want = {"embed.W_E": (V, D), "pos_embed.W_pos": (cfg["n_ctx"], D), "ln_final.w": (D,), "ln_final.b": (D,),
          "unembed.W_U": (D, V), "unembed.b_U": (V,)}
  for i in range(L):
    b = f"blocks.{i}."
    want.update({b + "ln1.w": (D,), b + "ln1.b": (D,), b + "ln2.w": (D,), b + "ln2.b": (D,),
                 b + "attn.W_Q": (H, D, K), b + "attn.W_K": (H, D, K), b + "attn.W_V": (H, D, K),
                 b + "attn.W_O": (H, K, D), b + "attn.b_Q": (H, K), b + "attn.b_K": (H, K), b + "attn.b_V": (H, K),
                 b + "attn.b_O": (D,), b + "mlp.W_in": (D, M), b + "mlp.b_in": (M,), b + "mlp.W_out": (M, D),
                 b + "mlp.b_out": (D,)})
  assert {k: v.shape for k, v in sd.items()} == want
  assert all(v.dtype == np.float32 for v in sd.values())
  from flax import nnx
  params = jax.device_get(nnx.to_pure_dict(run.params))
  np.testing.assert_array_equal(sd["blocks.0.attn.W_Q"][1], np.asarray(params["blocks"][0]["attn"]["W_Q"])[:, 1])
  np.testing.assert_array_equal(sd["unembed.W_U"], np.asarray(params["W_U"])[:, :V])
  with open(os.path.join(cotrained_run_template, "tokenizer.json"), "rb") as a:
    with open(os.path.join(out, "tokenizer.json"), "rb") as b:
      assert a.read() == b.read()


def test_state_dict_of_tied_embeddings_is_untied():
  rng = np.random.default_rng(0)
  p = {"W_E": rng.standard_normal((8, 4)), "ln_final": {"w": np.ones(4), "b": np.zeros(4)}, "blocks": {}}
  sd = transformerlens.state_dict(p, d_vocab=6)
  np.testing.assert_array_equal(sd["unembed.W_U"], p["W_E"][:6].T.astype(np.float32))
  assert "pos_embed.W_pos" not in sd  # rotary: no position table


# ------------------------------------------------------------------------------- the command line

def _err_line(capsys):
  err = capsys.readouterr().err.strip()
  assert err.startswith("monojax.export: ") and "\n" not in err, err
  return err


@pytest.mark.parametrize("argv, expect", [
    (["--to=saelens", "--out=X"], "--workdir"),
    (["--workdir=W", "--to=onnx", "--out=X"], "invalid choice"),
    (["--workdir=W", "--to=transformerlens", "--out=X", "--sae=sae0"], "--sae applies"),
    (["--workdir=W", "--to=saelens", "--out=X", "--sae=,"], "--sae"),
])
def test_bad_flags_are_one_line_exit_2(argv, expect, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2 and expect in _err_line(capsys)


def test_non_run_workdir_and_foreign_out_are_refused(cotrained_run_template, tmp_path, capsys):
  out = tmp_path / "out"
  (tmp_path / "notarun").mkdir()
  assert cli.main([f"--workdir={tmp_path / 'notarun'}", "--to=saelens", f"--out={out}"]) == 2
  assert "not a monojax run" in _err_line(capsys) and not out.exists()
  assert cli.main([f"--workdir={tmp_path / 'missing'}", "--to=saelens", f"--out={out}"]) == 2
  assert "not a directory" in _err_line(capsys)
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  assert cli.main([f"--workdir={cotrained_run_template}", "--to=saelens", f"--out={foreign}"]) == 2
  assert "not a monojax export" in _err_line(capsys)
  assert os.listdir(foreign) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
  a_file = tmp_path / "file"
  a_file.write_text("x")
  assert cli.main([f"--workdir={cotrained_run_template}", "--to=transformerlens", f"--out={a_file}"]) == 2
  assert "not a folder" in _err_line(capsys) and a_file.read_text() == "x"
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_cli_exports_picked_sae_then_unknown_sae_is_refused(cotrained_run_template, tmp_path, capsys):
  out = tmp_path / "sae"
  out.mkdir()  # an empty folder may be written
  assert cli.main([f"--workdir={cotrained_run_template}", "--to=saelens", f"--out={out}", "--sae=sae1"]) == 0
  assert capsys.readouterr().out.strip() == str(out)
  assert sorted(os.listdir(out)) == [export.MARKER, "sae1"]
  before = {n: os.path.getmtime(out / n) for n in os.listdir(out)}
  assert cli.main([f"--workdir={cotrained_run_template}", "--to=saelens", f"--out={out}", "--sae=sae9"]) == 2
  assert "no SAE 'sae9'" in _err_line(capsys)
  assert {n: os.path.getmtime(out / n) for n in os.listdir(out)} == before  # the earlier export is kept
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_earlier_export_is_replaced(run, tmp_path):
  out = str(tmp_path / "sae")
  export.export_run(run, "saelens", out, ["sae0", "sae1"])
  export.export_run(run, "saelens", out, ["sae0"])
  assert sorted(os.listdir(out)) == [export.MARKER, "sae0"]


# ------------------------------------------------------------------------------- interop

def test_interop_sae_lens_and_transformer_lens(run, exported):
  torch = pytest.importorskip("torch")
  sae_lens = pytest.importorskip("sae_lens")
  pytest.importorskip("transformer_lens")
  tokens = _tokens(run, (2, run.cfg.data.seq_len), seed=3)
  x = torch.from_numpy(np.asarray(run.mlp_acts(tokens)))
  for s in run.saes:
    sae = sae_lens.SAE.load_from_disk(os.path.join(exported["saelens"], s.name))
    with torch.no_grad():
      f = sae.encode(x).numpy()
      x_hat = sae.decode(torch.from_numpy(f)).numpy()
    want = np.asarray(run.features(tokens, s))
    from monojax.sae import core as sae_core
    want_hat = np.asarray(sae_core.reconstruct(run.sae_state, s, x.numpy().reshape(-1, s.d_in))).reshape(x_hat.shape)
    print(f"{s.name}: SAELens features max abs diff {np.abs(f - want).max():.3g} (max {np.abs(want).max():.3g}), "
          f"reconstruction {np.abs(x_hat - want_hat).max():.3g}")
    _close(f, want, rel=1e-4)
    _close(x_hat, want_hat, rel=1e-4)
  model = transformerlens.load_hooked_transformer(exported["transformerlens"])
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens.astype(np.int64))).numpy()
  want = np.asarray(run.logits(tokens))
  print(f"TransformerLens logits max abs diff {np.abs(logits - want).max():.3g} (max {np.abs(want).max():.3g})")
  assert logits.shape == want.shape
  _close(logits, want, rel=1e-4 if run.cfg.train.dtype == "float32" else 3e-2)
