"""The base config every `configs/*.py` file starts from; each field is documented here, once."""
from __future__ import annotations

from ml_collections import config_dict

from monojax.sae.config import sae_config


def base_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "base"                  # run name, used in logs and as the default workdir runs/<name>
  c.mode = "cotrain"               # "lm" (LM only) | "cotrain" (LM + SAEs in one step) | "frozen" (SAEs on a
                                   # finished LM: see lm_checkpoint) | "toy" (configs/toy.py)
  c.lm_checkpoint = ""             # frozen mode: workdir of the finished LM run (config.json + checkpoints/)
  c.seed = 0                       # model initialisation seed; models A and B of the paper are seeds 0 and 1

  d = c.data = config_dict.ConfigDict()
  d.path = "default"               # dir with Pile-style shards, or "default": the built-in corpus (built if absent)
  d.train_files = "train/*.jsonl.zst"  # glob under data.path (absolute paths and gs:// also work)
  d.val_files = "val/*.jsonl.zst"  # held-out split, same format (the Pile's val.jsonl.zst works too)
  d.analysis_files = "analysis/*.jsonl.zst"  # documents never trained or evaluated on, read by the feature-
                                   # analysis pass (python -m monojax.analyze); for the Pile, its test shards
  d.format = "raw"                 # "raw": tokenize shards on the fly; "packed": windows packed once, read by batch
  d.tokenizer = "gpt-neox-20b"     # vendored Pile tokenizer | "bpe:<vocab>" (trained on the corpus) | path
  d.seq_len = 256                  # context length; windows hold seq_len + 1 tokens (inputs and targets)
  d.global_batch = 32              # sequences per step over all hosts
  d.seed = 0                       # data order; independent of `seed` so A/B runs can share the data order
  d.shuffle_windows = 4096         # raw format: packed windows shuffled in blocks of this many (0 = off)
  d.on_error = "raise"             # bad records: "raise" (error naming file:line) or "skip" (counted, logged)
  d.max_line_bytes = 64 << 20      # a record (line) longer than this is a bad record (see on_error); bounds reader memory
  d.num_threads = 2                # grain read threads
  d.prefetch = 4                   # grain read-ahead (elements: raw = groups of tokenize_batch_docs documents)
  d.workers = 0                    # grain mp_prefetch worker processes (0 = in process)
  d.tokenize_batch_docs = 64       # documents per tokenizer call (encode_batch parallelises within it)
  d.max_chunk_chars = 32_768       # long documents are tokenized in pieces of at most this many characters
  d.device_prefetch = 2            # global batches prepared ahead on a thread
  d.index_dir = "~/.cache/monojax/text_index"  # raw reader's document index cache (and BPE/token-count caches)
  d.packed_dir = "~/.cache/monojax/packed"     # where format="packed" writes its windows
  d.count_tokens = True            # print tokens per set at start (cached)
  d.count_tokens_mb_per_file = 4   # tokenize this much of each file for the count; the rest is extrapolated ("~")
  d.bpe_train_mb = 32              # "bpe:<vocab>" trains on this many MB of documents spread over the train split

  md = c.model = config_dict.ConfigDict()  # the paper's one-layer model (unknowns: see BUILD_NOTES.md)
  md.d_model = 128                 # residual stream width
  md.d_mlp = 512                   # MLP hidden width (ReLU): the SAE's input dimension
  md.n_layers = 1                  # transformer blocks (attention + MLP each)
  md.n_heads = 4                   # attention heads (not stated by the paper)
  md.d_head = 32                   # per-head width; n_heads * d_head = d_model here
  md.positional = "learned"        # "learned" absolute positions or "rotary" (both TransformerLens-exact)
  md.tied_embeddings = False       # separate unembedding W_U (TransformerLens default)
  md.init_std = 0.02               # weight init std; residual-writing matrices use std / sqrt(2 n_layers)
  md.vocab_size = config_dict.FieldReference(None, field_type=int)  # set from the tokenizer (padded to 128)
  md.max_seq_len = c.data.get_ref("seq_len")    # learned position table length follows data.seq_len

  t = c.train = config_dict.ConfigDict()
  t.steps = 1000                   # optimizer steps in the run
  t.lr = 1e-3                      # peak learning rate
  t.warmup_steps = 100             # linear warm-up from 0
  t.schedule = "cosine"            # decay after warm-up: "cosine" | "linear" | "constant"
  t.final_lr_ratio = 0.1           # lr at the last step, as a fraction of train.lr
  t.weight_decay = 0.1             # AdamW decay on matrices only
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.grad_clip = 1.0                # global-norm clipping (0 = off)
  t.dtype = "float32"              # compute dtype: "float32" or "bfloat16" (fp32 master weights, fp32 loss)
  t.loss_chunk = 0                 # positions per unembedding/CE chunk (0 = whole sequence at once)
  t.ce_kernel = "auto"             # CPU cross-entropy kernel: auto (CPU, one device) | on | off
  t.log_every = 10                 # steps between metric lines (metrics.jsonl, TensorBoard, console)
  t.eval_every = 200               # steps between held-out evaluations (0 = only at the end)
  t.eval_batches = 8               # validation batches per evaluation (same batches every time)
  t.ckpt_every = 200               # steps between checkpoints (also saved at the end and on SIGTERM)
  t.keep_checkpoints = 3           # newest checkpoints kept
  t.async_checkpoints = True       # write checkpoints on a background thread
  t.inject_nan_step = -1           # test hook: make the loss NaN in the update producing this step (-1 = off)
  t.debug_step_delay_s = 0.0       # test hook: sleep after each step (lets tests kill a run mid-way)
  t.peak_flops = 0.0               # per-device peak FLOP/s for MFU (0 = measure a matmul / known table)

  dist = c.distributed = config_dict.ConfigDict()
  dist.coordinator_address = ""    # host:port of process 0; "" = single process unless TPU/Slurm env says otherwise
  dist.num_processes = 0           # 0 = from the environment
  dist.process_id = -1             # -1 = from the environment
  dist.local_device_ids = ""       # comma-separated, optional

  s = c.sae = sae_config()         # SAE recipes and sizes: fields documented in monojax/sae/config.py
  s.layer = 0                      # which block's MLP post-ReLU activations feed the SAEs
  s.start_step = 0                 # LM steps before activations are sampled (lets the LM warm up first)
  s.positions_per_context = 128    # positions sampled per context per step (paper: 250 of each context)
  s.buffer_steps = 8               # mixing-buffer capacity, in steps of sampled vectors (a batch mixes ~this many steps)
  s.init_inputs = 65_536           # buffered activations used for the geometric-median / input-scale init

  m = c.mesh = config_dict.ConfigDict()
  m.shape = (-1, 1)                # (data, model); -1 takes the remaining devices
  m.axes = ("data", "model")

  an = c.analysis = config_dict.ConfigDict()
  an.tokens = 1_000_000            # after a co-training run: tokens of the corpus's analysis split run through the
                                   # LM and SAEs (the feature database RUN/analysis, RUN/report.md, preview.md, as
                                   # python -m monojax.analyze writes them); 0 = only the quick preview of the val split
  an.autointerp = "offline"        # then autointerp of every live feature and neuron with the offline baseline (no
                                   # model; RUN/autointerp, the report and the inspector show it); "" = skip. A
                                   # language model: python -m monojax.autointerp --backend=anthropic|openai

  c.preview_batches = 20           # batches pulled to measure pipeline throughput at start (0 = skip)
  return c


