"""Numbers a person can trust: speed measured over completed steps only, a dying SAE flagged, loss
recovered left undefined where it is noise, non-finite parameters and evaluations stopping the run,
and the SAE evaluation and preview bounded in memory whatever the batch."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monojax.models import transformer
from monojax.sae import catalogue, core as sae_core
from monojax.train import cotrain, evaluate, loop, metrics as metrics_lib, preview
from test_model_step import tiny_cfg


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class _Writer:
  def __init__(self):
    self.rows = []

  def write(self, step, m):
    self.rows.append((step, m))


def _reporter(clock, saes=(), log=None):
  return evaluate.Reporter(_Writer(), total=100, tokens_per_step=1000, flops_per_token=1.0, peak=1e9, saes=saes,
                           is_main=True, log=log or (lambda *a: None), start=0, clock=clock)


def test_speed_counts_only_completed_steps_since_the_last_restart():
  clock = _Clock()
  r = _reporter(clock)
  clock.t = 50.0  # e.g. a compile: the loop restarts the window after it
  r.restart(1)
  clock.t = 54.0
  r.report(5, {"loss": 1.0, "accuracy": 0.5, "bits_per_byte": 1.0, "lr": 1e-3})
  (step, row), = r.writer.rows
  assert row["tokens_per_s"] == pytest.approx(4 * 1000 / 4.0)  # steps 2..5 in 4 s; the 50 s compile not counted
  clock.t = 60.0
  r.restart(5)  # an eval ran
  r.report(5, {"loss": 1.0, "accuracy": 0.5, "bits_per_byte": 1.0, "lr": 1e-3})
  assert math.isnan(r.writer.rows[-1][1]["tokens_per_s"]) and math.isnan(r.writer.rows[-1][1]["mfu"])
  line = metrics_lib.console_line(5, 100, {"loss": 1.0, "accuracy": 0.5, "bits_per_byte": 1.0, "lr": 1e-3},
                                  float("nan"), float("nan"), float("nan"))
  assert "- tok/s | MFU -" in line and "nan" not in line


def test_dying_sae_is_flagged_in_the_log_and_the_metrics():
  sae = catalogue.build(_sae_cfg("64:0.004:2023"), 8)[0]
  logs = []
  r = _reporter(_Clock(), saes=(sae,), log=logs.append)
  m = {"sae0/mse": 0.1, "sae0/l0": 0.4, "sae0/dead_frac": 0.2, "sae0/fvu": 0.9, "sae0/l1": 0.0, "sae0/lr": 1e-3,
       "sae0/l1_coef": 0.004}
  r.report(1, dict(m))
  r.report(2, dict(m))
  r.report(3, dict(m, **{"sae0/l0": 12.0, "sae0/dead_frac": 0.95}))  # dead share over 90 %: still dying
  r.report(4, dict(m, **{"sae0/l0": 12.0, "sae0/dead_frac": 0.1}))
  assert [row["sae0/alarm"] for _, row in r.writer.rows] == [1.0, 1.0, 1.0, 0.0]
  warnings = [line for line in logs if line.startswith("WARNING: sae0")]
  assert len(warnings) == 1 and "L0 0.40" in warnings[0]  # once, when it starts
  assert any("recovered" in line for line in logs) and sum("| DYING" in line for line in logs) == 3


def _sae_cfg(saes):
  from monojax.sae.config import sae_config
  c = sae_config()
  c.saes = saes
  return c


def _sums(ce_clean, ce_zero, tokens=100.0):
  return {"tokens": tokens, "ce_clean": ce_clean, "ce_zero": ce_zero, "x_sq_dev": 1.0, "ce_sae": [ce_clean + 1.0],
          "sq_err": [0.5], "l0": [10.0], "l1": [5.0], "fires": [np.ones(8, np.int32)]}


def test_loss_recovered_is_undefined_when_ablation_is_noise():
  cfg = tiny_cfg()
  cfg.sae.min_ablation_gap = 0.01
  near = cotrain.summarize_eval(_sums(500.0, 500.5), cfg)  # zero-ablation costs 0.005 nats: noise
  assert "sae0_eval/loss_recovered" not in near and near["sae_eval/ablation_gap"] == pytest.approx(0.005)
  far = cotrain.summarize_eval(_sums(500.0, 600.0), cfg)
  assert far["sae0_eval/loss_recovered"] == pytest.approx((6.0 - 5.01) / (6.0 - 5.0))
  noisy = cotrain.summarize_eval(_sums(500.0, 600.0), cfg, batch_gaps=[-3.0, 5.0, -2.0, 4.0])  # mean 1, SE ≈ 2
  assert "sae0_eval/loss_recovered" not in noisy and noisy["sae_eval/ablation_gap_se"] > 1.0
  lines = evaluate.Evaluator(cfg, tokenizer=None, root=None, mesh=None, eval_step=None, sae_eval_step=None,
                             saes=catalogue.build(_sae_cfg("8:0.004:2023"), 4, 0), sae_from_step=0,
                             log=None)._sae_lines(7, near)
  assert "loss recovered is undefined" in lines[0] and "loss recovered -" in lines[1]


def test_non_finite_parameters_and_evaluations_stop_the_run():
  state = {"params": {"w": jnp.ones(3)},
           "sae": {"groups": {"g0": {"params": {"W_e": jnp.array([1.0, jnp.nan])}}}}}
  ok = jax.device_get(loop._finite_parts(state))
  assert ok == {"LM parameters": True, "SAE group g0": False}
  with pytest.raises(loop.TrainingDiverged, match=r"non-finite evaluation at step 7: sae1_eval/loss_spliced=nan"):
    evaluate.check_eval_finite(7, {"eval/loss": 3.0, "sae1_eval/loss_spliced": float("nan"), "sae1_eval/fvu": 0.1},
                               "/run/checkpoints")
  evaluate.check_eval_finite(7, {"eval/loss": 3.0, "sae0_eval/l0": 2.0}, "/x")  # finite: no error


def _eval_temp_bytes(B, elements, width=4096):
  cfg = tiny_cfg()
  cfg.model.vocab_size = 256
  graphdef, params = nnx.split(transformer.Transformer(cfg.model, rngs=nnx.Rngs(params=0)), nnx.Param)
  cfg.sae.saes = f"{width}:0.004:2023"
  d = cfg.model.d_mlp
  sae_state = sae_core.init_state(cfg.sae, d, jax.random.key(0), jnp.ones((8, d)), 10)
  saes = catalogue.build(cfg.sae, d, layer=0)
  old = cotrain.EVAL_CHUNK_ELEMENTS
  cotrain.EVAL_CHUNK_ELEMENTS = elements
  try:
    step = jax.jit(cotrain.make_eval_step(graphdef, saes, vocab_size=250, dtype="float32", loss_chunk=0))
    tokens = jax.ShapeDtypeStruct((B, 17), jnp.int32)
    return step.lower(params, sae_state, {"tokens": tokens}).compile().memory_analysis().temp_size_in_bytes
  finally:
    cotrain.EVAL_CHUNK_ELEMENTS = old


def test_sae_eval_memory_does_not_grow_with_the_batch():
  """With 4,096 features, one batch's activations [B·16, 4096] are 4 MB at B = 16 and 16 MB at B =
  64; chunked at 128 rows the eval's scratch memory grows far less than that difference."""
  small, large = _eval_temp_bytes(16, 128 * 4096), _eval_temp_bytes(64, 128 * 4096)
  f_bytes = lambda B: B * 16 * 4096 * 4  # noqa: E731
  assert large - small < 0.25 * (f_bytes(64) - f_bytes(16)), (small, large)
  unchunked = _eval_temp_bytes(64, 2**30)
  assert unchunked - large > 0.5 * (f_bytes(64) - f_bytes(16))  # the check can see the difference


