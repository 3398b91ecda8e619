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
