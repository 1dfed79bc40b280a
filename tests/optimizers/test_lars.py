"""LARS vs a NumPy transcription of You, Gitman, Ginsburg 2017 (docs/papers.md §1.2)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from optimizers.lamb import default_mask
from optimizers.lars import lars

L, D, F = 4, 8, 16
LR = 0.5


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "layers": {"norm": {"scale": 1.0 + 0.1 * n(L, D)},
                 "mlp": {"kernel": n(L, D, F) * jnp.array([0.1, 1.0, 5.0, 2.0])[:, None, None],
                         "bias": n(L, F)}},
      "head": {"kernel": n(D, 5), "bias": n(5)},
  }


def layer_axis_of(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 0 if path[0].key == "layers" else None, params)


def grads_seq(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
          for _ in range(steps)]


def run(opt, params, grads, jit=False):
  state = opt.init(params)
  step = jax.jit(opt.update) if jit else opt.update
  for g in grads:
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  return params


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def np_lars(params, grads, *, lr=LR, mu=0.9, tc=0.001, wd=5e-4, eps=0.0, nesterov=False,
            mask=None, axes=None):
  """NumPy LARS: local_lr = η_trust‖x‖/(‖g‖+λ‖x‖), m = μm + η·local_lr·(g+λx), x -= m."""
  x = flat(params)
  mask = flat(mask) if mask is not None else {k: True for k in x}
  axes = {k: None for k in x} if axes is None else dict(zip(x, jax.tree.leaves(
      jax.tree.map(lambda _, a: -1 if a is None else a, params, axes))))
  m = {k: np.zeros_like(v) for k, v in x.items()}
  for g in map(flat, grads):
    for k in x:
      if mask[k]:
        u = g[k] + wd * x[k]
        a = 0 if axes[k] in (None, -1) else axes[k]
        xs = [x[k]] if axes[k] in (None, -1) else np.moveaxis(x[k], a, 0)
        gs = [g[k]] if axes[k] in (None, -1) else np.moveaxis(g[k], a, 0)
        local = np.array([tc * np.linalg.norm(xi) / (np.linalg.norm(gi) + wd * np.linalg.norm(xi)
                                                     + eps) for xi, gi in zip(xs, gs)])
        if axes[k] not in (None, -1):
          local = np.moveaxis(local.reshape((-1,) + (1,) * (u.ndim - 1)), 0, a)
        u = local * u
      else:
        u = g[k]
      m[k] = mu * m[k] + lr * u
      x[k] = x[k] - (lr * u + mu * m[k] if nesterov else m[k])
  return x


def assert_tree_close(a_flat, b_tree, rtol=2e-5, atol=1e-7):
  b_flat = flat(b_tree)
  assert a_flat.keys() == b_flat.keys()
  for k in a_flat:
    np.testing.assert_allclose(b_flat[k], a_flat[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("nesterov,wd,eps", [(False, 5e-4, 0.0), (True, 0.05, 1e-3)])
def test_matches_numpy_reference(nesterov, wd, eps):
  params = make_params()
  grads = grads_seq(params, 3)
  axes = layer_axis_of(params)
  out = run(lars(LR, weight_decay=wd, eps=eps, nesterov=nesterov, layer_axis=axes), params, grads)
  ref = np_lars(params, grads, wd=wd, eps=eps, nesterov=nesterov, mask=default_mask(params),
                axes=axes)
  assert_tree_close(ref, out)
  # masked leaves (biases, norms) take plain momentum SGD: no decay, local_lr = 1
  plain = np_lars(params, grads, nesterov=nesterov, mask=jax.tree.map(lambda _: False, params))
  for k in ("['head']['bias']", "['layers']['norm']['scale']"):
    np.testing.assert_allclose(flat(out)[k], plain[k], rtol=2e-5, err_msg=k)


def test_optax_doctest_values():
  """optax.lars doctest (docs/papers.md §1.5): f stays 1.40E+01 for 5 steps at lr 0.003."""
  f = lambda w: jnp.sum(w ** 2)
  opt = lars(0.003, weight_decay=0.0)
  w = jnp.array([1.0, 2.0, 3.0])
  state = opt.init(w)
  for _ in range(5):
    u, state = opt.update(jax.grad(f)(w), state, w)
    w = optax.apply_updates(w, u)
    assert f"{f(w):.2E}" == "1.40E+01"
  assert float(f(w)) < 14.0


def test_against_optax_lars():
  """Same as optax.lars when λ = 0; with λ > 0 the paper's ‖g‖ + λ‖x‖ differs from ‖g + λx‖."""
  params = make_params()
  grads = grads_seq(params, 3)
  mask = default_mask(params)
  theirs = run(optax.lars(LR, weight_decay=0.0, trust_ratio_mask=mask), params, grads)
  assert_tree_close(flat(theirs), run(lars(LR, weight_decay=0.0), params, grads))
  theirs = run(optax.lars(LR, weight_decay=0.3, weight_decay_mask=mask, trust_ratio_mask=mask),
               params, grads)
  ours = run(lars(LR, weight_decay=0.3), params, grads)
  assert not np.allclose(flat(ours)["['head']['kernel']"], flat(theirs)["['head']['kernel']"],
                         rtol=1e-4)


def test_scanned_equals_unscanned():
  stacked = make_params()["layers"]
  unstacked = {f"layer_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(L)}
  g_stacked = grads_seq(stacked, 2)
  g_unstacked = [{f"layer_{i}": jax.tree.map(lambda x: x[i], g) for i in range(L)}
                 for g in g_stacked]
  p_stacked = run(lars(LR, layer_axis=jax.tree.map(lambda _: 0, stacked)), stacked, g_stacked)
  p_unstacked = run(lars(LR), unstacked, g_unstacked)
  restacked = jax.tree.map(lambda *xs: jnp.stack(xs), *p_unstacked.values())
  assert_tree_close(flat(restacked), p_stacked)


def test_sharded_and_injected_lr_match_single_device():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  params = make_params()
  axes = layer_axis_of(params)
  specs = jax.tree.map(lambda _: P(), params)
  specs["layers"]["mlp"]["kernel"] = P("data", None, "model")  # [layers, embed, mlp]
  specs["head"]["kernel"] = P("model", None)
  shard = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)
  grads = grads_seq(params, 2)
  expected = run(lars(LR, layer_axis=axes), params, grads)
  opt = optax.inject_hyperparams(lars)(learning_rate=0.0, layer_axis=axes)
  traces = []

  @jax.jit
  def step(params, state, g, lr):
    traces.append(1)
    state.hyperparams["learning_rate"] = lr
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state

  p, state = shard(params), opt.init(shard(params))
  for g in grads:
    p, state = step(p, state, shard(g), jnp.float32(LR))
  assert_tree_close(flat(expected), p, rtol=1e-6)
  # The first call sees init's uncommitted scalars and the second the step's committed ones,
  # so count traces once the state lives on the mesh: new lr values must not retrace.
  n = len(traces)
  for lr in (0.1, 0.01, 0.0):
    p, state = step(p, state, shard(grads[0]), jnp.float32(lr))
  assert len(traces) == n
