"""The package's import graph: every import points down the layer table below (none runs back up a
layer, so e.g. sae/ never imports train/), and there is no import cycle between modules, counting
imports inside functions too. Read from the source with `ast`; nothing is imported."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "monojax")

# Lowest first. A module may import its own unit and any unit of a LOWER layer; units on the same
# layer do not import each other. (docs/architecture.md draws the same picture.)
LAYERS = [
    ("errors", "files", "cpu_env", "assets", "text"),
    ("sharding", "distributed", "kernels"),
    ("data",),
    ("corpus", "models"),
    ("sae",),
    ("config", "config_rules"),
    ("checkpoint",),
    ("run",),
    ("interventions",),
    ("analysis",),
    ("inspector",),
    ("autointerp",),
    ("train",),
    ("export",),
    ("main", "analyze", "inspect", "generate"),
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
  return out


def _imports(path: str, module: str, known: set[str]) -> set[str]:
  """monojax modules imported anywhere in the file (`from monojax.x import y` counts monojax.x.y
  when that is a module)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        parts = module.split(".")
        base = ".".join(parts[:len(parts) - node.level + (1 if path.endswith("__init__.py") else 0)] + ([base] if base else []))
      subs = [f"{base}.{a.name}" for a in node.names]
      # `from pkg import sub` depends on the submodule; on the package only for names defined in it
      names = [n for n in subs if n in known] + ([base] if any(n not in known for n in subs) else [])
    else:
      continue
    out |= {n for n in names if n in known and n != module}
  return out


def _unit(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "monojax"


@pytest.fixture(scope="module")
def graph():
  mods = _modules()
  return {m: _imports(p, m, set(mods)) for m, p in mods.items()}


def test_every_unit_has_a_layer(graph):
  missing = sorted({_unit(m) for m in graph} - set(RANK) - {"monojax"})
  assert not missing, f"add these to LAYERS (and docs/architecture.md): {missing}"


def _upward(graph) -> list[str]:
  bad = []
  for m, deps in graph.items():
    if _unit(m) == "monojax":  # the package's own __init__
      continue
    for d in deps:
      if _unit(d) in (_unit(m), "monojax"):
        continue
      if RANK[_unit(d)] >= RANK[_unit(m)]:
        bad.append(f"{m} -> {d}")
  return sorted(bad)


def _cycle(graph) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        return stack[stack.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_imports_point_down(graph):
  bad = _upward(graph)
  assert not bad, "imports that do not point down the layers:\n" + "\n".join(bad)


def test_no_import_cycle(graph):
  cycle = _cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_a_cycle_and_an_upward_import():
  """The checks above would catch what they forbid: a two-module cycle (the old data/pipeline <->
  data/packed) and sae/ importing train/."""
  assert _cycle({"monojax.data.pipeline": {"monojax.data.packed"},
                 "monojax.data.packed": {"monojax.data.pipeline"}}) is not None
  assert _upward({"monojax.sae.core": {"monojax.train.step"}, "monojax.train.step": set()}) == [
      "monojax.sae.core -> monojax.train.step"]
  assert _upward({"monojax.data.pipeline": {"monojax.corpus.build_corpus"}}) == [
      "monojax.data.pipeline -> monojax.corpus.build_corpus"]
