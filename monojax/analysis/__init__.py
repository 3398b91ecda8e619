"""Analysis of a finished run: the feature-analysis pass and its database (python -m monojax.analyze),
and pure functions over a run's weights and activations (logit effects, similarity between
features, neurons and SAEs, text proxies).

  import monojax.analysis
  db = monojax.analysis.open("runs/quickstart")     # RUN/analysis, written by the pass
  rec = db.feature(17, unit="sae0")                 # one feature's record, read memory-mapped
"""


def open(run_or_workdir):  # noqa: A001 — the package's one verb, as the issue names it
  """The feature database of a run (a Run, its workdir, or a database folder)."""
  from monojax.analysis import database
  return database.open_database(getattr(run_or_workdir, "workdir", run_or_workdir))
