"""The mixing buffer: every sampled vector is read exactly once, per data shard."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from monojax import sharding
from monojax.config import base_config
from monojax.sae import buffer as bf


def _mesh(shape):
  c = base_config().mesh
  c.shape = shape
  return sharding.make_mesh(c, jax.devices()[:int(np.prod(shape))])


def test_sample_positions_takes_distinct_positions_per_context():
  acts = jnp.arange(2 * 10 * 1, dtype=jnp.float32).reshape(2, 10, 1)
  out = np.asarray(bf.sample_positions(acts, 4, jax.random.key(0))).reshape(2, 4)
  assert len(set(out[0])) == 4 and set(out[0]) <= set(range(10))
  assert len(set(out[1])) == 4 and set(out[1]) <= set(range(10, 20))
  assert bf.sample_positions(acts, 10, jax.random.key(0)).shape == (20, 1)


def test_each_vector_is_read_exactly_once():
  for shape in [(1, 1), (4, 2)]:
    mesh = _mesh(shape)
    rows = NamedSharding(mesh, P("data", None))
    n, cap = 16, 64
    buf = bf.init(cap, 2, mesh)
    fill = jax.jit(lambda b, x: bf.fill(b, x, mesh))
    exchange = jax.jit(lambda b, x, k: bf.exchange(b, x, k, mesh))
    ids = iter(range(1, 10_000))
    batch = lambda: jax.device_put(jnp.asarray([[next(ids), 0.0] for _ in range(n)], jnp.float32), rows)  # noqa: E731
    written = []
    for _ in range(cap // n):
      x = batch()
      written += np.asarray(x)[:, 0].tolist()
      buf = fill(buf, x)
    read = []
    for s in range(40):
      x = batch()
      written += np.asarray(x)[:, 0].tolist()
      buf, out = exchange(buf, x, jax.random.key(s))
      assert out.sharding.spec == P("data", None)
      read += np.asarray(out)[:, 0].tolist()
    left = np.asarray(buf["acts"])[:, 0].tolist()
    assert len(read) == len(set(read))                     # nothing read twice
    assert sorted(read + left) == sorted(written)          # nothing lost
    assert 0.0 not in read                                 # never an unfilled row
    # mixing: a batch holds vectors written at many different steps
    assert len({int(v - 1) // n for v in read[-n:]}) > 2
