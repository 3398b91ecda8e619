"""Bad invocations of the real entry point: each exits 2 with at most 3 lines on stderr that name
the field (or flag) and what was expected, no traceback, and leaves the workdir exactly as it was.
The same table, with what each prints, is in BUILD_NOTES.md ("Bad input")."""
import concurrent.futures
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = "--config=configs/quickstart.py"

# (arguments after the program name, text stderr must contain: the field or flag, and what was wrong)
CASES = [
    ([QS, "--config.train.stepz=5"], "--config.train.stepz: unknown field (did you mean 'steps'?)"),
    ([QS, "--config.trainz.steps=5"], "--config.trainz.steps: unknown field (did you mean 'train'?)"),
    ([QS, "--config.train.steps=abc"], "--config.train.steps: cannot use 'abc'"),
    ([QS, "--config.train.lr=fast"], "--config.train.lr: cannot use 'fast'"),
    ([QS, "--config.train.steps"], "--config.train.steps"),
    ([QS, "--config.mesh.shape=(2,"], "--config.mesh.shape: cannot use '(2,'"),
    (["--config=configs/nope.py"], "--config: cannot load the config file"),
    ([], "--config: a configs/*.py file is required"),
    ([QS, "--nosuchflag=1"], "--nosuchflag: unknown flag"),
    ([QS, "--config.mode=banana"], "mode: expected one of lm, cotrain, frozen, toy; got 'banana'"),
    ([QS, "--config.train.steps=-3"], "train.steps: expected a number ≥ 1; got -3"),
    ([QS, "--config.train.steps=0"], "train.steps: expected a number ≥ 1; got 0"),
    ([QS, "--config.train.dtype=float16"], "train.dtype: expected one of float32, bfloat16"),
    ([QS, "--config.train.ce_kernel=maybe"], "train.ce_kernel: expected one of auto, on, off"),
    ([QS, "--config.sae.sparse_update=yes"], "sae.sparse_update: expected one of auto, on, off"),
    ([QS, "--config.model.positional=alibi"], "model.positional: expected one of learned, rotary"),
    ([QS, "--config.train.schedule=step"], "train.schedule: expected one of cosine, linear, constant"),
    ([QS, "--config.data.format=parquet"], "data.format: expected one of raw, packed"),
    ([QS, "--config.data.on_error=ignore"], "data.on_error: expected one of raise, skip"),
    ([QS, "--config.sae.layer=3"], "sae.layer: expected < model.n_layers=1; got 3"),
    ([QS, "--config.train.loss_chunk=5"], "train.loss_chunk: expected 0 or a divisor of data.seq_len=128; got 5"),
    ([QS, "--config.train.lr=0"], "train.lr: expected a number > 0"),
    ([QS, "--config.train.b1=1.5"], "train.b1: expected a number in [0, 1)"),
    ([QS, "--config.data.global_batch=0"], "data.global_batch: expected a number ≥ 1"),
    ([QS, "--config.train.eval_batches=0"], "train.eval_batches: expected a number ≥ 1"),
    ([QS, "--config.sae.dense_density=2.0"], "sae.dense_density: expected a number in (0, 1]"),
    ([QS, "--config.sae.topk_k=0"], "sae.topk_k: expected a number ≥ 1"),
    ([QS, "--config.sae.batch_size=100"], "sae.batch_size: expected a divisor of data.global_batch x"),
    ([QS, "--config.sae.start_step=995"], "train.steps: expected > sae.start_step + sae.buffer_steps = 1003"),
    ([QS, "--config.sae.saes=4096:x:2023"], "sae.saes: '4096:x:2023': width must be an integer and l1 a number"),
    ([QS, "--config.sae.saes=4096:0.1:2025"], "sae.saes: unknown recipe '2025'"),
    ([QS, "--config.sae.saes=64:0.1:topk"], "sae.saes: '64:0.1:topk': topk has no l1"),
    ([QS, "--config.sae.resample_at=(0.5,2.0)"], "sae.resample_at: expected fractions of the SAE run in (0, 1)"),
    ([QS, "--config.mesh.shape=(-1,-1)"], "mesh.shape: expected one positive size (at most one -1)"),
    ([QS, "--config.mesh.shape=(3,3)"], "mesh.shape (3, 3) needs 9 devices, found 1"),
    ([QS, "--config.data.tokenizer=bpe:abc"], "data.tokenizer: expected 'bpe:<vocab size ≥ 300>'"),
    ([QS, "--config.data.tokenizer=/no/such/tokenizer.json"], "data.tokenizer: expected 'gpt-neox-20b'"),
    ([QS, "--config.data.path=/no/such/corpus"], "data.path: '/no/such/corpus' is not a directory"),
    ([QS, "--workdir=gs://bucket/run"], "--workdir: gs://bucket/run is an object-store URL"),
    ([QS, "--config.data.index_dir=gs://bucket/index"], "data.index_dir: gs://bucket/index is an object-store URL"),
    ([QS, "--config.lm_checkpoint=runs/quickstart"], "lm_checkpoint: only read in frozen mode"),
    (["--config=configs/sae.py"], "lm_checkpoint: frozen mode needs the workdir of a finished LM run"),
    (["--config=configs/sae.py", "--config.lm_checkpoint=/no/such/run"], "lm_checkpoint: workdir: /no/such/run is not"),
    ([QS, "--config.distributed.coordinator_address=127.0.0.1:1"], "also set distributed.num_processes"),
]


def _snapshot(root):
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for f in dirs + files:
      st = os.stat(os.path.join(dirpath, f))
      out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
  return out


def _run(args, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  has_workdir = any(a.startswith("--workdir") for a in args)
  cmd = [sys.executable, "-m", "monojax.main", "--nocpu_malloc_tunables", *args] + ([] if has_workdir else
                                                                                      [f"--workdir={workdir}"])
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Every case run once (two at a time), each against its own existing workdir."""
  base = tmp_path_factory.mktemp("bad")
  workdirs = []
  for i in range(len(CASES)):
    wd = base / f"run{i}"
    wd.mkdir()
    (wd / "notes.txt").write_text("a workdir the user already had\n")
    workdirs.append(wd)
  before = [_snapshot(wd) for wd in workdirs]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    procs = list(pool.map(lambda c: _run(c[0][0], c[1]), zip(CASES, workdirs)))
  return [(p, b, _snapshot(wd)) for p, b, wd in zip(procs, before, workdirs)]


def test_there_are_enough_cases():
  assert len(CASES) >= 30


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(a[1:] or a) for a, _ in CASES])
def test_bad_invocation_is_one_clear_line(results, i):
  (args, expected), (proc, before, after) = CASES[i], results[i]
  err = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, (args, proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr and len(err) <= 3, proc.stderr[-2000:]
  assert any(line.startswith("monojax: error: ") and expected in line for line in err), (expected, err)
  assert after == before  # the workdir is exactly as it was: nothing written, moved or deleted
