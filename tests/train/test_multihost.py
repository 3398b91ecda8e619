"""Two processes x 4 CPU devices on 127.0.0.1 (launch/local.sh) train as ONE job on a global mesh
of 8: one checkpoint with a grain iterator file per process, metrics written once, each global batch
the concatenation of the two processes' own data slices; in mode "lm" (one run) and in the default
co-training mode (a run, then a resume at the saved step with more steps).

How the data slices are observed without touching the production code: a train row of
metrics.jsonl holds `loss` = ce_sum / n and `bits_per_byte` = ce_sum / ln 2 / n_bytes, so
n_bytes = loss * n / (ln 2 * bits_per_byte) is recovered exactly (an integer of a few hundred, f32
error ~1e-4). n_bytes, the UTF-8 bytes of the batch's target tokens, is a checksum of the exact
global batch fed at that step. The test rebuilds each process's window stream without
`pipeline.host_batches`: the job runs with data.shuffle_windows=0 (the window shuffle's own resume
is covered in tests/data), so process p's stream is documents p, p + 2, p + 4, ... of the global
document order (grain's `MapDataset.range(n).shuffle(seed).repeat(None)`), each tokenized and
followed by EOS, concatenated and cut into windows of seq_len + 1, 4 windows per step. The expected
checksums are compared with the ones a broken run would give (no host slicing in one or both
processes, both processes on process 0's slice, iterators restarted on resume).

Co-training with 2 processes trains the SAE, evaluates it (loss recovered) at the end of each run
and resumes; the end-of-run feature preview is skipped with a message (train/loop.py `_finish`:
preview.py would device_get a global batch spanning the other process's devices).
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
DATA_SEED = 3  # not the default 0: the job must shuffle documents with data.seed
# Co-training sized tiny: sampling from the first step (no "lm" phase to compile), a buffer of one
# step (8 contexts x 8 positions = 64 vectors), the SAE initialised from it after step 1, then two
# SAE updates of 32 per step.
SAE_ARGS = ["--config.sae.saes=64:0.004:2023", "--config.sae.start_step=0", "--config.sae.buffer_steps=1",
            "--config.sae.positions_per_context=8", "--config.sae.batch_size=32",
            "--config.sae.min_ablation_gap=0"]  # a 4-step LM barely uses its MLP: report loss recovered anyway
SAE_FIRST_STEP = 2  # the first metrics row with SAE metrics: start_step + buffer_steps + 1
PREVIEW_SKIPPED = "sae: the feature preview runs in single-process jobs only"


def _args(mode, tiny_corpus, tiny_tokenizer_path, tmp_path, wd, steps):
  mode_args = ["--config.mode=lm"] if mode == "lm" else SAE_ARGS  # quickstart's default mode co-trains
  return ["--config=configs/quickstart.py", *mode_args, f"--workdir={wd}",
          f"--config.data.path={tiny_corpus}", f"--config.data.tokenizer={tiny_tokenizer_path}",
          f"--config.data.index_dir={tmp_path / 'idx'}", "--config.model.d_model=32", "--config.model.d_mlp=64",
          "--config.model.n_heads=2", "--config.model.d_head=16",
          f"--config.data.seq_len={SEQ_LEN}", f"--config.data.global_batch={GLOBAL_BATCH}",
          f"--config.data.seed={DATA_SEED}", "--config.data.shuffle_windows=0",
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


def _rows(wd):
  return [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]


def _train_rows(wd):
  return [r for r in _rows(wd) if "loss" in r]


def _batch_bytes(row):
  n = GLOBAL_BATCH * SEQ_LEN  # targets per global batch
  return row["loss"] * n / (math.log(2) * row["bits_per_byte"])


def _lines(out, pid):
  return [line[len(f"[p{pid}] "):] for line in out.splitlines() if line.startswith(f"[p{pid}] ")]


@pytest.fixture(scope="module")
def expected_bytes(tiny_corpus, tiny_tokenizer_path, tmp_path_factory):
  """Target bytes of the first 6 global batches as the job must build them, and as broken jobs
  would; rebuilt from the document order, not with pipeline.host_batches."""
  import grain
  from monojax.config import base_config
  from monojax.data import pipeline, tokenizer as tokenizer_lib
  cfg = base_config().data
  cfg.path, cfg.tokenizer, cfg.index_dir = tiny_corpus, tiny_tokenizer_path, str(tmp_path_factory.mktemp("idx"))
  tok = tokenizer_lib.TextTokenizer(tiny_tokenizer_path, max_chunk_chars=cfg.max_chunk_chars)
  nbytes = tok.token_byte_lengths(tokenizer_lib.padded_vocab_size(tok.vocab_size))
  src = pipeline.text_source(cfg, tiny_corpus, "train")
  order = grain.MapDataset.range(len(src)).shuffle(seed=DATA_SEED).repeat(None)  # global document order

  def windows(pid, count, n):
    """The first n windows of the stream of documents pid, pid + count, ... of `order`."""
    ids, total, j = [], 0, pid
    while total < n * (SEQ_LEN + 1):
      ids.append(tok.encode_documents([src[order[j]]]))  # one document + EOS
      total, j = total + ids[-1].size, j + count
    return np.concatenate(ids)[:n * (SEQ_LEN + 1)].reshape(n, SEQ_LEN + 1)

  def step_bytes(parts, steps=6):  # parts: each process's windows; a step takes the next host batch of each
    hb = GLOBAL_BATCH // len(parts)
    return [int(sum(nbytes[w[k * hb:(k + 1) * hb, 1:]].sum() for w in parts)) for k in range(steps)]

  host = GLOBAL_BATCH // PROCS
  mine = [windows(pid, PROCS, 6 * host) for pid in range(PROCS)]
  right = step_bytes(mine)
  everything = windows(0, 1, 6 * host)
  return {
      "right": right,
      "unsliced": step_bytes([everything, everything]),   # each process reads every document
      "p1_unsliced": step_bytes([mine[0], everything]),   # one process (here 1) reads every document
      "same_slice": step_bytes([mine[0], mine[0]]),       # both feed process 0's slice
      "restarted": right[:4] + right[:2],                 # iterators not restored on resume
  }


def _check_one_job(out, steps):
  # One job: each process sees its 4 local devices inside 8 global ones.
  for pid in range(PROCS):
    log = "\n".join(_lines(out, pid))
    assert (f"distributed: process {pid} of {PROCS}, {DEVICES} local / {PROCS * DEVICES} global devices"
            in log), log[-3000:]
    assert f"{PROCS} process(es), {PROCS * DEVICES} cpu device(s)" in log
  assert not any("step " in line and f"/{steps} |" in line for line in _lines(out, 1))  # only process 0 prints metrics
  assert any("step " in line and f"/{steps} |" in line for line in _lines(out, 0))


def _check_checkpoints(ckpt, steps):
  # One checkpoint directory (not one per process), an iterator state per process in each step.
  assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == steps
  for step in steps:
    data = sorted(f for f in os.listdir(ckpt / str(step) / "data") if f.endswith(".json"))
    assert data == [f"process_{i}-of-{PROCS}.json" for i in range(PROCS)], data
    assert (ckpt / str(step) / "state").is_dir()


def _check_batches(rows, exp, n):
  # Each step's global batch is process 0's slice + process 1's slice, both from their own iterators.
  seen = [_batch_bytes(r) for r in rows]
  for wrong in ("unsliced", "p1_unsliced", "same_slice") + (("restarted",) if n > 4 else ()):
    assert any(abs(a - b) > 1 for a, b in zip(exp[wrong][:n], exp["right"][:n])), (
        f"{wrong}: the check cannot tell it apart on this corpus")
  np.testing.assert_allclose(seen, exp["right"][:n], atol=0.05,
                             err_msg=f"bytes per batch {seen}; no host slicing would give {exp['unsliced'][:n]}, "
                                     f"process 1 not slicing {exp['p1_unsliced'][:n]}, both processes on process "
                                     f"0's slice {exp['same_slice'][:n]}, restarted iterators {exp['restarted'][:n]}")


def _run(mode, tiny_corpus, tiny_tokenizer_path, tmp_path, exp, steps, launches):
  """Runs (or resumes) the job in tmp_path/run up to `steps`, the `launches`-th launch in this
  workdir; checks what every run must hold."""
  wd = tmp_path / "run"
  rc, out = _launch(_args(mode, tiny_corpus, tiny_tokenizer_path, tmp_path, wd, steps))
  assert rc == 0, out[-4000:]
  _check_one_job(out, steps)
  _check_checkpoints(wd / "checkpoints", list(range(2, steps + 1, 2)))
  rows = _train_rows(wd)
  assert [r["step"] for r in rows] == list(range(1, steps + 1))  # each step once
  # Metrics written by process 0 only: one TensorBoard event file per launch. A writer in each
  # process need not show in metrics.jsonl (each writer's start rewrites the file by an atomic
  # replace, so the other's rows go to the replaced file); it leaves a second event file unless both
  # writers start within the same second (the file name is the start time and host).
  assert len([f for f in os.listdir(wd / "tb") if "tfevents" in f]) == launches, os.listdir(wd / "tb")
  _check_batches(rows, exp, steps)
  return out, wd


@pytest.mark.timeout(600)
def test_two_processes_form_one_lm_job(tiny_corpus, tiny_tokenizer_path, tmp_path, expected_bytes):
  # One run; resuming is checked in the co-trained job below (the same checkpoint and data code).
  _, wd = _run("lm", tiny_corpus, tiny_tokenizer_path, tmp_path, expected_bytes, steps=4, launches=1)
  rows = _rows(wd)
  assert not any(k.startswith("sae") for r in rows for k in r)
  assert [r["step"] for r in rows if "eval/loss" in r] == [4]


@pytest.mark.timeout(600)
def test_two_processes_cotrain_evaluate_and_resume(tiny_corpus, tiny_tokenizer_path, tmp_path, expected_bytes):
  out1, wd = _run("cotrain", tiny_corpus, tiny_tokenizer_path, tmp_path, expected_bytes, steps=4, launches=1)
  # Resume with more steps: both processes restore the step-4 checkpoint (LM, SAE, buffer) and their
  # own iterators (_check_batches: restarted iterators would feed steps 1-2's batches again).
  out2, _ = _run("cotrain", tiny_corpus, tiny_tokenizer_path, tmp_path, expected_bytes, steps=6, launches=2)
  for pid in range(PROCS):
    assert any(f"resumed from {wd / 'checkpoints'} at step 4" in line for line in _lines(out2, pid)), out2[-3000:]

  rows = _rows(wd)
  # SAE metrics from the first step after the SAE's init, once per step, finite.
  sae_rows = [r for r in rows if "sae0/mse" in r]
  assert [r["step"] for r in sae_rows] == list(range(SAE_FIRST_STEP, 7)), [r["step"] for r in sae_rows]
  for r in sae_rows:
    assert all(math.isfinite(r[f"sae0/{k}"]) for k in ("mse", "fvu", "l0")), r
    assert r["sae0/mse"] > 0, r
  # The SAE is evaluated at the end of each run (step 4, then 6 after the resume), one row each.
  evals = [r for r in rows if "sae0_eval/loss_recovered" in r]
  assert [r["step"] for r in evals] == [4, 6], [r["step"] for r in evals]
  for r in evals:
    assert math.isfinite(r["sae0_eval/loss_recovered"]) and math.isfinite(r["eval/loss"]), r
  for out in (out1, out2):
    assert "loss recovered" in "\n".join(_lines(out, 0)), out[-3000:]
    # The preview is skipped with its message in every process (each would need the global batch).
    for pid in range(PROCS):
      assert any(PREVIEW_SKIPPED in line for line in _lines(out, pid)), out[-3000:]
  assert not (wd / "preview.md").exists()


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


def _python_pid(launcher_pid, process_id, timeout=60):
  """The pid of process `process_id`'s python: a child of the launcher with monojax.main in its
  command line and MONOJAX_PROCESS_ID=<process_id> in its environment (not the launcher itself,
  whose SIGTERM trap would forward the signal to every process)."""
  import time

  import psutil
  t0 = time.time()
  while time.time() - t0 < timeout:
    for c in psutil.Process(launcher_pid).children():
      try:
        if "monojax.main" in c.cmdline() and c.environ().get("MONOJAX_PROCESS_ID") == str(process_id):
          return c.pid
      except psutil.Error:  # a child that just ended
        pass
    time.sleep(0.1)
  raise AssertionError(f"no python process with MONOJAX_PROCESS_ID={process_id} under pid {launcher_pid}")


@pytest.mark.timeout(600)
def test_sigterm_to_one_process_saves_the_same_step_in_all(tiny_corpus, tiny_tokenizer_path, tmp_path):
  # Slurm's --signal and TPU preemption notices may reach one host, or reach hosts a step apart; the
  # orbax save is collective, so every process must agree on the step to save at (train/loop.py
  # `_Preemption`). Only process 1's python gets SIGTERM here. The constant learning rate makes the
  # run's trajectory independent of train.steps, so runs of different lengths can be compared.
  import time
  common = ["--config.train.schedule=constant", "--config.train.ckpt_every=1000"]
  wd, ref = tmp_path / "run", tmp_path / "ref"
  args = _args("lm", tiny_corpus, tiny_tokenizer_path, tmp_path, wd, steps=1000) + common + [
      "--config.train.debug_step_delay_s=0.3"]
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  log_path = tmp_path / "preempted.log"
  with open(log_path, "w") as log:  # a file, not a pipe: nothing blocks on a full pipe while we wait
    p = subprocess.Popen(["bash", LAUNCH, "-n", str(PROCS), "-d", str(DEVICES), "--", *args], cwd=REPO, env=env,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

  def steps_done():
    try:
      return max((r["step"] for r in _train_rows(wd)), default=0)
    except (OSError, ValueError):  # not written yet, or a line being appended
      return 0

  try:
    t0 = time.time()
    while steps_done() < 3:
      assert p.poll() is None, f"the job ended early:\n{log_path.read_text()[-4000:]}"
      assert time.time() - t0 < 240, f"no step 3 in 240 s:\n{log_path.read_text()[-4000:]}"
      time.sleep(0.1)
    os.kill(_python_pid(p.pid, 1), signal.SIGTERM)
    try:
      p.wait(timeout=90)  # seconds, where the agreed save takes a few: a hang fails here
    except subprocess.TimeoutExpired:
      raise AssertionError(f"the job did not stop within 90 s of SIGTERM to process 1 (hung in the collective "
                           f"save?):\n{log_path.read_text()[-4000:]}") from None
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  out = log_path.read_text()
  assert p.returncode == 0, out[-4000:]  # launch/local.sh exits 0 only if every process does
  saved = sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < 1000, (saved, out[-4000:])
  n = saved[0]
  for pid in range(PROCS):
    said = [line for line in _lines(out, pid) if "preempted: checkpoint at step" in line]
    assert len(said) == 1 and f"preempted: checkpoint at step {n} saved" in said[0], (pid, said, out[-4000:])
  _check_checkpoints(wd / "checkpoints", [n])
  assert [r["step"] for r in _train_rows(wd)] == list(range(1, n + 1))

  # The resume to n + 2 steps equals an uninterrupted run of n + 2 steps, bit for bit.
  rc, out = _launch(_args("lm", tiny_corpus, tiny_tokenizer_path, tmp_path, wd, steps=n + 2) + common)
  assert rc == 0, out[-4000:]
  for pid in range(PROCS):
    assert any(f"resumed from {wd / 'checkpoints'} at step {n}" in line for line in _lines(out, pid)), out[-3000:]
  rc, out = _launch(_args("lm", tiny_corpus, tiny_tokenizer_path, tmp_path, ref, steps=n + 2) + common)
  assert rc == 0, out[-4000:]
  got, want = _train_rows(wd), _train_rows(ref)
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, n + 3))
  for g, w in zip(got, want):
    assert (g["loss"], g["grad_norm"]) == (w["loss"], w["grad_norm"]), (g, w)
