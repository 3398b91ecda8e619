"""The base config every `configs/*.py` file starts from; each field is documented here, once."""
from __future__ import annotations

from ml_collections import config_dict


def base_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "base"                  # run name, used in logs and as the default workdir runs/<name>
  c.seed = 0                       # model initialisation seed; models A and B of the paper are seeds 0 and 1

  d = c.data = config_dict.ConfigDict()
  d.path = "default"               # dir with Pile-style shards, or "default": the built-in corpus (built if absent)
  d.train_files = "train/*.jsonl.zst"  # glob under data.path (absolute paths and gs:// also work)
  d.val_files = "val/*.jsonl.zst"  # held-out split, same format (the Pile's val.jsonl.zst works too)
  d.format = "raw"                 # "raw": tokenize shards on the fly; "tfds": pre-packed array_record windows
  d.tokenizer = "gpt-neox-20b"     # vendored Pile tokenizer | "bpe:<vocab>" (trained on the corpus) | path
  d.seq_len = 256                  # context length; windows hold seq_len + 1 tokens (inputs and targets)
  d.global_batch = 32              # sequences per step over all hosts
  d.seed = 0                       # data order; independent of `seed` so A/B runs can share the data order
  d.on_error = "raise"             # bad records: "raise" (error naming file:line) or "skip" (counted, logged)
  d.num_threads = 2                # grain read threads
  d.prefetch = 64                  # grain read-ahead buffer (elements)
  d.workers = 0                    # grain mp_prefetch worker processes (0 = in process)
  d.tokenize_batch_docs = 64       # documents per tokenizer call (encode_batch parallelises within it)
  d.max_chunk_chars = 32_768       # long documents are tokenized in pieces of at most this many characters
  d.device_prefetch = 2            # global batches prepared ahead on a thread
  d.index_dir = "~/.cache/monojax/text_index"  # raw reader's document index cache (and BPE/token-count caches)
  d.tfds_dir = "~/.cache/monojax/tfds"         # where format="tfds" writes packed windows
  d.count_tokens = True            # print tokens per set at start (cached; estimated past 256 MB per file)

  m = c.mesh = config_dict.ConfigDict()
  m.shape = (-1, 1)                # (data, model); -1 takes the remaining devices
  m.axes = ("data", "model")

  c.preview_batches = 20           # batches pulled to measure pipeline throughput at start
  return c