# ------------------------------------------------------------------------- the run's config.json

CONFIG_VERSION = 2  # config.json layout; runs written before the field existed read as version 1
_READS_VERSIONS = (1, 2)
# Fields added after runs were written with this layout: what an older config.json means by their
# absence (the behaviour of the monojax that wrote it).
ADDED_FIELDS = {"sae.normalize_inputs": False, "sae.min_ablation_gap": 0.01, "sae.alarm_dead_frac": 0.9,
                "data.max_line_bytes": 64 << 20, "data.analysis_files": "analysis/*.jsonl.zst",
                "analysis.tokens": 0, "analysis.autointerp": "",
                "sae.screen_bf16": "auto"}
# What a resumed run may change: cadence, logging, performance switches and the machine it runs on.
# Every other field changes the state or the data stream: a resume with it changed is refused.
RESUMABLE = ("name", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
             "train.keep_checkpoints", "train.async_checkpoints", "train.debug_step_delay_s", "train.inject_nan_step",
             "train.peak_flops", "train.ce_kernel", "sae.sparse_update", "sae.screen_bf16", "preview_batches", "data.count_tokens",
             "data.count_tokens_mb_per_file", "data.num_threads", "data.prefetch", "data.workers",
             "data.device_prefetch", "data.analysis_files", "data.index_dir", "data.packed_dir", "distributed.", "mesh.",
             "sae.min_ablation_gap", "sae.alarm_dead_frac", "analysis.")
_DERIVED = ("config_version", "model.vocab_size")  # written by the job itself


def write_resolved(cfg, workdir: str) -> str:
  """Writes the resolved config (vocab size, a frozen run's model, the tokenizer as the run reads
  it) to workdir/config.json atomically; returns its path."""
  import os
  from monojax import files
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with cfg.unlocked():
    cfg.config_version = CONFIG_VERSION
  files.atomic_write(path, cfg.to_json_best_effort(indent=2, sort_keys=True))
  return path


