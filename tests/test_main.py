"""The main entry point end to end on the small fixture corpus."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  return subprocess.run([sys.executable, "-m", "monojax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_main_reports_data_trains_and_writes_the_workdir(tiny_corpus, tmp_path):
  wd = tmp_path / "run"
  r = _run(["--config=configs/quickstart.py", f"--config.data.path={tiny_corpus}", "--config.data.tokenizer=bpe:400",
            f"--config.data.index_dir={tmp_path / 'idx'}", "--config.data.seq_len=16", "--config.data.global_batch=4",
            "--config.model.d_model=32", "--config.model.d_mlp=64", "--config.model.n_heads=2", "--config.model.d_head=16",
            "--config.preview_batches=3", "--config.train.steps=4", "--config.train.log_every=2",
            "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.sae.saes=128:0.004:2023",
            "--config.sae.start_step=1", "--config.sae.buffer_steps=1", "--config.sae.positions_per_context=8",
            "--config.sae.batch_size=32", "--config.sae.min_ablation_gap=0", f"--workdir={wd}"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stderr
  assert "Docs: Python" in out and "total" in out          # tokens per set
  assert "M tokens/s" in out                                # pipeline throughput
  assert "step      4/4 | loss" in out and "tok/s | MFU" in out and "ETA" in out
  assert "eval at step 4: loss" in out
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["data"]["seq_len"] == 16 and cfg["data"]["tokenizer"] == "bpe:400"
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]
  assert any("eval/loss" in r for r in rows)
  assert (wd / "checkpoints" / "4").is_dir() and any((wd / "tb").iterdir())
  # the co-trained SAE: its metrics, loss recovered on held-out tokens, density plot and preview
  assert "sae0 [128 2023 l1=0.004] mse" in out and "loss recovered" in out
  assert any("sae0/mse" in r for r in rows) and any("sae0_eval/loss_recovered" in r for r in rows)
  assert (wd / "plots" / "sae0_density.png").stat().st_size > 1000
  preview = (wd / "preview.md").read_text()
  assert "# Feature preview" in preview and "«" in preview
  # The numbers, not just their names: finite, in range, and each derived one consistent with the
  # parts it is computed from (a NaN, a sign error or a swapped term fails here).
  train = [r for r in rows if "loss" in r]
  assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 10 and 0 <= r["accuracy"] <= 1 for r in train)
  assert all(r["bits_per_byte"] > 0 for r in train)
  # speed only over completed steps: NaN right after a compile (shown "-"), else positive
  assert all(not r["tokens_per_s"] <= 0 for r in train) and any(r["tokens_per_s"] > 0 for r in train)
  ev = [r for r in rows if "sae0_eval/loss_recovered" in r][-1]  # the final evaluation (step 4)
  assert math.isfinite(ev["eval/loss"]) and ev["eval/loss"] > 0 and 0 <= ev["eval/accuracy"] <= 1
  assert 0 < ev["eval/unigram_entropy"] <= math.log(400)
  clean, zero, spliced = ev["sae_eval/loss_clean"], ev["sae_eval/loss_zero_ablated"], ev["sae0_eval/loss_spliced"]
  assert clean == pytest.approx(ev["eval/loss"], rel=1e-5)  # the LM eval and the SAE eval read the same tokens
  assert math.isfinite(ev["sae0_eval/loss_recovered"])
  assert ev["sae0_eval/loss_recovered"] == pytest.approx((zero - spliced) / (zero - clean), rel=1e-4)
  assert 0 <= ev["sae0_eval/fvu"] and 0 <= ev["sae0_eval/l0"] <= 128
  assert ev["sae0_eval/dead"] + ev["sae0_eval/alive"] == ev["sae0_eval/n_features"] == 128
  assert f"sae0_eval/loss_recovered {ev['sae0_eval/loss_recovered']:.4g}" in out  # the closing line
  # What later verbs open: the tokenizer as trained, the resolved config, the SAE records.
  assert cfg["model"]["vocab_size"] % 128 == 0 and cfg["config_version"] >= 2  # resolved: the padded vocab
  assert (wd / "tokenizer.json").is_file() and (wd / "checkpoints" / "4" / "meta").is_dir()


def test_unknown_override_is_rejected(tmp_path):
  r = _run(["--config=configs/quickstart.py", "--config.data.no_such_field=1"], tmp_path)
  assert r.returncode != 0 and "no_such_field" in r.stderr


def test_bad_data_path_is_one_clear_line(tmp_path):
  r = _run(["--config=configs/quickstart.py", f"--config.data.path={tmp_path / 'missing'}",
            f"--workdir={tmp_path / 'run'}"], tmp_path)
  assert r.returncode == 2 and "monojax: error: data.path" in r.stderr and "Traceback" not in r.stderr
