"""benchmarks/compare.py --quick --no_anchor runs end to end and its summary table is sound.

Timings are not judged (tiny shapes, unoptimised code, a shared machine), but the table must be
well formed: every row present; every monojax rate a positive finite number; a row whose anchor is
torch/SAELens/TransformerLens says "unavail" and prints no ratio and no result; a ratio is printed
only beside an anchor rate (the two monojax-internal anchors: "LM alone" and the co-trained step
the pipeline feeds) and is that rate ratio; the timed SAE of part 1 is alive (L0 > 0) and its floor
fraction is printed. A dead SAE (issue 19) is not timed: its row says "not measured: the SAE is dead
(L0 …, FVU …)" and carries no rate and no ratio.

--no_anchor keeps the run to the monojax side even where the anchors are installed (timing them
too is a benchmark, not a test: it multiplies the run time).
"""
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = ("1 SAE update", "2 LM step", "3 co-trained vs TL+SAELens", "3 co-trained ÷ LM alone",
        "4 frozen LM + SAE", "5 pipeline")
# Rows whose anchor column is another monojax measurement (always there): (row, time ratio?).
MONOJAX_ANCHORED = {"3 co-trained ÷ LM alone": True, "5 pipeline": False}
# A summary line: the name padded to 46 columns, then the columns of compare.print_summary.
LINE = re.compile(r"^(?P<name>.{46}) (?P<unit>\S+) +(?P<mj>\S+) +(?P<mj_dense>\S+) +(?P<anchor>\S+) +"
                  r"(?P<ratio>\S+) +(?P<r_dense>\S+) +(?P<target>-|[<>]= \S+) +(?P<result>\S+) +"
                  r"(?P<peak>\S+) +(?P<peak_dense>\S+)$")
# A row whose SAE was refused: name, unit, then the reason in place of every figure.
DEAD = re.compile(r"^(?P<name>.{46}) (?P<unit>\S+) +(?P<dead>not measured: the SAE is dead "
                  r"\(L0 (?P<l0>[\d.]+), FVU (?P<fvu>[\d.]+|nan)\b.*\))$")


def _rate(cell: str) -> float:
  """A rate cell ("12,345", "12.34M") as a number; anything else (nan, inf, "-") as nan."""
  m = re.fullmatch(r"(\d[\d,]*(?:\.\d+)?)(M?)", cell)
  if not m:
    return math.nan
  return float(m.group(1).replace(",", "")) * (1e6 if m.group(2) else 1.0)


def _ratio(cell: str, time_ratio: bool) -> float:
  m = re.fullmatch(r"(\d+\.\d+)" + ("" if time_ratio else "x"), cell)
  return float(m.group(1)) if m else math.nan


def _summary_rows(text: str) -> dict:
  lines = text.splitlines()
  head = next(i for i, line in enumerate(lines) if line.startswith("row ") and " ratio " in line)
  assert set(lines[head + 1]) == {"-"}, lines[head:head + 2]
  rows = {}
  for line in lines[head + 2:]:
    if not re.match(r"\d ", line):  # every row's name starts with its part's number; the table ends here
      break
    m = LINE.match(line) or DEAD.match(line)
    assert m, f"summary line not in the table's format: {line!r}"
    rows[m["name"].strip()] = m.groupdict()
  return rows


def _env():
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}  # one device, as a user runs it
  # monojax from this checkout: compare.py imports it (monojax.cpu_env) before putting the checkout
  # on sys.path, so without this it is whichever monojax is installed.
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  return env


