"""Helpers the tests share beside their fixtures (tests/conftest.py); test modules import them as
`from run_fixtures import ...` (tests/ is on sys.path under pytest's default import mode)."""
import shutil

# Corpus text that must reach every page, report and console as written and execute nothing.
HOSTILE = [
    "<script>window.__pwned=1</script>",
    "</script><script>window.__pwned=2</script>",
    "<img src=x onerror=\"window.__pwned=3\">",
    "\"><svg onload=window.__pwned=4>",
    "' onmouseover='window.__pwned=5' x='",
    "<a href=\"javascript:window.__pwned=6\">click</a>",
    "{{constructor.constructor('window.__pwned=7')()}}",
    "${window.__pwned=8}",
    "<iframe srcdoc=\"<script>parent.__pwned=9</script>\"></iframe>",
    "<style>body{display:none}</style>",
]


def copy_run(template: str, dest: str) -> str:
  """A copy of a finished run's workdir (its config still points at the shared corpus, read only)."""
  shutil.copytree(template, dest)
  return dest


def tiny_config(corpus: str, index_dir: str, **overrides):
  """The tiny co-training config the tests share: a 400-token BPE, seq_len 16, batch 8, d_model 32,
  d_mlp 64, 8 steps, two 2023 SAEs (64 and 96 features) from step 1, no evals, no analysis, a given
  peak FLOP/s (the measured one is the main entry's, tests/test_main.py).
  overrides: dotted fields, e.g. **{"train.steps": 6, "sae.saes": "64:0.004:2023"} or mode="lm"."""
  from monojax.config import base_config
  c = base_config()
  c.data.path, c.data.tokenizer, c.data.index_dir = corpus, "bpe:400", str(index_dir)
  c.data.seq_len, c.data.global_batch, c.data.count_tokens, c.preview_batches = 16, 8, False, 0
  c.model.d_model, c.model.d_mlp, c.model.n_heads, c.model.d_head = 32, 64, 2, 16
  c.train.steps, c.train.ckpt_every, c.train.eval_every, c.train.eval_batches = 8, 8, 0, 1
  c.train.log_every, c.train.warmup_steps, c.train.async_checkpoints = 4, 2, False
  c.train.peak_flops = 1e11  # a given peak (MFU only): no 2048² matmul timed at each job's start (~3 s on 2 cores)
  c.sae.saes = "64:0.004:2023,96:0.004:2023"
  c.sae.start_step, c.sae.buffer_steps, c.sae.positions_per_context, c.sae.batch_size = 1, 1, 8, 32
  c.analysis.tokens = 0
  for k, v in overrides.items():
    section, _, field = k.rpartition(".")
    setattr(c[section] if section else c, field, v)
  return c


# The analysis pass of the session's analysed tiny run (tests/conftest.py analysed_run_template): 6
# batches of 8 sequences of 16 tokens of its analysis split.
ANALYSIS_BATCH, ANALYSIS_TOKENS = 8, 8 * 16 * 6


def analysis_options(**overrides):
  """scan.Options of that pass (overrides: other fields, e.g. stop_after_batches=2)."""
  from monojax.analysis import scan
  return scan.Options(**{"tokens": ANALYSIS_TOKENS, "batch_size": ANALYSIS_BATCH, "flush_every": 2,
                         "save_every_s": 0.0, **overrides})


def train_in_process(cfg, workdir: str, log=lambda *a, **k: None):
  """Trains as loop.run does (job.setup + the step loop) without the end-of-run step; returns the job,
  whose state is the in-memory training state at the last (checkpointed) step."""
  from monojax.train import job as job_lib, loop
  job = job_lib.setup(cfg, str(workdir), log)
  preempt = loop._Preemption(log)
  try:
    loop._steps(job, preempt, log)
  finally:
    preempt.restore()
    job.close()
  return job
