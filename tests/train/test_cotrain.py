"""SAEs co-trained in the LM step and on a frozen LM, run as a user runs them."""
import hashlib
import json
import math
import os

from test_loop import _metrics, _run, kill_9_after_checkpoint

SAE_ARGS = ["--config.sae.start_step=2", "--config.sae.buffer_steps=2", "--config.sae.positions_per_context=8",
            "--config.sae.batch_size=32"]


def _contents(root):
  """{relative path: sha1 of the bytes} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      out[os.path.relpath(p, root)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
  return out


def test_cotrain_resume_after_kill_9_is_bit_identical(base_args, tmp_path):
  common = [a for a in base_args if a != "--config.mode=lm"] + SAE_ARGS + [
      "--config.train.steps=10", "--config.train.ckpt_every=6", "--config.sae.saes=64:0.004:2023,64:0.01:2023"]
  straight = tmp_path / "straight"
  rc, out = _run(common + [f"--workdir={straight}"])
  assert rc == 0, out[-3000:]
  ref = _metrics(straight)
  assert "sae1/mse" in ref[10] and "sae0/mse" not in ref[4]  # SAE updates start after the buffer is full

  killed = tmp_path / "killed"
  kill_9_after_checkpoint(common, killed, 6)
  rc, out = _run(common + [f"--workdir={killed}"])
  assert rc == 0 and "at step 6" in out, out[-3000:]
  got = _metrics(killed)
  for s in range(1, 11):
    for k in ("loss", "sae0/mse", "sae1/l0", "sae1/fvu"):
      assert got[s].get(k) == ref[s].get(k), (s, k)


def test_frozen_lm_lambda_sweep_in_one_job(base_args, tmp_path):
  lm = tmp_path / "lm"
  rc, out = _run(base_args + ["--config.train.steps=3", "--config.train.ckpt_every=3", f"--workdir={lm}"])
  assert rc == 0, out[-3000:]
  lm_before = _contents(lm)
  sweep = tmp_path / "sweep"
  data_args = [a for a in base_args if a.startswith("--config.data.") or a.startswith("--config.preview")]
  rc, out = _run(["--config=configs/sae.py", f"--config.lm_checkpoint={lm}", f"--workdir={sweep}", *data_args,
                  *SAE_ARGS, "--config.train.steps=8", "--config.train.eval_every=0", "--config.train.eval_batches=1",
                  "--config.train.log_every=2", "--config.sae.saes=64:0.002:2023,64:0.004:2023,64:0.008:2023"])
  assert rc == 0, out[-3000:]
  assert "frozen LM: parameters of step 3" in out
  rows = _metrics(sweep)
  assert all(f"sae{i}/l1_coef" in rows[8] for i in range(3))
  assert [round(rows[8][f"sae{i}/l1_coef"], 6) for i in range(3)] == [0.002, 0.004, 0.008]
  assert "loss" not in rows[2] and "grad_norm" not in rows[2]  # frozen: forward only, cut at the SAE's layer
  assert _contents(lm) == lm_before  # the LM run was only read: every file byte-for-byte as it was
  assert "sae2 [64 2023 l1=0.008] loss recovered" in out
  ev = [r for r in map(json.loads, (sweep / "metrics.jsonl").read_text().splitlines()) if "sae0_eval/fvu" in r][-1]
  assert all(math.isfinite(ev[f"sae{i}_eval/loss_recovered"]) for i in range(3))
  assert all(0 <= ev[f"sae{i}_eval/l0"] <= 64 for i in range(3))
