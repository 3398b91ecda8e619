"""The training loop as a user runs it (subprocesses of the main entry): resume after kill -9 is
bit-identical, SIGTERM saves and exits 0, NaN stops naming the step, a corrupt newest checkpoint
falls back to the previous one."""
import json
import os
import signal
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


O0_FLAG = "--xla_backend_optimization_level"


def _start(args, xla_default_opt=False, **kw):
  """The main entry in a subprocess. conftest compiles at LLVM -O0 for speed (inherited through
  XLA_FLAGS); xla_default_opt=True drops that flag, so XLA compiles as a user's run does."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  if xla_default_opt:
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(O0_FLAG))
    assert O0_FLAG not in env["XLA_FLAGS"]
  return subprocess.Popen([sys.executable, "-m", "monojax.main", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _run(args, timeout=180, **kw):
  p = _start(args, **kw)
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def _metrics(wd):
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  return {r["step"]: r for r in rows if "tokens_per_s" in r}  # training-step rows (not eval rows)


def _wait_for(pred, proc, timeout=120):
  t0 = time.time()
  while not pred():
    if proc.poll() is not None:
      raise AssertionError(f"process ended early:\n{proc.stdout.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.05)


def kill_9_after_checkpoint(args, wd, ckpt_step: int, **kw) -> None:
  """Runs the main entry slowly and SIGKILLs it one step after checkpoint `ckpt_step` is committed."""
  p = _start(args + [f"--workdir={wd}", "--config.train.debug_step_delay_s=0.4"], **kw)
  _wait_for(lambda: (wd / "checkpoints" / str(ckpt_step)).is_dir() and os.path.exists(wd / "metrics.jsonl")
            and max(_metrics(wd), default=0) >= ckpt_step + 1, p)
  p.send_signal(signal.SIGKILL)
  p.wait()


def test_resume_after_kill_9_is_bit_identical(base_args, tmp_path):
  """At XLA's default optimisation level (the other subprocess tests run at -O0 for speed): the
  level users run, where fusion and vectorisation could reorder float work between programs."""
  opt = dict(xla_default_opt=True)
  common = base_args + ["--config.train.steps=8", "--config.train.ckpt_every=4"]
  straight = tmp_path / "straight"
  rc, out = _run(common + [f"--workdir={straight}"], **opt)
  assert rc == 0, out[-3000:]
  ref = _metrics(straight)
  assert sorted(ref) == list(range(1, 9))
  assert (straight / "checkpoints" / "8").is_dir() and list((straight / "tb").iterdir())

  killed = tmp_path / "killed"
  kill_9_after_checkpoint(common, killed, 4, **opt)
  assert not (killed / "checkpoints" / "8").exists()

  rc, out = _run(common + [f"--workdir={killed}"], **opt)
  assert rc == 0, out[-3000:]
  assert "resumed from" in out and "at step 4" in out
  got = _metrics(killed)
  assert sorted(got) == list(range(1, 9))
  for s in range(1, 9):  # bit-identical: JSON floats round-trip exactly
    assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])
    assert got[s]["grad_norm"] == ref[s]["grad_norm"]

  rc, out = _run(common + [f"--workdir={killed}"], **opt)  # the same command again: nothing left to do
  assert rc == 0 and "at step 8" in out


def test_sigterm_saves_at_the_step_boundary_and_exits_0(base_args, tmp_path):
  wd = tmp_path / "pre"
  p = _start(base_args + [f"--workdir={wd}", "--config.train.steps=1000", "--config.train.ckpt_every=1000",
                          "--config.train.debug_step_delay_s=0.2"])
  _wait_for(lambda: os.path.exists(wd / "metrics.jsonl") and max(_metrics(wd), default=0) >= 3, p)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out[-3000:]
  assert "SIGTERM received" in out and "preempted" in out
  saved = [int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 1000
  rc, out = _run(base_args + [f"--workdir={wd}", f"--config.train.steps={saved[0] + 2}", "--config.train.ckpt_every=1000"])
  assert rc == 0 and f"at step {saved[0]}" in out, out[-3000:]


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(base_args, tmp_path):
  wd = tmp_path / "nan"
  rc, out = _run(base_args + [f"--workdir={wd}", "--config.train.steps=10", "--config.train.ckpt_every=3",
                              "--config.train.inject_nan_step=5"])
  assert rc == 3, out[-3000:]
  assert "non-finite training at step 5" in out and "Last good checkpoint: step 3" in out
  assert "Traceback" not in out
  assert sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()) == [3]
  assert max(_metrics(wd)) == 4


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(base_args, tmp_path):
  wd = tmp_path / "fb"
  rc, out = _run(base_args + [f"--workdir={wd}", "--config.train.steps=6", "--config.train.ckpt_every=3"])
  assert rc == 0, out[-3000:]
  state_dir = wd / "checkpoints" / "6" / "state"
  for root, _, files in os.walk(state_dir):  # corrupt every array file of the newest checkpoint
    for f in files:
      if "manifest" in f or f.startswith("d") or root.endswith("d"):
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(8)
  rc, out = _run(base_args + [f"--workdir={wd}", "--config.train.steps=7", "--config.train.ckpt_every=3"])
  assert rc == 0, out[-3000:]
  assert "step 6" in out and "cannot be read" in out and "falling back to step 3" in out
  assert "Traceback" not in out and "ERROR" not in out, out[-3000:]  # one line from us, no orbax dump
  assert sum("cannot be read" in line for line in out.splitlines()) == 1
  assert "resumed from" in out and "at step 3" in out


def _contents(root):
  import hashlib
  return {os.path.relpath(os.path.join(d, f), root): hashlib.sha1(open(os.path.join(d, f), "rb").read()).hexdigest()
          for d, _, files in os.walk(root) for f in files}


def test_resume_with_a_changed_config_is_refused_or_recorded(base_args, tmp_path):
  """A field that changes the state or the data (d_mlp, the data seed) is refused on resume: one
  line listing it, nothing moved or rewritten. Cadence and length may change: logged, recorded in
  config_changes.jsonl, and the run continues from its checkpoint."""
  wd = tmp_path / "run"
  rc, out = _run(base_args + [f"--workdir={wd}", "--config.train.steps=3", "--config.train.ckpt_every=3"])
  assert rc == 0, out[-3000:]
  before = _contents(wd)
  rc, out = _run(base_args + [f"--workdir={wd}", "--config.train.steps=3", "--config.model.d_mlp=32",
                              "--config.data.seed=5"])
  assert rc == 2 and "Traceback" not in out, out[-3000:]
  line = next(line for line in out.splitlines() if line.startswith("monojax: error:"))
  assert "data.seed 0 -> 5" in line and "model.d_mlp 64 -> 32" in line and "new --workdir" in line, line
  assert _contents(wd) == before and not (tmp_path / "run" / "checkpoints.unrestorable").exists()

  rc, out = _run(base_args + [f"--workdir={wd}", "--config.train.steps=5", "--config.train.log_every=2",
                              "--config.train.ckpt_every=5"])
  assert rc == 0, out[-3000:]
  assert "resumed from" in out and "at step 3" in out
  assert "resuming with changed settings: train.ckpt_every 3 -> 5; train.log_every 1 -> 2; train.steps 3 -> 5" in out
  [change] = [json.loads(line) for line in open(wd / "config_changes.jsonl")]
  assert change["changes"] == {"train.ckpt_every": [3, 5], "train.log_every": [1, 2], "train.steps": [3, 5]}
  assert json.loads((wd / "config.json").read_text())["train"]["steps"] == 5
