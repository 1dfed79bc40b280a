"""Tests for batch_size/norm_tests.py and batch_size/moments.py (Lau et al. 2024).

Analytic values on least squares: see tests/batch_size/least_squares.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from batch_size import moments as moments_lib
from batch_size import norm_tests
from tests.batch_size import least_squares as ls


def test_statistics_and_tests_match_numpy_reference():
  g_ND, g_tree = ls.random_per_sample_grads(2, 100)
  eta, theta, nu, batch, max_batch = 0.3, 0.2, 0.7, 40, 10_000
  ref = ls.numpy_reference(g_ND, eta, theta, nu, batch, max_batch)

  @jax.jit
  def run(g_tree):
    stats = norm_tests.gradient_statistics(g_tree)
    return stats, {
        "norm": norm_tests.norm_test(stats, batch, eta, max_batch),
        "ip": norm_tests.inner_product_test(stats, batch, theta, max_batch),
        "orth": norm_tests.orthogonality_test(stats, batch, nu, max_batch),
        "aug": norm_tests.augmented_inner_product_test(stats, batch, theta, nu, max_batch),
    }

  stats, tests = run(g_tree)
  assert float(stats.count) == 100
  for field, key in (("grad_sq_norm", "sq"), ("norm_var", "norm_var"), ("ip_var", "ip_var"),
                     ("orth_var", "orth_var")):
    np.testing.assert_allclose(getattr(stats, field), ref[key], rtol=1e-4, err_msg=field)

  for name, (required, new) in tests.items():
    np.testing.assert_allclose(required, ref["req"][name], rtol=1e-4, err_msg=name)
    assert int(new) == ref["new"][name], name
  # The orthogonal part is orthogonal: Var of o_i equals norm_var - ip_var/|gbar|^2.
  np.testing.assert_allclose(stats.orth_var, stats.norm_var - stats.ip_var / stats.grad_sq_norm,
                             rtol=1e-4)


def test_tests_cap_and_never_shrink():
  _, g_tree = ls.random_per_sample_grads(3, 64)

  @jax.jit
  def run(g_tree):
    stats = norm_tests.gradient_statistics(g_tree)
    zero_mean = norm_tests.gradient_statistics(jax.tree.map(lambda g: g - g.mean(0), g_tree))
    nothing = norm_tests.gradient_statistics(jax.tree.map(jnp.zeros_like, g_tree))
    return (norm_tests.norm_test(stats, 8, eta=1e-3, max_batch_size=512),
            norm_tests.norm_test(stats, 4096, eta=1e-3, max_batch_size=512),
            norm_tests.norm_test(stats, 8, eta=1e6),
            norm_tests.norm_test(zero_mean, 8, 0.1, 512),
            norm_tests.norm_test(nothing, 8, 0.1, 512))

  capped, above_cap, huge_eta, zero_mean, nothing = run(g_tree)
  assert float(capped[0]) > 512 and int(capped[1]) == 512
  assert int(above_cap[1]) == 4096  # already above the cap: kept, not shrunk
  assert float(huge_eta[0]) < 1 and int(huge_eta[1]) == 8
  # Zero mean gradient: infinite requirement -> cap; nothing at all (0/0) -> unchanged.
  assert int(zero_mean[1]) == 512
  assert int(nothing[1]) == 8


def test_norm_test_statistic_matches_analytic_on_least_squares():
  n, n_draws, eta = 1024, 200, 0.1
  delta = ls.delta()
  params = ls.flat_to_params(delta)
  sq_g, trace = ls.analytic(delta)

  def stats(x, y):
    return norm_tests.gradient_statistics(ls.per_example_grads(params, (x, y)))

  st = jax.jit(jax.vmap(stats))(*ls.draw(4, n_draws, n))
  # Unbiased (ddof=1) sum of variances = tr(Sigma); E|gbar|^2 = |G|^2 + tr(Sigma)/n.
  for est, true in ((st.norm_var, trace), (st.grad_sq_norm, sq_g + trace / n)):
    se = np.std(est) / np.sqrt(n_draws)
    assert abs(np.mean(est) - true) < 4 * se, (np.mean(est), true, se)
  required = norm_tests.required_batch_norm(st, eta=eta)
  analytic = trace / (eta**2 * (sq_g + trace / n))  # ~2923 examples
  np.testing.assert_allclose(np.mean(required), analytic, rtol=0.05)
  # Inner-product variance: Var(<g, G>) = G^T Sigma G = |G|^2 (|G|^2 + s^2) + |G|^4 = 3.
  np.testing.assert_allclose(np.mean(st.ip_var), 3.0, rtol=0.1)


@pytest.mark.parametrize("ddof", [0, 1])
def test_sharded_statistics_equal_single_device(ddof):
  mesh = ls.mesh()
  params = ls.flat_to_params(0.3 * ls.delta())
  per_device = 24
  x, y = ls.draw(5, per_device * ls.N_DEVICES)
  g_tree = ls.per_example_grads(params, (x, y))

  def local_grads(x, y):  # device-varying params: see test_noise_scale.py, sharded test
    return ls.per_example_grads(jax.lax.pcast(params, "data", to="varying"), (x, y))

  def local(x, y):
    return norm_tests.gradient_statistics(local_grads(x, y), axis_name="data", ddof=ddof)

  out_specs = norm_tests.GradientStatistics(*([P()] * 5))
  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                                  out_specs=out_specs))(x, y)
  single = norm_tests.gradient_statistics(g_tree, ddof=ddof)
  for a, b, name in zip(sharded, single, norm_tests.GradientStatistics._fields):
    np.testing.assert_allclose(a, b, rtol=2e-5, err_msg=name)

  g_np = np.asarray(jnp.concatenate([g_tree["a"].reshape(-1, 8), g_tree["b"]], axis=1))
  np.testing.assert_allclose(single.norm_var, g_np.var(0, ddof=ddof).sum(), rtol=1e-5)

  # Per-device (count, mean, variance) pytrees combined with psum_moments (law of total
  # variance) equal the moments of the concatenated batch, coordinate by coordinate.
  def local_moments(x, y):
    per_device = moments_lib.sample_moments(local_grads(x, y), ddof)
    return moments_lib.psum_moments(per_device, "data", ddof)

  moments = jax.jit(jax.shard_map(local_moments, mesh=mesh, in_specs=(P("data"), P("data")),
                                  out_specs=P()))(x, y)
  ref = moments_lib.sample_moments(g_tree, ddof)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-7), moments, ref)
  np.testing.assert_allclose(norm_tests.statistics_from_moments(moments).norm_var, single.norm_var,
                             rtol=2e-5)


@pytest.mark.parametrize("ddof", [0, 1])
def test_combine_moments_unequal_counts(ddof):
  _, g_tree = ls.random_per_sample_grads(6, 64)
  cuts = [0, 7, 20, 22, 64]  # unequal shard sizes 7, 13, 2, 42

  @jax.jit
  def run(g_tree):
    parts = [jax.tree.map(lambda g, i=i: g[cuts[i]:cuts[i + 1]], g_tree) for i in range(4)]
    stacked = jax.tree.map(lambda *m: jnp.stack(m),
                           *[moments_lib.sample_moments(p, ddof) for p in parts])
    rest = moments_lib.combine_moments(jax.tree.map(lambda m: m[1:], stacked), ddof)
    merged = moments_lib.merge_moments(moments_lib.sample_moments(parts[0], ddof), rest, ddof)
    return (stacked, moments_lib.combine_moments(stacked, ddof), merged,
            moments_lib.sample_moments(g_tree, ddof))

  stacked, combined, merged, ref = run(g_tree)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), combined, ref)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), merged, ref)
  # The released code's mean(Var_d) + mean(m_d^2) - mean^2 is not exact for unequal counts.
  approx = (stacked.variance["b"].mean(0) + jnp.square(stacked.mean["b"]).mean(0)
            - jnp.square(stacked.mean["b"].mean(0)))
  assert not np.allclose(approx, ref.variance["b"], rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# Controllers.
