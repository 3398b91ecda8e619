"""The training loop's host overhead per step: loop wall time minus the compiled step's own time
(a benchmark, not a test; issue 19 part 3: target <= 1 ms per step, no host sync on the hot path
but the one-step-late metric fetch).

  python benchmarks/loop_overhead.py [--modes=lm,cotrain] [--rounds=3] [--block=100] [--profile]

Runs the real loop (`job.setup` + `loop._steps`, what `loop.run` runs) on a tiny model (d_model
32, d_mlp 64, 2 heads of 16, ctx 16, batch 8; vocab 512 from a BPE trained on Python's own docs
unless --tokenizer says otherwise) reading the default corpus (~/.cache/monojax/corpus, when built;
else a tiny corpus of Python's docs written to a temporary folder, as the tests make one), LM only
and with two SAEs co-trained, at the paper config's cadence: log_every 10, ckpt_every = eval_every
5,000, so no save or eval falls among the timed steps. The run ends as a preemption would (a
SIGTERM flag set before the last step): that step saves, its time is shown amortized over
ckpt_every; no final eval.

The loop is left between blocks of --block steps (inside its own `next(train_iter)`: the time away
is counted nowhere) to time, in the same process, on the loop's own state and data stream:
  * the iterator alone: --block batches pulled back to back;
  * the step alone: the same jitted function the loop calls, on those batches, back to back,
    blocking on each call ("blocked") and only at the end ("pipelined": what a loop doing nothing
    else would take per step, the step's own time used for the overhead).
Blocks of loop steps alternate between "stream" (the real data iterator, its prefetch thread
beside the loop) and "cached" (the batches the iterator made for the step alone, from memory: the
loop without the data pipeline's CPU time), so load from other processes falls on all alike; the
figures are medians over blocks of per-step means. Not counted: the first block (compiles, the
SAE's initialisation), the first step after each pause, and steps with an SAE event.

Besides wall time, each figure is also given in this (main) thread's CPU time: the host work
itself, robust to other processes' load (wall figures on a loaded machine are not). Inside the
loop each part is timed by wrapping it: the iterator's `next`, dispatch of the jitted step, the
metrics' packing (evaluate.pack, when the loop has it), the one-step-late fetch (its wait for the
device, then device_get and floats), `ckpt.steps()`, the finiteness check, the reporter (metrics
row, TensorBoard, console line every log_every), the preemption check, `job.phase`, the SAE events;
"rest" is the loop body's own Python, freeing the previous state's arrays and the clocks.
Syncs: on this main thread, per timed step, the metric fetches (evaluate.flatten), `jax.device_get`
calls, arrays fetched through a jax Array's value (float(x), bool(x), .tolist(), __array__, ...)
and waits (`block_until_ready`, the jax function or an array's) are counted; the probe's own waits
are not. Not visible to these hooks: numpy reading a CPU array through the buffer protocol
(np.asarray(x)), which is how evaluate.Packed reads the one packed metrics vector inside the counted
metric fetch; and jax's transfer guard does not apply to CPU arrays, so it cannot be used here.

Works on the loop before and after LeafStep and evaluate.pack (the same figures for either).
--profile: one more block of loop steps (cached) under cProfile on this thread's CPU time.
"""
from __future__ import annotations

import gc
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from monojax import cpu_env  # noqa: E402 (imports nothing heavy)

if __name__ == "__main__":  # the allocator setting must be in place before jax starts, as in the other benchmarks
  cpu_env.reexec_with_malloc_tunables(sys.argv)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/machine.py

from absl import app, flags, logging  # noqa: E402

_MODES = flags.DEFINE_list("modes", ["lm", "cotrain"], "lm (LM only) and/or cotrain (two SAEs in the step)")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "timed rounds per mode (each: a block of loop steps on the data "
                               "stream and one on cached batches, each followed by the iterator and the step "
                               "alone); an untimed block comes first")
_BLOCK = flags.DEFINE_integer("block", 100, "steps per block")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "train.log_every (the base config's)")
_CKPT_EVERY = flags.DEFINE_integer("ckpt_every", 5000, "train.ckpt_every and eval_every (the paper config's); "
                                   "only the save of the last step runs, after the timed steps")
