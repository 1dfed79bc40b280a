"""LAMB vs a NumPy transcription of You et al. 2020 Alg. 2 (docs/papers.md §1.1, §1.5)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from optimizers.lamb import default_mask, lamb

L, D, F, V = 3, 8, 16, 11
LR = 0.01


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "embed": {"embedding": n(V, D)},
      "layers": {"attn_norm": {"scale": 1.0 + 0.1 * n(L, D)},
                 # Very different scales per layer, so one norm per stack would be wrong.
                 "mlp": {"kernel": n(L, D, F) * jnp.array([0.1, 1.0, 5.0])[:, None, None],
                         "bias": n(L, F)}},
      "final_norm": {"scale": 1.0 + 0.1 * n(D), "bias": 0.1 * n(D)},
      "head": {"kernel": n(D, 5)},
  }


def layer_axis_of(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 0 if path[0].key == "layers" else None, params)


def grads_seq(params, steps, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32),
                       params) for _ in range(steps)]


def run(opt, params, grads, jit=False):
  """Apply opt for len(grads) steps; returns (final params, list of update trees).

  Eager by default: on these tiny arrays compiling costs more than it saves.
  """
  state = opt.init(params)
  step = jax.jit(opt.update) if jit else opt.update
  updates_seq = []
  for g in grads:
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    updates_seq.append(u)
  return params, updates_seq


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def slices(x, axis):
  """Views (not copies) of x per layer slice; the whole array if axis is None."""
  return [x] if axis is None else list(np.moveaxis(x, axis, 0))


def np_lamb(params, grads, *, lr=LR, b1=0.9, b2=0.999, eps=1e-6, wd=0.01, bias_correction=True,
            phi_clip=None, decay=None, adapt=None, axes=None):
  """NumPy LAMB, transcribed from docs/papers.md §1.1; returns the update of the last step."""
  x, keys = flat(params), list(flat(params))
  decay = flat(decay) if decay is not None else {k: True for k in keys}
  adapt = flat(adapt) if adapt is not None else decay
  axes = {k: None for k in keys} if axes is None else dict(zip(keys, jax.tree.leaves(
      jax.tree.map(lambda _, a: -1 if a is None else a, params, axes))))
  m = {k: np.zeros_like(x[k]) for k in keys}
  v = {k: np.zeros_like(x[k]) for k in keys}
  for t, g in enumerate(map(flat, grads), start=1):
    upd = {}
    for k in keys:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      mh, vh = (m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)) if bias_correction else (m[k], v[k])
      u = mh / (np.sqrt(vh) + eps) + (wd * x[k] if decay[k] else 0.0)
      if adapt[k]:
        u = u.copy()
        ax = None if axes[k] == -1 else axes[k]
        for xs, us in zip(slices(x[k], ax), slices(u, ax)):  # us is a view into u
          xn, un = np.linalg.norm(xs), np.linalg.norm(us)
          phi = xn if phi_clip is None else min(max(xn, phi_clip[0]), phi_clip[1])
          us *= phi / un if xn > 0 and un > 0 else 1.0
      upd[k] = -lr * u
      x[k] = x[k] + upd[k]
  return upd


def assert_tree_close(a_flat, b_tree, rtol=2e-5, atol=1e-7):
  b_flat = flat(b_tree)
  assert a_flat.keys() == b_flat.keys()
  for k in a_flat:
    np.testing.assert_allclose(b_flat[k], a_flat[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("bias_correction,phi_clip", [(True, None), (False, None),
                                                      (True, (0.5, 3.0))])
def test_matches_numpy_reference(bias_correction, phi_clip):
  params = make_params()
  grads = grads_seq(params, 3)
  axes = layer_axis_of(params)
  opt = lamb(LR, bias_correction=bias_correction, phi_clip=phi_clip, layer_axis=axes)
  _, ups = run(opt, params, grads)
  mask = default_mask(params)
  ref = np_lamb(params, grads, bias_correction=bias_correction, phi_clip=phi_clip, decay=mask,
                axes=axes)
  assert_tree_close(ref, ups[-1])
  if phi_clip is not None:  # the clip must bind somewhere, or this case tests nothing new
    unclipped = np_lamb(params, grads, decay=mask, axes=axes)
    assert any(not np.allclose(ref[k], unclipped[k]) for k in ref)


def test_mask_tree_and_callable_agree_with_reference():
  params = make_params()
  grads = grads_seq(params, 2)
  mask = jax.tree.map(lambda _: True, params)
  mask["head"]["kernel"] = False
  mask["final_norm"] = {"scale": True, "bias": False}
  ref = np_lamb(params, grads, decay=mask)
  for m in (mask, lambda p: mask):
    _, ups = run(lamb(LR, mask=m), params, grads)
    assert_tree_close(ref, ups[-1])
  # a prefix tree broadcasts over its subtree
  _, ups = run(lamb(LR, mask={"embed": True, "layers": False, "final_norm": True,
                                       "head": False}), params, grads)
  prefix = jax.tree.map(lambda _: True, params)
  prefix["layers"] = jax.tree.map(lambda _: False, params["layers"])
  prefix["head"]["kernel"] = False
  assert_tree_close(np_lamb(params, grads, decay=prefix), ups[-1])


def test_default_mask_excludes_biases_and_norms():
  mask = default_mask(make_params())
  assert mask == {"embed": {"embedding": True},
                  "layers": {"attn_norm": {"scale": False}, "mlp": {"kernel": True, "bias": False}},
                  "final_norm": {"scale": False, "bias": False},
                  "head": {"kernel": True}}


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_update_norm_is_lr_times_param_norm(wd):
  """φ = id: ‖Δx_i‖ = η‖x_i‖ for each adapted slice, whatever the gradient (docs/papers.md §1.5)."""
  params = make_params()
  axes = layer_axis_of(params)
  _, ups = run(lamb(LR, weight_decay=wd, mask=True, layer_axis=axes), params,
               grads_seq(params, 1))
  for x, u, a in zip(jax.tree.leaves(params), jax.tree.leaves(ups[0]),
                     jax.tree.leaves(axes, is_leaf=lambda z: z is None)):
    for xs, us in zip(slices(np.asarray(x), a), slices(np.asarray(u), a)):
      np.testing.assert_allclose(np.linalg.norm(us), LR * np.linalg.norm(xs), rtol=1e-5)


def test_invariant_to_loss_scale():
  params = make_params()
  axes = layer_axis_of(params)
  opt = lamb(LR, eps=1e-12, layer_axis=axes)  # eps breaks exact invariance
  _, ups = run(opt, params, grads_seq(params, 3))
  _, ups_1000 = run(opt, params, grads_seq(params, 3, scale=1000.0))
  assert_tree_close(flat(ups[-1]), ups_1000[-1], rtol=1e-4)


def test_masked_leaves_get_plain_adam_step():
  params = make_params()
  grads = grads_seq(params, 3)
  _, ups = run(lamb(LR, weight_decay=0.5, layer_axis=layer_axis_of(params)), params,
               grads)
  g = [flat(t) for t in grads]
  got = flat(ups[-1])
  for k, keep in flat(default_mask(params)).items():
    if keep:
      continue
    m = sum(0.1 * 0.9 ** (3 - t) * g[t - 1][k] for t in (1, 2, 3))
    v = sum(0.001 * 0.999 ** (3 - t) * g[t - 1][k] ** 2 for t in (1, 2, 3))
    adam = -LR * (m / (1 - 0.9 ** 3)) / (np.sqrt(v / (1 - 0.999 ** 3)) + 1e-6)
    np.testing.assert_allclose(got[k], adam, rtol=2e-5, atol=1e-8, err_msg=k)


def test_against_optax_lamb():
  params = make_params()
  grads = grads_seq(params, 3)
  decay_mask = default_mask(params)
  _, theirs = run(optax.lamb(LR, weight_decay=0.01, mask=decay_mask), params, grads)
  _, same = run(lamb(LR, adaptation_mask=True), params, grads)
  assert_tree_close(flat(theirs[-1]), same[-1])
  _, ours = run(lamb(LR), params, grads)
  # optax adapts the LayerNorm scale and biases too; the paper's code does not.
  for k in ("['final_norm']['scale']", "['layers']['mlp']['bias']"):
    assert not np.allclose(flat(ours[-1])[k], flat(theirs[-1])[k], rtol=1e-3)
  np.testing.assert_allclose(flat(ours[-1])["['head']['kernel']"],
                             flat(theirs[-1])["['head']['kernel']"], rtol=2e-5)


def test_scanned_equals_unscanned():
  stacked = make_params()["layers"]
  unstacked = {f"layer_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(L)}
  g_stacked = grads_seq(stacked, 3)
  g_unstacked = [{f"layer_{i}": jax.tree.map(lambda x: x[i], g) for i in range(L)}
                 for g in g_stacked]
  opt = lamb(LR, layer_axis=jax.tree.map(lambda _: 0, stacked))
  p_stacked, _ = run(opt, stacked, g_stacked)
  p_unstacked, _ = run(lamb(LR), unstacked, g_unstacked)
  restacked = jax.tree.map(lambda *xs: jnp.stack(xs), *p_unstacked.values())
  assert_tree_close(flat(restacked), p_stacked)
  # without layer_axis the stack shares one ratio, which must differ
  p_whole, _ = run(lamb(LR), stacked, g_stacked)
  assert not np.allclose(p_whole["mlp"]["kernel"], p_stacked["mlp"]["kernel"], rtol=1e-4)


def test_layer_axis_other_than_zero():
  params = {"kernel": make_params()["layers"]["mlp"]["kernel"]}  # [L, D, F]
  moved = {"kernel": jnp.moveaxis(params["kernel"], 0, 2)}  # [D, F, L]
  grads = grads_seq(params, 2)
  g_moved = [{"kernel": jnp.moveaxis(g["kernel"], 0, 2)} for g in grads]
  p0, _ = run(lamb(LR, layer_axis={"kernel": 0}), params, grads)
  p2, _ = run(lamb(LR, layer_axis={"kernel": 2}), moved, g_moved)
  np.testing.assert_allclose(jnp.moveaxis(p2["kernel"], 2, 0), p0["kernel"], rtol=1e-6)


def test_sharded_matches_single_device():
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  params = make_params()
  axes = layer_axis_of(params)
  specs = jax.tree.map(lambda _: P(), params)
  specs["head"]["kernel"] = P("data", None)
  specs["embed"]["embedding"] = P(None, "data")
  specs["layers"]["mlp"]["kernel"] = P(None, "data", "model")  # [layers, embed, mlp]
  specs["layers"]["mlp"]["bias"] = P(None, "model")  # [layers, mlp]
  shard = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)
  grads = grads_seq(params, 3)
  opt = lamb(LR, layer_axis=axes)
  p_single, _ = run(opt, params, grads)
  p_sharded, _ = run(opt, shard(params), [shard(g) for g in grads], jit=True)
  assert p_sharded["layers"]["mlp"]["kernel"].sharding.spec == P(None, "data", "model")
  assert_tree_close(flat(p_single), p_sharded, rtol=1e-6)


def test_inject_hyperparams_runtime_lr_without_retrace():
  params = make_params()
  axes = layer_axis_of(params)
  opt = optax.inject_hyperparams(lamb, static_args=("mask",))(
      learning_rate=0.0, layer_axis=axes, mask=default_mask)
  traces = []

  @jax.jit
  def step(state, grads, lr):
    traces.append(1)
    state.hyperparams["learning_rate"] = lr
    return opt.update(grads, state, params)

  state = opt.init(params)
  for lr, g in zip([0.1, 0.01, 0.003], grads_seq(params, 3)):
    u, state = step(state, g, jnp.float32(lr))
    kernel, du = np.asarray(params["head"]["kernel"]), np.asarray(u["head"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(du), lr * np.linalg.norm(kernel), rtol=1e-5)
  assert len(traces) == 1


def test_optax_doctest_values():
  """optax.lamb doctest (docs/papers.md §1.5): f(w)=Σw², w0=[1,2,3], lr 0.003, no weight decay."""
  f = lambda w: jnp.sum(w ** 2)
  opt = lamb(0.003, weight_decay=0.0)
  w = jnp.array([1.0, 2.0, 3.0])
  state = opt.init(w)
  printed = []
  for _ in range(5):
    u, state = opt.update(jax.grad(f)(w), state, w)
    w = optax.apply_updates(w, u)
    printed.append(f"{f(w):.2E}")
  assert printed == ["1.39E+01", "1.38E+01", "1.38E+01", "1.37E+01", "1.36E+01"]


def test_zero_norm_param_takes_ratio_one():
  params = {"kernel": jnp.zeros((4, 3))}
  g = {"kernel": jnp.arange(12.0).reshape(4, 3) - 5.0}
  u, _ = lamb(LR).update(g, lamb(LR).init(params), params)
  # first bias-corrected Adam step is -lr * g / (|g| + eps)
  np.testing.assert_allclose(u["kernel"], -LR * g["kernel"] / (jnp.abs(g["kernel"]) + 1e-6),
                             rtol=2e-5)
