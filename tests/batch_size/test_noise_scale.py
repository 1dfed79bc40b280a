"""Tests for batch_size/noise_scale.py (McCandlish et al. 2018, App. A).

Analytic values on least squares: see tests/batch_size/least_squares.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from batch_size import noise_scale as noise_lib
from tests.batch_size import least_squares as ls


def test_two_batch_estimator_exact_on_noise_free_expectations():
  # Plugging E|G_B|^2 = |G|^2 + tr/B into the estimator must return |G|^2 and tr exactly.
  sq_g, tr = 2.5, 700.0
  g2, t = noise_lib.two_batch_estimates(sq_g + tr / 16, sq_g + tr / 128, 16, 128)
  np.testing.assert_allclose([g2, t], [sq_g, tr], rtol=1e-5)


def test_noise_scale_matches_analytic_on_least_squares():
  b_small, n_draws = 32, 200
  params = ls.flat_to_params(ls.delta())
  sq_g, trace = ls.analytic(ls.delta())
  b_simple_true = trace / sq_g  # = 33

  b_big = b_small * ls.N_DEVICES

  def norms(x, y):
    g_N = ls.per_example_grads(params, (x, y))
    g_S = jax.tree.map(lambda g: g.reshape((ls.N_DEVICES, b_small) + g.shape[1:]).mean(1), g_N)
    return noise_lib.two_batch_sq_norms(g_S)

  def step(state, m):
    state, b = noise_lib.noise_scale_update(state, m[0], m[1], b_small, b_big, decay=0.99)
    return state, b

  @jax.jit
  def run(x, y):
    small, big = jax.vmap(norms)(x, y)
    state, b_simple = jax.lax.scan(step, noise_lib.noise_scale_init(), (small, big))
    return (noise_lib.two_batch_estimates(small, big, b_small, b_big), state, b_simple,
            noise_lib.noise_scale_estimates(state),
            noise_lib.two_batch_estimates(small, big, b_big, b_small))

  (g2, tr), state, b_simple, (g2_ema, tr_ema), (g2_swapped, _) = run(*ls.draw(0, n_draws, b_big))
  # Each part is unbiased: means within 4 standard errors of the analytic values.
  for est, true in ((g2, sq_g), (tr, trace)):
    se = np.std(est) / np.sqrt(n_draws)
    assert abs(np.mean(est) - true) < 4 * se, (np.mean(est), true, se)
  assert int(state.count) == n_draws
  np.testing.assert_allclose(b_simple[-1], b_simple_true, rtol=0.10)
  # Bias-corrected parts, too.
  np.testing.assert_allclose(g2_ema, sq_g, rtol=0.15)
  np.testing.assert_allclose(tr_ema, trace, rtol=0.10)
  # Swapping the batch sizes would be a classic bug: it must not give the same answer.
  assert abs(np.mean(g2_swapped) - sq_g) > 0.5


def test_noise_scale_sharded_equals_single_device():
  mesh = ls.mesh()
  b_small = 16
  params = ls.flat_to_params(ls.delta())
  x, y = ls.draw(1, b_small * ls.N_DEVICES)

  def local(x, y, with_global):
    # Differentiate w.r.t. a device-varying copy: the gradient w.r.t. replicated params would
    # already be summed over devices (shard_map's varying-axis typing transposes to a psum).
    local_params = jax.lax.pcast(params, "data", to="varying")
    grad = jax.grad(lambda p: jnp.mean(jax.vmap(ls.loss_fn, (None, 0))(p, (x, y))))(local_params)
    global_grad = jax.tree.map(lambda g: jax.lax.pmean(g, "data"), grad) if with_global else None
    return noise_lib.sharded_two_batch_sq_norms(grad, "data", global_grad)

  results = []
  for with_global in (False, True):
    f = jax.jit(jax.shard_map(functools.partial(local, with_global=with_global), mesh=mesh,
                              in_specs=(P("data"), P("data")), out_specs=(P(), P())))
    results.append(f(x, y))

  g_N = ls.per_example_grads(params, (x, y))
  g_S = jax.tree.map(lambda g: g.reshape((ls.N_DEVICES, b_small) + g.shape[1:]).mean(1), g_N)
  small_ref, big_ref = noise_lib.two_batch_sq_norms(g_S)
  for small, big in results:
    np.testing.assert_allclose(small, small_ref, rtol=1e-5)
    np.testing.assert_allclose(big, big_ref, rtol=1e-5)
  assert float(small_ref) > float(big_ref)  # the small batch is noisier

  s0 = noise_lib.noise_scale_init()
  b_big = b_small * ls.N_DEVICES
  _, b_sharded = noise_lib.noise_scale_update(s0, *results[0], b_small, b_big)
  _, b_single = noise_lib.noise_scale_update(s0, small_ref, big_ref, b_small, b_big)
  np.testing.assert_allclose(b_sharded, b_single, rtol=1e-5)


def test_noise_scale_skips_invalid_measurements_and_is_nan_before_data():
  s0 = noise_lib.noise_scale_init()
  assert np.isnan(noise_lib.noise_scale_value(s0))
  s1, b = noise_lib.noise_scale_update(s0, 2.0, 1.0, 8, 8)  # b_big == b_small: no information
  assert int(s1.count) == 0 and np.isnan(b)
  s2, b = noise_lib.noise_scale_update(s1, jnp.inf, 1.0, 8, 64)
  assert int(s2.count) == 0 and np.isnan(b)
