"""Two processes x 4 CPU devices on 127.0.0.1 (launch/local.sh) train as ONE job on a global mesh
of 8: one checkpoint with a grain iterator file per process, metrics written once, resume at the
saved step; and each global batch is the concatenation of the two processes' own data slices.

How the last point is observed without touching the production code: a train row of metrics.jsonl
holds `loss` = ce_sum / n and `bits_per_byte` = ce_sum / ln 2 / n_bytes, so
n_bytes = loss * n / (ln 2 * bits_per_byte) is recovered exactly (an integer of a few hundred, f32
error ~1e-4). n_bytes, the UTF-8 bytes of the batch's target tokens, is a checksum of the exact
global batch fed at that step, which the test recomputes from `pipeline.host_batches` for each
process (no jax needed) and compares with the alternatives a broken run would feed.

The job runs with mode=lm. In the default co-training mode a 2-process run trains and evaluates,
then fails at the end: loop.py calls preview.finish on process 0 only, and preview.py
device_gets a global batch that spans process 1's devices.
"""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch", "local.sh")
PROCS, DEVICES, GLOBAL_BATCH, SEQ_LEN = 2, 4, 8, 16


def _args(tiny_corpus, tiny_tokenizer_path, tmp_path, wd, steps):
  return ["--config=configs/quickstart.py", "--config.mode=lm", f"--workdir={wd}",
          f"--config.data.path={tiny_corpus}", f"--config.data.tokenizer={tiny_tokenizer_path}",
          f"--config.data.index_dir={tmp_path / 'idx'}", "--config.model.d_model=32", "--config.model.d_mlp=64",
          "--config.model.n_heads=2", "--config.model.d_head=16",
          f"--config.data.seq_len={SEQ_LEN}", f"--config.data.global_batch={GLOBAL_BATCH}",
          f"--config.train.steps={steps}", "--config.train.ckpt_every=2", "--config.train.eval_every=0",
          "--config.train.eval_batches=1", "--config.train.log_every=1", "--config.preview_batches=0",
          "--config.data.count_tokens=False", "--config.mesh.shape=(4,2)",
          "--config.train.peak_flops=1e11"]  # a given peak: no matmul measured at start in each process


