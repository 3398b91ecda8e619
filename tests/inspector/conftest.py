"""One tiny co-trained run with a feature database, shared by the inspector tests (the build, the
server, the browser). Its analysis split holds hostile text (tests/run_fixtures.py HOSTILE: HTML, script
tags, event handlers, quote breaks, `javascript:` links, template injection), which every page must
show as text."""
import os

import pytest

from run_fixtures import HOSTILE, copy_run

quiet = lambda *a, **k: None  # noqa: E731

@pytest.fixture(scope="session")
def hostile():
  return list(HOSTILE)


@pytest.fixture(scope="session")
def inspector_run(analysed_run_template, tmp_path_factory):
  """A finished run (2 SAEs, 64 and 96 features) with RUN/analysis written over its analysis split
  (a copy of the session's analysed tiny run, tests/conftest.py: the inspector's tests own this one)."""
  workdir = copy_run(analysed_run_template, str(tmp_path_factory.mktemp("irun") / "run"))
  assert os.path.isdir(os.path.join(workdir, "analysis"))
  return workdir


@pytest.fixture(scope="session")
def inspector_site(inspector_run):
  """RUN/inspector/ of the tiny run; returns its folder."""
  from monojax.inspector import site
  index = site.build(inspector_run, log=quiet)
  return os.path.dirname(index)


CHROMIUM = os.environ.get("MONOJAX_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser():
  """Headless Chromium (Debian's package, driven by pip playwright: no browser download). CI sets
  MONOJAX_REQUIRE_BROWSER=1, so a missing browser fails there instead of skipping."""
  required = os.environ.get("MONOJAX_REQUIRE_BROWSER") == "1"
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    if required:
      raise
    pytest.skip("playwright is not installed (pip install -e '.[test]')")
  if not os.path.exists(CHROMIUM):
    if required:
      raise FileNotFoundError(f"{CHROMIUM}: no Chromium (apt-get install chromium, or set MONOJAX_CHROMIUM)")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield b
    b.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
  """Where the browser tests save screenshots (MONOJAX_TEST_ARTIFACTS, else a temporary folder)."""
  path = os.environ.get("MONOJAX_TEST_ARTIFACTS") or str(tmp_path_factory.mktemp("artifacts"))
  os.makedirs(path, exist_ok=True)
  return path
