"""benchmarks/compare.py --quick runs end to end (the harness, not its timings: nothing is judged)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(900)
def test_compare_quick_prints_every_row():
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}  # one device, as a user runs it
  out = subprocess.run([sys.executable, "benchmarks/compare.py", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=880)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text[-3000:]
  assert "summary" in text
  for row in ("1 SAE update", "2 LM step", "3 co-trained vs TL+SAELens", "3 co-trained ÷ LM alone",
              "4 frozen LM + SAE", "5 pipeline"):
    assert row in text, (row, text[-3000:])