_TOKENIZER = flags.DEFINE_string("tokenizer", "pydoc512", "pydoc512 (a 512-token BPE trained on Python's docs, "
                                 "0.1 s) or any data.tokenizer value, e.g. bpe:8192 (cached for the default corpus)")
_CORPUS = flags.DEFINE_enum("corpus", "auto", ["auto", "default", "pydoc"],
                            "auto: the default corpus when it is built, else a tiny pydoc corpus")
_PROFILE = flags.DEFINE_bool("profile", False, "cProfile one extra block of loop steps per mode")
_TARGET_MS = 1.0
SYNCS = ("metric fetch", "jax.device_get", "Array value read", "block_until_ready")

PARTS = ("iterator", "dispatch", "metrics packed (dispatch)", "fetch: wait for device", "fetch: to host + floats",
         "ckpt.steps()",
         "finite check", "reporter", "preemption check", "job.phase", "_sae_events",
         "(Python GC, inside the parts above)")
def _median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _pydoc_texts():
  from pydoc_data.topics import topics
  return [topics[k] for k in sorted(topics) if len(topics[k]) > 200]


def _data_fields(tmp: str) -> dict:
  """data.path, data.tokenizer and data.index_dir: the default corpus (its cached index) when built,
  else a pydoc corpus written under tmp (as tests/conftest.py's tiny_corpus)."""
  from monojax.corpus import build_corpus
  from monojax.data import sources
  out = {}
  default_dir = os.path.expanduser(sources.DEFAULT_CORPUS_DIR)
  use_default = _CORPUS.value == "default" or (
      _CORPUS.value == "auto" and build_corpus.load_complete_manifest(default_dir) is not None)
  if use_default:
    out["path"], out["where"] = "default", default_dir
  else:
    from monojax.data import pile_io
    recs = [{"text": t, "meta": {"pile_set_name": "Docs: Python", "id": i}} for i, t in enumerate(_pydoc_texts())]
    root = os.path.join(tmp, "corpus")
    pile_io.write_shard(os.path.join(root, "train", "a.jsonl.zst"), [r for i, r in enumerate(recs) if i % 10])
    pile_io.write_shard(os.path.join(root, "val", "val.jsonl.zst"), recs[::10])
    out["path"], out["where"] = root, f"pydoc texts in {root}"
    out["index_dir"] = os.path.join(tmp, "idx")
  if _TOKENIZER.value == "pydoc512":
    from monojax.data import tokenizer
    path = os.path.join(tmp, "bpe512.json")
    if not os.path.exists(path):
      tokenizer.train_bpe(_pydoc_texts(), 512, path)
    out["tokenizer"] = path
  else:
    out["tokenizer"] = _TOKENIZER.value
  return out


def make_config(mode: str, steps: int, data: dict):
  from monojax.config import base_config
  c = base_config()
  c.name = f"loop_overhead_{mode}"
  c.mode = mode
  c.data.path, c.data.tokenizer = data["path"], data["tokenizer"]
  if "index_dir" in data:
    c.data.index_dir = data["index_dir"]
  c.data.seq_len, c.data.global_batch, c.data.count_tokens, c.preview_batches = 16, 8, False, 0
  c.model.d_model, c.model.d_mlp, c.model.n_heads, c.model.d_head = 32, 64, 2, 16
  c.train.steps, c.train.warmup_steps = steps, 10
  c.train.peak_flops = 1e12  # MFU is not what is measured here: no matmul timed at setup
  c.train.log_every = _LOG_EVERY.value
  c.train.ckpt_every = c.train.eval_every = _CKPT_EVERY.value
  c.train.eval_batches = 1
  c.sae.saes = "64:0.004:2023,96:0.004:2023"
  c.sae.start_step, c.sae.buffer_steps, c.sae.positions_per_context, c.sae.batch_size = 1, 1, 8, 32
  c.analysis.tokens = 0
  return c