def load_resolved(path: str) -> config_dict.ConfigDict:
  """A run's config.json as a ConfigDict with base_config()'s fields and types. A file that is not
  JSON, or whose fields differ from this monojax's (a run from another version), raises
  errors.RunFormatError naming the file and the first field that differs."""
  import json
  from monojax import errors
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise errors.MissingInputError(f"{path}: not found (is this a monojax workdir?)") from None
  except (OSError, ValueError) as e:
    raise errors.RunFormatError(f"{path}: not a readable JSON config ({e})") from None
  if not isinstance(saved, dict):
    raise errors.RunFormatError(f"{path}: expected a JSON object, got {type(saved).__name__}")
  version = saved.pop("config_version", 1)
  if version not in _READS_VERSIONS:
    raise errors.RunFormatError(f"{path}: config_version {version!r} was written by another monojax; this one reads "
                                f"versions {', '.join(map(str, _READS_VERSIONS))}")
  _rename_old_fields(saved)
  out = _merge(base_config(), saved, path, "")
  out.config_version = CONFIG_VERSION
  return out


def _rename_old_fields(saved: dict) -> None:
  """Runs written before the packed format stopped using TFDS (issue 19) name it data.format "tfds"
  and its directory data.tfds_dir: read them under today's names."""
  data = saved.get("data")
  if isinstance(data, dict):
    if "tfds_dir" in data and "packed_dir" not in data:
      data["packed_dir"] = data.pop("tfds_dir")
    if data.get("format") == "tfds":
      data["format"] = "packed"


def _merge(base, saved: dict, path: str, prefix: str) -> config_dict.ConfigDict:
  """A new ConfigDict of plain values (no FieldReference ties, e.g. model.max_seq_len -> data.seq_len:
  the run saved them separately) with `base`'s fields, filled from `saved`."""
  out = config_dict.ConfigDict()
  from monojax import errors
  for key in saved:
    if key not in base:
      raise errors.RunFormatError(f"{path}: field {prefix}{key} is unknown to this monojax (a run from another "
                                  "version?)")
  for key in base:
    name = f"{prefix}{key}"
    if key not in saved:
      if key == "config_version":
        continue
      if isinstance(base[key], config_dict.ConfigDict) and any(f.startswith(name + ".") for f in ADDED_FIELDS):
        out[key] = _merge(base[key], {}, path, name + ".")  # a section added since: its fields' defaults
        continue
      if name in ADDED_FIELDS:
        out[key] = ADDED_FIELDS[name]
        continue
      raise errors.RunFormatError(f"{path}: field {name} is missing (written by an older monojax?)")
    want, got = base[key], saved[key]
    if isinstance(want, config_dict.ConfigDict):
      if not isinstance(got, dict):
        raise errors.RunFormatError(f"{path}: field {name} should be a section, got {got!r}")
      out[key] = _merge(want, got, path, name + ".")
      continue
    value = _coerce(want, got)
    if value is _BAD:
      raise errors.RunFormatError(f"{path}: field {name} = {got!r} is not a {type(want).__name__}")
    out[key] = value
  return out


_BAD = object()


def _coerce(want, got):
  if want is None or got is None:
    return got
  if isinstance(want, bool):
    return got if isinstance(got, bool) else _BAD
  if isinstance(want, (int, float)) and not isinstance(want, bool):
    if isinstance(got, bool) or not isinstance(got, (int, float)):
      return _BAD
    return float(got) if isinstance(want, float) else (int(got) if float(got).is_integer() else _BAD)
  if isinstance(want, tuple):
    return tuple(got) if isinstance(got, (list, tuple)) else _BAD
  return got if isinstance(got, type(want)) else _BAD


def flat(cfg, prefix: str = "") -> dict:
  """{"train.steps": 1000, ...}: every leaf of a config (tuples as lists, as JSON has them)."""
  out = {}
  for key in cfg:
    value = cfg[key]
    if isinstance(value, config_dict.ConfigDict):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def resume_changes(saved, new) -> tuple[dict, dict]:
  """(refused, allowed): {field: (saved value, new value)} of the fields that differ between a
  workdir's config and the one a resume would run with, split by RESUMABLE."""
  a, b = flat(saved), flat(new)
  refused, allowed = {}, {}
  for field in sorted(set(a) | set(b)):
    if field in _DERIVED or a.get(field) == b.get(field):
      continue
    ok = any(field == r or (r.endswith(".") and field.startswith(r)) for r in RESUMABLE)
    (allowed if ok else refused)[field] = (a.get(field), b.get(field))
  return refused, allowed