def test_chunked_preview_stats_equal_the_whole_batch():
  cfg = _sae_cfg("64:0.004:2023")
  d = 8
  x = jnp.asarray(np.maximum(np.random.RandomState(0).randn(300, d), 0), jnp.float32)
  state = sae_core.init_state(cfg, d, jax.random.key(1), x, 10)
  sae = catalogue.build(cfg, d)[0]
  old = cotrain.EVAL_CHUNK_ELEMENTS
  cotrain.EVAL_CHUNK_ELEMENTS = 7 * 64  # 7-row chunks: 43 of them, the last one padded
  try:
    counts, vals, idx = jax.device_get(preview._batch_stats(sae, 3)(state, x))
  finally:
    cotrain.EVAL_CHUNK_ELEMENTS = old
  f = np.asarray(sae_core.encode(state, sae, x))
  np.testing.assert_array_equal(counts, (f > 0).sum(0))
  np.testing.assert_allclose(vals, -np.sort(-f.T, axis=1)[:, :3], rtol=1e-6)
  np.testing.assert_allclose(np.take_along_axis(f.T, idx, 1), vals, rtol=1e-6)  # the rows point at those values


def test_packed_metrics_read_back_as_the_dict_does():
  """The loop fetches a step's metrics as one packed vector: the same names, order and floats as
  flattening the dict (NaN and Inf included); metrics that are not all float32 stay a dict."""
  m = {"loss": jnp.float32(2.5), "grad_norm": jnp.float32(np.inf), "lr": jnp.float32(1e-3),
       "sae": {"mse": jnp.asarray([0.25, np.nan], jnp.float32), "l0": jnp.asarray([3.0, 1.0 / 3], jnp.float32)}}
  packed = evaluate.pack(m)
  assert isinstance(packed, evaluate.Packed)
  got, want = evaluate.flatten(packed), evaluate.flatten(m)
  assert list(got) == list(want) == ["grad_norm", "loss", "lr", "sae0/l0", "sae1/l0", "sae0/mse", "sae1/mse"]
  assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(got.values(), want.values()))
  assert got["sae1/l0"] == float(np.float32(1.0 / 3)) and math.isnan(got["sae1/mse"]) and got["grad_norm"] == math.inf
  mixed = {"loss": jnp.float32(1.0), "tokens": jnp.int32(7)}
  assert evaluate.pack(mixed) is mixed and evaluate.flatten(mixed) == {"loss": 1.0, "tokens": 7.0}


def test_every_finite_metric_reaches_tensorboard_at_its_step(tmp_path):
  import glob
  import struct

  from tensorboardX.proto import event_pb2
  w = metrics_lib.MetricWriter(str(tmp_path), 0, enabled=True)
  w.write(3, {"loss": 2.0, "sae0/mse": float("nan"), "tokens_per_s": float("inf"), "note": "x", "lr": 1e-3})
  w.write(4, {"loss": 1.5})
  w.close()
  seen = []
  for path in glob.glob(str(tmp_path / "tb" / "*tfevents*")):
    with open(path, "rb") as f:
      data, i = f.read(), 0
    while i < len(data):  # TFRecords: length, its crc, the event, its crc
      n = struct.unpack("<Q", data[i:i + 8])[0]
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      seen += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
      i += 16 + n
  assert sorted(seen) == [(3, "loss", 2.0), (3, "lr", pytest.approx(1e-3)), (4, "loss", 1.5)]