class Probe:
  """Wraps the loop's parts with clocks (wall and this thread's CPU time), splits the loop into
  per-step intervals at each `next(train_iter)` and leaves the loop between blocks to time the
  iterator and the step alone (that time is counted nowhere).

  Blocks: 0 (compiles, SAE init: not counted), then alternately "stream" (the loop reads the real
  data iterator, whose prefetch thread runs beside it) and "cached" (the loop reads batches the
  iterator made earlier, from memory: the loop's own cost without the data pipeline's), then with
  --profile one cached block under cProfile."""

  def __init__(self, job, preempt, loop, evaluate, block: int, rounds: int, profile: bool):
    import jax
    self.jax, self.job, self.block, self.rounds, self.profile = jax, job, block, rounds, profile
    self.n_blocks = 1 + 2 * rounds + profile
    self.wall, self.cpu, self.proc = time.perf_counter, time.thread_time, time.process_time
    self.cur: dict = {}            # part -> [wall s, cpu s] in the current interval
    self.start = None              # (wall, cpu, process cpu) at the current interval's start
    self.n = 0                     # next() calls so far
    self.intervals = []            # per completed loop step: dict(wall, cpu, proc, parts, flags, counts, block)
    self.flags: set = set()
    self.counts = dict.fromkeys(SYNCS, 0)
    self.alone = []                # per pause: iterator and step alone
    self.source, self.cache = "stream", []
    self.prof_stats = None
    self.last_step = job.cfg.train.steps - 1  # the loop is stopped there (a preemption)
    self.preempt = preempt
    self._orig = {}
    self._install(job, preempt, loop, evaluate)

  # -- wrapping -------------------------------------------------------------------------------------
  def _add(self, part, w, c):
    acc = self.cur.setdefault(part, [0.0, 0.0])
    acc[0] += w
    acc[1] += c

  def _timed(self, part, fn):
    wall, cpu = self.wall, self.cpu

    def wrapped(*a, **k):
      w0, c0 = wall(), cpu()
      try:
        return fn(*a, **k)
      finally:
        self._add(part, wall() - w0, cpu() - c0)
    return wrapped

  def _install(self, job, preempt, loop, evaluate):
    jax = self.jax
    gc.callbacks.append(self._gc_callback)
    self._orig.update(block=jax.block_until_ready, device_get=jax.device_get, flatten=evaluate.flatten,
                      check=evaluate.check_finite, sae=loop._sae_events, save=job.ckpt.save, evaluate=job.evaluate)
    self.inner_iter = job.train_iter
    job.train_iter = _IterProxy(self)
    self.step_fns = dict(job.step_fns)
    job.step_fns = {ph: _TimedStep(self, fn) for ph, fn in job.step_fns.items()}
    self.leaf_state = None
    if hasattr(loop, "_StateLeaves"):  # the loop keeps the state's leaves between steps: find them
      probe, base = self, loop._StateLeaves

      class StateLeaves(base):
        def __init__(self, job):
          super().__init__(job)
          probe.leaf_state = self
      self._orig["state_leaves"] = base
      loop._StateLeaves = StateLeaves
    job.phase = self._timed("job.phase", job.phase)
    job.ckpt.steps = self._timed("ckpt.steps()", job.ckpt.steps)
    job.reporter.report = self._timed("reporter", job.reporter.report)
    job.reporter.restart = self._timed("reporter", job.reporter.restart)
    preempt.reached = self._timed("preemption check", preempt.reached)
    orig_block, orig_flatten, wall, cpu = self._orig["block"], self._orig["flatten"], self.wall, self.cpu

    def flatten(m):  # the one-step-late fetch, split into its wait for the device and the fetch itself
      self.counts["metric fetch"] += 1
      w0, c0 = wall(), cpu()
      self._quiet = True  # this wait is the probe's (the fetch below would wait the same)
      orig_block(m)
      self._quiet = False
      w1, c1 = wall(), cpu()
      out = orig_flatten(m)
      self._add("fetch: wait for device", w1 - w0, c1 - c0)
      self._add("fetch: to host + floats", wall() - w1, cpu() - c1)
      return out
    evaluate.flatten = flatten
    evaluate.check_finite = self._timed("finite check", evaluate.check_finite)
    if hasattr(evaluate, "pack"):  # the metrics concatenated on the device (one fetch, not one per metric)
      self._orig["pack"] = evaluate.pack
      evaluate.pack = self._timed("metrics packed (dispatch)", evaluate.pack)
    sae_events = self._timed("_sae_events", loop._sae_events)

    def sae_events_flagged(*a, **k):
      ran = sae_events(*a, **k)
      if ran:
        self.flags.add("sae event")
      return ran
    loop._sae_events = sae_events_flagged

    self._install_sync_counters()

    def flagged(flag, fn):
      def f(*a, **k):
        self.flags.add(flag)
        return fn(*a, **k)
      return f
    job.ckpt.save = flagged("save", job.ckpt.save)
    job.evaluate = flagged("eval", job.evaluate)
    self.loop, self.evaluate = loop, evaluate

  def _install_sync_counters(self):
    """Counts, on this thread, jax.device_get, jax.block_until_ready and Array.block_until_ready
    (once per outer call) and Array._value when it fetches (every implicit fetch goes through it)."""
    import threading

    from jax._src import array
    jax, impl, main = self.jax, array.ArrayImpl, threading.get_ident()
    self._quiet, self._orig["impl"] = False, (impl._value, impl.block_until_ready)

    def counted(name, fn):
      def f(*a, **k):
        if self._quiet or threading.get_ident() != main:
          return fn(*a, **k)
        self.counts[name] += 1
        self._quiet = True  # what it calls is not counted again
        try:
          return fn(*a, **k)
        finally:
          self._quiet = False
      return f
    jax.device_get = counted("jax.device_get", self._orig["device_get"])
    jax.block_until_ready = counted("block_until_ready", self._orig["block"])
    impl.block_until_ready = counted("block_until_ready", impl.block_until_ready)
    value = impl._value.fget

    def _value(arr):
      if getattr(arr, "_npy_value", None) is None and not self._quiet and threading.get_ident() == main:
        self.counts["Array value read"] += 1  # float(x), bool(x), x.tolist(), x.__array__(), ...
      return value(arr)
    impl._value = property(_value)

  def uninstall(self):
    jax = self.jax
    from jax._src import array
    array.ArrayImpl._value, array.ArrayImpl.block_until_ready = self._orig["impl"]
    jax.device_get, jax.block_until_ready = self._orig["device_get"], self._orig["block"]
    self.evaluate.flatten, self.evaluate.check_finite = self._orig["flatten"], self._orig["check"]
    if "pack" in self._orig:
      self.evaluate.pack = self._orig["pack"]
    self.loop._sae_events = self._orig["sae"]
    if "state_leaves" in self._orig:
      self.loop._StateLeaves = self._orig["state_leaves"]
    gc.callbacks.remove(self._gc_callback)
    self.job.train_iter = self.inner_iter

  def _gc_callback(self, phase, info):
    if phase == "start":
      self._gc0 = (self.wall(), self.cpu())
    elif getattr(self, "_gc0", None) is not None:
      self._add("(Python GC, inside the parts above)", self.wall() - self._gc0[0], self.cpu() - self._gc0[1])
      self._gc0 = None

  def instrumentation_cost(self) -> tuple[float, float]:
    """(wall, cpu) seconds one wrapped call adds, measured on a no-op."""
    f = self._timed("_calibration", lambda: None)
    n = 2000
    w0, c0 = self.wall(), self.cpu()
    for _ in range(n):
      f()
    w, c = (self.wall() - w0) / n, (self.cpu() - c0) / n
    self.cur.pop("_calibration", None)
    return w, c

  # -- the loop's intervals -------------------------------------------------------------------------
  def close_interval(self):
    w, c, p = self.wall(), self.cpu(), self.proc()
    if self.start is not None:
      self.intervals.append({"wall": w - self.start[0], "cpu": c - self.start[1], "proc": p - self.start[2],
                             "parts": self.cur, "flags": frozenset(self.flags), "counts": self.counts,
                             "block": (self.n - 1) // self.block, "source": self.source})
    self.cur, self.flags, self.counts = {}, set(), dict.fromkeys(SYNCS, 0)

  def next_batch(self):
    self.close_interval()
    self.n += 1
    if self.n - 1 == self.n_blocks * self.block:
      self.stop_profile()  # the profiled block (the last one) has ended
    if self.n > 1 and (self.n - 1) % self.block == 0 and (self.n - 1) // self.block < self.n_blocks:
      self._pause((self.n - 1) // self.block)   # block k - 1 has ended, block k starts
      self.flags.add("after a pause")  # the pipeline restarts empty: not counted
    if self.n == self.last_step:
      self.job.train_iter, self.source = self.inner_iter, "stream"  # the save takes the real iterator (grain checks)
      self.preempt.requested = True  # as a SIGTERM would: save this step, no final eval, return
    self.start = (self.wall(), self.cpu(), self.proc())
    w0, c0 = self.start[:2]
    if self.source == "cached":
      batch = self.cache[self.n % len(self.cache)]
    else:
      batch = next(self.inner_iter)
    self._add("iterator", self.wall() - w0, self.cpu() - c0)
    return batch

  def _pause(self, k: int):
    """Block k - 1 of loop steps has ended: the iterator and the step alone (probe.alone[k - 1]),
    then block k's source."""
    if self.profile and k == self.n_blocks - 1:  # the block starting now is profiled
      import cProfile
      self._measure_alone()
      self._prof = cProfile.Profile(time.thread_time_ns, 1e-9)  # this thread's CPU time: robust to load
      self._prof.enable()
      self.source = "cached"
      return
    self._measure_alone()
    self.source = "stream" if k % 2 == 0 else "cached"  # blocks 1, 3, ...: cached; 2, 4, ...: stream

  def stop_profile(self):
    if getattr(self, "_prof", None) is not None:
      self._prof.disable()
      import io
      import pstats
      s = io.StringIO()
      pstats.Stats(self._prof, stream=s).sort_stats("tottime").print_stats(20)
      self.prof_stats = s.getvalue()
      self._prof = None

  def _measure_alone(self):
    self._quiet = True  # nothing here is the loop's
    try:
      self._measure_alone_quiet()
    finally:
      self._quiet = False

  def _measure_alone_quiet(self):
    job, wall, cpu, proc = self.job, self.wall, self.cpu, self.proc
    block = self._orig["block"]
    ls = self.leaf_state
    if ls is not None:  # the loop's state is the list of leaves: step them with the loop's jitted function
      block(ls.leaves)
      fn = self.step_fns[job.phase(self.n - 1)].jitted(ls.treedef)
      state = ls.leaves
    else:
      block(job.state)
      fn = self.step_fns[job.phase(self.n - 1)]
      state = job.state
    # The iterator alone: a block's worth of batches back to back (they become the next cached block's).
    w0, p0 = wall(), proc()
    batches = [next(self.inner_iter) for _ in range(self.block)]
    block(batches)
    it_wall, it_proc = (wall() - w0) / self.block, (proc() - p0) / self.block
    self.cache = batches
    blocked = []
    for b in batches:
      w = wall()
      state, m = fn(state, b)
      block(m)
      blocked.append(wall() - w)
    w0, c0, p0 = wall(), cpu(), proc()
    for b in batches:
      state, m = fn(state, b)
    block((state, m))
    n = len(batches)
    self.alone.append({"iter": it_wall, "iter_proc": it_proc, "blocked": _median(blocked),
                       "pipelined": (wall() - w0) / n, "pipelined_cpu": (cpu() - c0) / n,
                       "pipelined_proc": (proc() - p0) / n})
    if ls is not None:
      ls.leaves = state
    else:
      job.state = state


class _TimedStep:
  """job.step_fns[phase] with its dispatch timed: a LeafStep (its `jitted` functions timed) or a
  jitted function on the state pytree (the loop before LeafStep)."""

  def __init__(self, probe, fn):
    self._probe, self._fn = probe, fn
    self._call = probe._timed("dispatch", fn)

  def jitted(self, treedef):
    return self._probe._timed("dispatch", self._fn.jitted(treedef))

  def __call__(self, *a, **k):
    return self._call(*a, **k)

  def __getattr__(self, name):
    return getattr(self._fn, name)


class _IterProxy:
  """The loop's train_iter: times `next`, forwards the rest."""

  def __init__(self, probe):
    self._probe = probe

  def __next__(self):
    return self._probe.next_batch()

  def __iter__(self):
    return self

  def __getattr__(self, name):
    return getattr(self._probe.inner_iter, name)


def run_mode(mode: str, data: dict, tmp: str) -> dict:
  import logging as py_logging

  from monojax.train import evaluate, loop
  from monojax.train import job as job_lib
  block, rounds, profile = _BLOCK.value, _ROUNDS.value, _PROFILE.value
  steps = block * (1 + 2 * rounds + profile) + 2  # the blocks, then 2 steps, the last one saving
  cfg = make_config(mode, steps + 1, data)  # the loop is stopped at `steps` by a preemption request: no final eval
  workdir = os.path.join(tmp, mode)
  os.makedirs(workdir, exist_ok=True)
  # The job's lines go where the main entry's go (a formatted logging handler), here into a file.
  logger = py_logging.getLogger(f"loop_overhead.{mode}")
  logger.propagate = False
  logger.setLevel(py_logging.INFO)
  handler = py_logging.FileHandler(os.path.join(workdir, "log.txt"))
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  logger.addHandler(handler)
  log = logger.info
  t0 = time.perf_counter()
  job = job_lib.setup(cfg, workdir, log)
  setup_s = time.perf_counter() - t0
  preempt = loop._Preemption(log)
  probe = Probe(job, preempt, loop, evaluate, block, rounds, profile)
  instr = probe.instrumentation_cost()
  try:
    last, step = loop._steps(job, preempt, log)
    probe.close_interval()
  finally:
    probe.stop_profile()
    probe.uninstall()
    preempt.restore()
    job.close()
    logger.removeHandler(handler)
    handler.close()
  if step != steps or not last:
    raise RuntimeError(f"{mode}: the loop stopped at step {step} of {steps}")
  if not probe.intervals[-1]["flags"] & {"save"}:
    raise RuntimeError(f"{mode}: the last step did not save")
  return {"probe": probe, "setup_s": setup_s, "final_s": probe.intervals[-1]["wall"], "cfg": cfg, "instr": instr}


def summarize(res: dict) -> dict:
  """Means per step over the counted steps of each block; per block, overhead = loop - the step
  alone measured just before and just after it (their mean), so both share the machine's load of
  the moment; medians (and the range) over the blocks of each source."""
  probe = res["probe"]
  excluded = {"sae event", "after a pause", "save", "eval"}
  out = {"sources": {}}
  last_block = probe.n_blocks - 1 if probe.profile else probe.n_blocks
  alone = probe.alone
  for source in ("stream", "cached"):
    rows = []
    for k in range(1, last_block):
      ivs = [iv for iv in probe.intervals if iv["block"] == k and iv["source"] == source]
      counted = [iv for iv in ivs if not iv["flags"] & excluded]
      if not counted or len(counted) < len(ivs) // 2:
        continue  # mostly events: not a steady-state block
      n = len(counted)
      mean = lambda f: sum(f(iv) for iv in counted) / n  # noqa: E731,B023
      parts = {p: [mean(lambda iv, p=p, i=i: iv["parts"].get(p, (0.0, 0.0))[i]) for i in (0, 1)] for p in PARTS}
      near = alone[k - 1:k + 1]  # the step alone just before block k and just after it
      step = {key: sum(a[key] for a in near) / len(near) for key in ("pipelined", "pipelined_cpu")}
      row = {"n": n, "wall": mean(lambda iv: iv["wall"]), "cpu": mean(lambda iv: iv["cpu"]),
             "proc": mean(lambda iv: iv["proc"]), "parts": parts,
             "counts": {c: max(iv["counts"][c] for iv in counted) for c in SYNCS}}
      row["over_wall"], row["over_cpu"] = row["wall"] - step["pipelined"], row["cpu"] - step["pipelined_cpu"]
      rows.append(row)
    if rows:
      med = lambda f: _median([f(r) for r in rows])  # noqa: E731,B023
      out["sources"][source] = {
          "n_steps": sum(r["n"] for r in rows), "wall": med(lambda r: r["wall"]), "cpu": med(lambda r: r["cpu"]),
          "proc": med(lambda r: r["proc"]),
          "over_wall": med(lambda r: r["over_wall"]), "over_cpu": med(lambda r: r["over_cpu"]),
          "over_wall_range": (min(r["over_wall"] for r in rows), max(r["over_wall"] for r in rows)),
          "over_cpu_range": (min(r["over_cpu"] for r in rows), max(r["over_cpu"] for r in rows)),
          "parts": {p: [med(lambda r, p=p, i=i: r["parts"][p][i]) for i in (0, 1)] for p in PARTS},
          "counts": {c: max(r["counts"][c] for r in rows) for c in SYNCS}}
  if alone and all(a["pipelined"] > 0 for a in alone):
    out["alone"] = {k: _median([a[k] for a in alone]) for k in alone[0]}
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import shutil
  import tempfile

  import jax
  from machine import cpu_line
  if _BLOCK.value < 10 or _ROUNDS.value < 1:
    raise app.UsageError("--block must be >= 10 and --rounds >= 1")
  load0 = os.getloadavg()
  tmp = tempfile.mkdtemp(prefix="monojax-loop-overhead-")
  try:
    data = _data_fields(tmp)
    dev = jax.devices()[0]
    print(f"CPU: {cpu_line()}")
    print(f"jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} ({dev.platform}); "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '') or '(unset)'}; load average {load0[0]:.2f}")
    print(f"tiny model: d_model 32, d_mlp 64, 1 layer, ctx 16, batch 8, tokenizer {_TOKENIZER.value}; data "
          f"{data['where']}; log_every {_LOG_EVERY.value}, ckpt_every = eval_every {_CKPT_EVERY.value}; per mode "
          f"{_ROUNDS.value} rounds of {_BLOCK.value} loop steps reading the data stream + {_BLOCK.value} reading "
          f"cached batches, after {_BLOCK.value} untimed")
    results = {}
    for mode in _MODES.value:
      res = run_mode(mode, data, tmp)
      res["summary"] = summarize(res)
      results[mode] = res
    load1 = os.getloadavg()
    _print(results, max(load0[0], load1[0]))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _print(results: dict, load: float) -> None:
  cols = [(m, src) for m in results for src in ("stream", "cached")
          if src in results[m]["summary"]["sources"] and "alone" in results[m]["summary"]]
  for m in results:
    s = results[m]["summary"]
    if not s["sources"] or "alone" not in s:
      print(f"\n{m}: no steady-state step was timed (every block held a compile, save, eval or SAE event, or no "
            "step alone was measured): no figures")
  if not cols:
    return
  w = 16
  head = f"{'ms per step (medians over blocks)':<46}" + "".join(f"{m + ', ' + src:>{w}}" for m, src in cols)
  print("\n" + head)
  print("-" * len(head))

  def row(label, f):
    print(f"{label:<46}" + "".join(f"{f(results[m]['summary'], src, results[m]):>{w}}" for m, src in cols))

  ms = lambda x: f"{x * 1e3:.3f}"  # noqa: E731
  src_ = lambda s, src: s["sources"][src]  # noqa: E731
  row("loop steps timed (no compile, save, eval, SAE event)", lambda s, src, r: f"{src_(s, src)['n_steps']}")
  row("loop, wall per step", lambda s, src, r: ms(src_(s, src)["wall"]))
  row("step alone, pipelined (block at the end), wall", lambda s, src, r: ms(s["alone"]["pipelined"]))
  row("step alone, blocked each call (median), wall", lambda s, src, r: ms(s["alone"]["blocked"]))
  row("iterator alone, per batch, wall", lambda s, src, r: ms(s["alone"]["iter"]))
  rng = lambda x, key: f"{ms(x[key][0])}..{ms(x[key][1])}"  # noqa: E731
  row("OVERHEAD wall = loop - step pipelined", lambda s, src, r: ms(src_(s, src)["over_wall"]))
  row("  range over blocks", lambda s, src, r: rng(src_(s, src), "over_wall_range"))
  row("main-thread CPU per step: loop", lambda s, src, r: ms(src_(s, src)["cpu"]))
  row("main-thread CPU per step: step alone", lambda s, src, r: ms(s["alone"]["pipelined_cpu"]))
  row("OVERHEAD main-thread CPU = loop - step", lambda s, src, r: ms(src_(s, src)["over_cpu"]))
  row("  range over blocks", lambda s, src, r: rng(src_(s, src), "over_cpu_range"))
  row("process CPU per step: loop", lambda s, src, r: ms(src_(s, src)["proc"]))
  row("process CPU per step: step alone", lambda s, src, r: ms(s["alone"]["pipelined_proc"]))
  row("process CPU per batch: iterator alone", lambda s, src, r: ms(s["alone"]["iter_proc"]))
  print("inside the loop, per step: wall / main-thread CPU")
  for p in PARTS:
    row(f"  {p}", lambda s, src, r, p=p: f"{ms(src_(s, src)['parts'][p][0])} /{ms(src_(s, src)['parts'][p][1])}")
  def rest(s, src, r):
    x = src_(s, src)
    parts = [x["parts"][p] for p in PARTS if not p.startswith("(")]
    return f"{ms(x['wall'] - sum(p[0] for p in parts))} /{ms(x['cpu'] - sum(p[1] for p in parts))}"
  row("  rest (loop body, freeing arrays, clocks)", rest)
  row("  (clocks: per wrapped call, wall / CPU)", lambda s, src, r: f"{ms(r['instr'][0])} /{ms(r['instr'][1])}")
  for k in SYNCS:
    row(f"syncs per step (max): {k}", lambda s, src, r, k=k: f"{src_(s, src)['counts'][k]}")
  print("-" * len(head))
  for m, r in results.items():
    k = r["cfg"].train.ckpt_every
    print(f"{m}: setup (data, init, compile) {r['setup_s']:.1f} s; the last step with its save (ended as a preemption: "
          f"no final eval) {r['final_s'] * 1e3:.0f} ms (~{r['final_s'] / k * 1e3:.3f} ms/step amortized over "
          f"ckpt_every {k})")
  noisy = load > 1.0

  def verdict(x, key):
    lo, hi = x[key + "_range"]
    if lo < 0:  # a block of loop steps faster than the step alone beside it: the load changed between them
      return f"inconclusive (blocks range {lo * 1e3:.3f}..{hi * 1e3:.3f} ms: below 0 is noise)"
    if hi <= _TARGET_MS / 1e3:
      return "meets"
    if lo > _TARGET_MS / 1e3:
      return "MISSES"
    return f"inconclusive (blocks range {lo * 1e3:.3f}..{hi * 1e3:.3f} ms)"

  for m, src in cols:
    x = src_(results[m]["summary"], src)
    print(f"verdict {m}, {src} (target {_TARGET_MS:g} ms/step): wall overhead {x['over_wall'] * 1e3:.3f} ms/step "
          f"{verdict(x, 'over_wall')}{' [noisy]' if noisy else ''}; main-thread CPU overhead "
          f"{x['over_cpu'] * 1e3:.3f} ms/step {verdict(x, 'over_cpu')}; syncs in each of {x['n_steps']} steps at most: "
          + ", ".join(f"{x['counts'][k]} {k}" for k in SYNCS))
  print(f"load average {load:.2f}" + ("  [noisy: other processes were using the CPU; wall figures are inflated, "
                                        "CPU-time figures much less]" if noisy else ""))
  for m, r in results.items():
    if r["probe"].prof_stats:
      print(f"\ncProfile of one block of loop steps ({m}, cached batches), by own main-thread CPU time:\n{r['probe'].prof_stats}")


if __name__ == "__main__":
  app.run(main)
