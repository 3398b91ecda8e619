"""What SAEs a run trains, as static, typed records: the spec list parsed from `sae.saes`, the
groups that are stacked and vmapped together, and one `SAE` record per autoencoder saying where it
lives in the state. Every consumer (the update, the evaluation, the run loader, the analysis verbs)
finds an SAE through its record, never by parsing state keys. The records are saved as JSON in
every checkpoint's metadata (monojax/checkpoint.py), so a run opened from disk knows its SAEs.

Groups. SAEs with equal (width, recipe) are stacked on a leading member axis S and updated by one
vmapped function on the same batch, so a λ sweep costs one batched update.
"""
from __future__ import annotations

import dataclasses

from monojax import errors
from monojax.sae import recipes


@dataclasses.dataclass(frozen=True)
class SAESpec:
  width: int
  l1: float
  recipe: str


@dataclasses.dataclass(frozen=True)
class Group:
  """SAEs sharing (width, recipe), stacked on a leading axis; hashable (a static jit argument)."""
  index: int
  width: int
  recipe: str
  members: tuple[int, ...]   # indices into the spec list, in stacking order
  l1s: tuple[float, ...]     # each member's λ

  @property
  def size(self) -> int:
    return len(self.members)

  def key(self, sae_cfg) -> str:
    """This group's key in state["groups"]. A name for the checkpoint's tree, never parsed back:
    the `SAE` records carry what it encodes (topk's k is in it, so a changed k cannot restore)."""
    key = f"g{self.index}_{self.recipe}_w{self.width}_s" + "_".join(map(str, self.members))
    k = recipes.get(self.recipe).k(sae_cfg)
    return key + (f"_k{k}" if k else "")


@dataclasses.dataclass(frozen=True)
class SAE:
  """One autoencoder of a run, and where the state holds it. Hashable: a static jit argument."""
  index: int      # position in sae.saes; metrics and files call it sae<index>
  width: int      # features (dictionary size)
  l1: float       # λ as configured (2024: before the warm-up factor)
  recipe: str     # a name in recipes.RECIPES
  group: str      # its group's key in state["groups"]
  member: int     # its row in that group's stacked arrays
  k: int          # active latents per token fixed by the recipe (topk), else 0
  layer: int      # the LM block whose MLP post-ReLU activations it reads (-1: none, e.g. toy data)
  d_in: int       # input width (the MLP width)
  scaled: bool    # trains on inputs scaled by the state's input_scale (Recipe.scales)

  @property
  def name(self) -> str:
    return f"sae{self.index}"

  @property
  def label(self) -> str:
    return f"{self.width} {self.recipe} l1={self.l1:g}"

  @property
  def rules(self) -> recipes.Recipe:
    return recipes.get(self.recipe)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> SAE:
    fields = {f.name for f in dataclasses.fields(cls)}
    if "scaled" not in d and "recipe" in d:  # records from before the field: the recipe's own rule
      d = dict(d, scaled=recipes.get(d["recipe"]).scales_input)
    if set(d) != fields:
      raise ValueError(f"an SAE record needs the fields {sorted(fields)}, got {sorted(d)}")
    return cls(**d)


def parse_specs(saes: str) -> list[SAESpec]:
  """"4096:0.004:2023,4096::2024,512:0:topk" -> [SAESpec, ...] (empty l1: the recipe default)."""
  specs = []
  for item in (part.strip() for part in str(saes).split(",")):
    if not item:
      continue
    fields = [f.strip() for f in item.split(":")]
    if len(fields) != 3:
      raise errors.ConfigError(f"sae.saes: {item!r} is not width:l1:recipe (e.g. 4096:0.004:2023)")
    width_s, l1_s, name = fields
    recipe = recipes.get(name)
    try:
      width = int(width_s)
      l1 = recipe.default_l1 if l1_s == "" else float(l1_s)
    except ValueError:
      raise errors.ConfigError(f"sae.saes: {item!r}: width must be an integer and l1 a number") from None
    if width <= 0 or l1 < 0:
      raise errors.ConfigError(f"sae.saes: {item!r}: width must be positive and l1 non-negative")
    if not recipe.uses_l1 and l1 != 0:
      raise errors.ConfigError(f"sae.saes: {item!r}: {name} has no l1 (its sparsity is set otherwise); write 0")
    specs.append(SAESpec(width, l1, name))
  if not specs:
    raise errors.ConfigError("sae.saes is empty: give at least one width:l1:recipe")
  return specs


def make_groups(specs) -> list[Group]:
  """Stacks specs with equal (width, recipe) into one group, in order of first appearance."""
  members: dict[tuple[int, str], list[int]] = {}
  for i, spec in enumerate(specs):
    members.setdefault((spec.width, spec.recipe), []).append(i)
  return [Group(gi, width, name, tuple(idx), tuple(float(specs[i].l1) for i in idx))
          for gi, ((width, name), idx) in enumerate(members.items())]


def groups_from_config(sae_cfg) -> list[Group]:
  return make_groups(parse_specs(sae_cfg.saes))


def build(sae_cfg, d_in: int, layer: int = -1) -> tuple[SAE, ...]:
  """The `SAE` records of sae_cfg.saes, in spec order (record i is sae<i>)."""
  specs = parse_specs(sae_cfg.saes)
  out = {}
  for g in make_groups(specs):
    for j, i in enumerate(g.members):
      rules = recipes.get(g.recipe)
      out[i] = SAE(index=i, width=specs[i].width, l1=float(specs[i].l1), recipe=specs[i].recipe, group=g.key(sae_cfg),
                   member=j, k=rules.k(sae_cfg), layer=int(layer), d_in=int(d_in), scaled=rules.scales(sae_cfg))
  return tuple(out[i] for i in range(len(specs)))


def to_json(saes) -> list[dict]:
  return [s.to_json() for s in saes]


def from_json(rows) -> tuple[SAE, ...]:
  saes = tuple(SAE.from_json(r) for r in rows)
  if [s.index for s in saes] != list(range(len(saes))):
    raise ValueError(f"SAE records out of order: indices {[s.index for s in saes]}")
  return saes