def _launch(args, timeout=240):
  # tests/conftest.py already gives subprocesses a session compile cache (process 0 writes it, so
  # the resumed run compiles less) and LLVM -O0 for these tiny programs.
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("JAX_NUM_CPU_DEVICES", None)  # the launcher sets it per process
  # Own session: on a timeout the whole group (launcher and both python processes) is killed.
  p = subprocess.Popen(["bash", LAUNCH, "-n", str(PROCS), "-d", str(DEVICES), "--", *args], cwd=REPO, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = p.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    out, _ = p.communicate()
    raise AssertionError(f"launch/local.sh did not finish in {timeout}s:\n{out[-4000:]}") from None
  return p.returncode, out


def _train_rows(wd):
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  return [r for r in rows if "loss" in r]


def _batch_bytes(row):
  n = GLOBAL_BATCH * SEQ_LEN  # targets per global batch
  return row["loss"] * n / (math.log(2) * row["bits_per_byte"])


def _lines(out, pid):
  return [line[len(f"[p{pid}] "):] for line in out.splitlines() if line.startswith(f"[p{pid}] ")]


@pytest.fixture(scope="module")
def expected_bytes(tiny_corpus, tiny_tokenizer_path, tmp_path_factory):
  """Target bytes of the first 6 global batches as the job must build them, and as broken jobs would."""
  from monojax.config import base_config
  from monojax.data import pipeline, tokenizer as tokenizer_lib
  cfg = base_config().data
  cfg.path, cfg.tokenizer = tiny_corpus, tiny_tokenizer_path
  cfg.seq_len, cfg.global_batch = SEQ_LEN, GLOBAL_BATCH
  cfg.index_dir = str(tmp_path_factory.mktemp("idx"))
  tok = pipeline.get_tokenizer(cfg, tiny_corpus)
  nbytes = tok.token_byte_lengths(tokenizer_lib.padded_vocab_size(tok.vocab_size))

  def batches(pid, count, n=6):
    it = iter(pipeline.host_batches(cfg, "train", tokenizer=tok, root=tiny_corpus, host_batch=GLOBAL_BATCH // count,
                                    seed=cfg.seed, process_index=pid, process_count=count))
    return [next(it)["tokens"] for _ in range(n)]

  def target_bytes(tokens):
    return int(nbytes[tokens[:, 1:]].sum())

  host = [batches(pid, PROCS) for pid in range(PROCS)]
  right = [target_bytes(np.concatenate(parts)) for parts in zip(*host)]
  return {
      "right": right,
      "one_process": [target_bytes(b) for b in batches(0, 1)],                      # no host slicing
      "same_slice": [target_bytes(np.concatenate([b, b])) for b in host[0]],         # both feed process 0's slice
      "restarted": right[:4] + right[:2],                                            # iterator not restored
  }


@pytest.mark.timeout(600)
def test_two_processes_form_one_job_and_resume(tiny_corpus, tiny_tokenizer_path, tmp_path, expected_bytes):
  wd = tmp_path / "run"
  rc, out = _launch(_args(tiny_corpus, tiny_tokenizer_path, tmp_path, wd, steps=4))
  assert rc == 0, out[-4000:]

  # One job: each process sees its 4 local devices inside 8 global ones.
  for pid in range(PROCS):
    log = "\n".join(_lines(out, pid))
    assert (f"distributed: process {pid} of {PROCS}, {DEVICES} local / {PROCS * DEVICES} global devices"
            in log), log[-3000:]
    assert f"{PROCS} process(es), {PROCS * DEVICES} cpu device(s)" in log
  assert not any("step " in line and "/4 |" in line for line in _lines(out, 1))  # only process 0 prints metrics

  # One checkpoint directory (not one per process), an iterator state per process in each step.
  ckpt = wd / "checkpoints"
  assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == [2, 4]
  for step in (2, 4):
    data = sorted(f for f in os.listdir(ckpt / str(step) / "data") if f.endswith(".json"))
    assert data == [f"process_{i}-of-{PROCS}.json" for i in range(PROCS)], data
    assert (ckpt / str(step) / "state").is_dir()

  # metrics.jsonl written once: each step exactly once (two writers would duplicate rows).
  rows = _train_rows(wd)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]

  # Each step's global batch is process 0's slice + process 1's slice, both from their own iterators.
  seen = [_batch_bytes(r) for r in rows]
  exp = expected_bytes
  for wrong in ("one_process", "same_slice"):
    assert exp[wrong][:4] != exp["right"][:4], f"{wrong}: the check cannot tell it apart on this corpus"
  np.testing.assert_allclose(seen, exp["right"][:4], atol=0.05,
                             err_msg=f"bytes per batch {seen}; one process would give {exp['one_process'][:4]}, "
                                     f"both processes on process 0's slice {exp['same_slice'][:4]}")

  # Resume with more steps: both processes restore the step-4 checkpoint and their own iterators.
  rc, out = _launch(_args(tiny_corpus, tiny_tokenizer_path, tmp_path, wd, steps=6))
  assert rc == 0, out[-4000:]
  for pid in range(PROCS):
    assert any(f"resumed from {ckpt} at step 4" in line for line in _lines(out, pid)), out[-3000:]
  rows = _train_rows(wd)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == [2, 4, 6]
  seen = [_batch_bytes(r) for r in rows]
  assert exp["restarted"] != exp["right"]
  np.testing.assert_allclose(seen, exp["right"], atol=0.05,
                             err_msg=f"bytes per batch {seen}; restarted iterators would give {exp['restarted']}")


_FAKE_MAIN = '''#!{python}
# Stands in for `python -u -m monojax.main ARGS`: prints what it was given; process 1 fails, process 0
# ignores SIGTERM like a peer blocked in a collective with a dead process.
import os, signal, sys, time
e = os.environ
print(f"id={{e['MONOJAX_PROCESS_ID']}} of {{e['MONOJAX_NUM_PROCESSES']}} at {{e['MONOJAX_COORDINATOR']}} "
      f"platforms={{e['JAX_PLATFORMS']}} devices={{e['JAX_NUM_CPU_DEVICES']}} argv={{sys.argv[1:]}}", flush=True)
if e["MONOJAX_PROCESS_ID"] == "1":
  time.sleep(0.5)
  sys.exit("process 1 fails")
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(120)
'''


def test_local_sh_stops_the_others_when_one_fails(tmp_path):
  fake = tmp_path / "fake_python"
  fake.write_text(_FAKE_MAIN.format(python=sys.executable))
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake))
  cmd = ["bash", LAUNCH, "-n", "2", "-d", "3", "-g", "1", "-p", "12345", "--", "--config=x.py", "--a.b=1"]
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       start_new_session=True)
  try:
    out, _ = p.communicate(timeout=60)  # process 0 would sleep 120 s if it were not killed
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError(f"launch/local.sh did not stop process 0:\n{p.communicate()[0]}") from None
  assert p.returncode == 1, out  # process 1's status (sys.exit with a message exits 1)
  lines = out.splitlines()
  for pid in (0, 1):
    [line] = [l for l in lines if l.startswith(f"[p{pid}] id=")]
    assert f"id={pid} of 2 at 127.0.0.1:12345 " in line and "platforms=cpu devices=3" in line, line
    assert "argv=['-u', '-m', 'monojax.main', '--config=x.py', '--a.b=1']" in line, line
  assert "[p1] process 1 fails" in lines
  assert any("process 1" in l and "exited with status 1" in l for l in lines), out
  assert any("process 0" in l and "exited with status 137" in l for l in lines), out  # SIGKILLed after the grace