@pytest.mark.timeout(420)
def test_compare_quick_summary_is_sound():
  out = subprocess.run([sys.executable, "benchmarks/compare.py", "--quick", "--no_anchor", "--pipeline_seconds=0.5"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text[-3000:]
  assert "anchors: off (--no_anchor)" in text, text[:3000]
  rows = _summary_rows(text)
  for prefix in ROWS:
    assert sum(name.startswith(prefix) for name in rows) == 1, (prefix, sorted(rows))
  assert len(rows) == len(ROWS), sorted(rows)

  assert "not measured" not in text, text[-3000:]   # --quick trains part 1's SAE until it is alive
  assert re.search(r"^CPU: .+; \d+ cores; ISA ", text, re.M), text[:2000]   # benchmarks/machine.py's line
  for name, r in rows.items():
    ctx = f"{name}: {r}"
    mj = _rate(r["mj"])
    assert mj > 0 and math.isfinite(mj), ctx  # no "nan", "0", "inf" or "-" for the monojax rate
    if r["mj_dense"] != "-":
      assert 0 < _rate(r["mj_dense"]) < math.inf, ctx
    for col in ("peak", "peak_dense"):
      if r[col] != "-":
        assert re.fullmatch(r"\d+\.\d%\*?", r[col]), ctx  # a number (tiny shapes may round to 0.0%), not nan
    mono = next((time_ratio for prefix, time_ratio in MONOJAX_ANCHORED.items() if name.startswith(prefix)), None)
    if mono is None:  # a torch anchor: not run, so no ratio and nothing judged
      assert (r["anchor"], r["ratio"], r["r_dense"], r["result"]) == ("unavail", "-", "-", "-"), ctx
      continue
    anchor = _rate(r["anchor"])
    assert 0 < anchor < math.inf, ctx
    for rate_col, ratio_col in (("mj", "ratio"), ("mj_dense", "r_dense")):
      if r[rate_col] == "-":
        assert r[ratio_col] == "-", ctx
        continue
      rate = _rate(r[rate_col])
      want = anchor / rate if mono else rate / anchor
      # the printed rates are rounded to integers, the ratio to 2-3 decimals
      assert _ratio(r[ratio_col], mono) == pytest.approx(want, rel=0.02, abs=0.006), ctx
    assert r["result"] == "(quick)", ctx  # --quick judges nothing

  # The timed SAE fires (a dead SAE's update is a degenerate benchmark): L0 mean/p99/max in the name.
  [sae_row] = [name for name in rows if name.startswith("1 SAE update")]
  l0 = re.search(r"\(L0 (\d+)/(\d+)/(\d+)\)", sae_row)
  assert l0 and int(l0.group(1)) > 0, sae_row
  # ... and its floor: the encoder GEMM alone over the measured step, a fraction in (0, 1]-ish.
  floor = re.search(r"^  " + re.escape(sae_row) + r": floor ([\d.]+) ms; fraction mj ([\d.]+), mj dense (\S+?),", text,
                    re.M)
  assert floor and float(floor.group(1)) > 0 and 0 < float(floor.group(2)) < 5, text[-3000:]
  assert "--quick: tiny shapes" in text and "nothing about timing is judged" in text


@pytest.mark.timeout(180)
def test_compare_refuses_a_dead_sae():
  """λ 10 at lr 0.01 kills part 1's SAE within its 100 --quick updates: the row says so, nothing is
  timed for it and no ratio is printed (issue 19: a dead SAE's sparse update flatters the ratio)."""
  out = subprocess.run([sys.executable, "benchmarks/compare.py", "--quick", "--no_anchor", "--parts=sae", "--l1=10",
                        "--sae_lr=0.01"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=170)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text[-3000:]
  rows = _summary_rows(text)
  [(name, r)] = rows.items()
  assert name.startswith("1 SAE update"), rows
  assert r.get("dead"), r  # the refusal line, not a row of figures
  assert float(r["l0"]) < 5, r
  assert "ms/update" not in text and "floor ÷ step" not in text, text[-3000:]  # nothing was timed
  assert not re.search(r"\d\.\d\dx", text), text[-3000:]                     # no ratio anywhere
  assert "SAE floor" not in text
  assert re.search(r"^part 1: width 256 batch 256: not measured: the SAE is dead \(L0 [\d.]+, FVU", text, re.M), text
