"""Fixtures of the autointerp tests: ONE tiny co-trained run with its feature database (a copy of the
session's analysed tiny run, tests/conftest.py analysed_run_template, whose analysis pass the inspector
and ablation tests share), read only by tests/autointerp/test_autointerp_pipeline.py; tests that write
RUN/autointerp take their own copy of it (`analysed_copy`), which is cheap (no second analysis pass).

The database holds 768 tokens (48 sequences of 16). 128 tokens would already give ≥ selection.MIN_EXAMPLES
activating examples to most features of sae0 and the neurons (this tiny run's features are dense), but
barely any "top token elsewhere" contexts and no random context where a feature is off (detection's
negatives); 768 gives both. Tests that need excluded features lower the bar (monkeypatch
selection.MIN_EXAMPLES)."""
import os

import pytest
from run_fixtures import copy_run

quiet = lambda *a, **k: None

POOL_SEQUENCES = 48            # every sequence: 48 random contexts, enough for detection negatives


@pytest.fixture(scope="session")
def analysed_run(analysed_run_template, tmp_path_factory):
  """A finished tiny run (sae0: 64 features, sae1: 96, neurons: 64) with RUN/analysis (the autointerp
  tests' copy of the session's analysed run); nobody writes into it (copy it with `analysed_copy` to
  run autointerp)."""
  workdir = copy_run(analysed_run_template, str(tmp_path_factory.mktemp("airun") / "run"))
  assert os.path.isdir(os.path.join(workdir, "analysis"))
  return workdir


@pytest.fixture(scope="session")
def opened_run(analysed_run):
  """The analysed run opened once (its jitted functions compile once for every test)."""
  from monojax.run import Run
  return Run.open(analysed_run, log=quiet)


@pytest.fixture(scope="session")
def feature_db(analysed_run):
  from monojax.analysis import database
  return database.open_database(analysed_run)


@pytest.fixture(scope="session")
def unit_sources(opened_run, feature_db):
  """{"sae0": UnitSource, "neurons": UnitSource} over a small pool."""
  from monojax.autointerp.sources import UnitSource
  return {u: UnitSource(opened_run, feature_db, u, pool_sequences=POOL_SEQUENCES, seed=0) for u in ("sae0", "neurons")}


@pytest.fixture(scope="session")
def tasks(unit_sources):
  """{unit: [Task]} for every feature of sae0 and of the neurons, seed 0."""
  from monojax.autointerp import selection
  return {u: selection.build_tasks(src, range(src.width), seed=0) for u, src in unit_sources.items()}


@pytest.fixture(scope="session")
def token_pieces(opened_run):
  """(pieces(ids) → [str], vocab [str]) of the run's tokenizer, as the pipeline renders tokens."""
  from monojax.inspector import live
  tb = live.token_bytes(opened_run.tokenizer)
  return tb.pieces, tb.vocab


@pytest.fixture
def analysed_copy(analysed_run, tmp_path):
  """A copy of the analysed run that this test owns (write RUN/autointerp into it)."""
  return copy_run(analysed_run, str(tmp_path / "run"))
