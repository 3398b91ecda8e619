"""Shared by the tests that run the main entry as a user does (test_loop, test_cotrain)."""
import pytest


@pytest.fixture
def base_args(tiny_corpus, tiny_tokenizer_path, tmp_path):
  return ["--config=configs/quickstart.py", "--config.mode=lm", f"--config.data.path={tiny_corpus}",
          f"--config.data.tokenizer={tiny_tokenizer_path}", f"--config.data.index_dir={tmp_path / 'idx'}",
          "--config.model.d_model=32", "--config.model.d_mlp=64", "--config.model.n_heads=2", "--config.model.d_head=16",
          "--config.data.seq_len=16", "--config.data.global_batch=4", "--config.preview_batches=0",
          "--config.data.count_tokens=False", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.eval_batches=2", "--config.train.warmup_steps=2",
          "--config.train.peak_flops=1e11"]  # a given peak (MFU only): no matmul timed at each job's start
