"""AdAdaGrad batch-size tests (Lau, Liu, Kolar 2024, arXiv 2402.11215).

`gradient_statistics` reduces per-sample gradients to five scalars (`GradientStatistics`);
`norm_test` (Byrd et al. 2012), `inner_product_test`, `orthogonality_test` (Bollapragada et
al. 2018) and `augmented_inner_product_test` turn them into a required and a new batch size,
which only ever grows and is capped. Reference code: github.com/timlautk/AdAdaGrad `tests.py`.
All functions are pure and jittable. Papers index: docs/papers.md §3.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from batch_size import moments as moments_lib
from batch_size import tree_math

PyTree = Any
AxisName = Any
# Largest batch (in units) a test may ask for when no maximum is given; keeps int32 casts finite.
_UNCAPPED = 2**30


def _identity(x):
  return x


def _psum_or_identity(axis_name: Optional[AxisName]) -> Callable:
  if axis_name is None:
    return _identity
  return lambda x: jax.lax.psum(x, axis_name)


class GradientStatistics(NamedTuple):
  """Everything the AdAdaGrad tests need, as float32 scalars (sums over all leaves).

  With per-sample gradients g_i, i = 1..N, mean gbar, and Var the sample variance with ddof:
    grad_sq_norm = |gbar|^2
    norm_var     = sum_j Var_i(g_ij)
    ip_var       = Var_i(<g_i, gbar>)
    orth_var     = sum_j Var_i(g_i - (<g_i, gbar>/|gbar|^2) gbar)_j
  Inner products run over the whole parameter vector (all leaves), as in the paper's tests;
  the released code forms them leaf by leaf and sums per-leaf variances, which drops
  cross-leaf covariances (identical for a single leaf).
  """

  count: jax.Array
  grad_sq_norm: jax.Array
  norm_var: jax.Array
  ip_var: jax.Array
  orth_var: jax.Array


def gradient_statistics(per_sample_grads: PyTree, *, axis_name: Optional[AxisName] = None,
                        ddof: int = 1) -> GradientStatistics:
  """Reduces per-sample gradients (leading sample axis on every leaf) to `GradientStatistics`.

  Single device: `axis_name=None`. Inside `shard_map` with the samples split over `axis_name`,
  the result equals the single-device one on the concatenated samples: each shard's moments
  (count, mean, variance) are combined by the law of total expectation/variance
  (`moments.py`, summed over coordinates so only one parameter-sized all-reduce, for gbar, is
  needed; the rest are scalars). Per-sample gradients come from
  `jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)`; inside `shard_map` pass
  `jax.lax.pcast(params, axis_name, to="varying")` as params, else every per-sample gradient
  is already summed over devices.
  """
  grads = jax.tree.map(tree_math.f32, per_sample_grads)
  leaves = jax.tree.leaves(grads)
  n = leaves[0].shape[0]
  total = _psum_or_identity(axis_name)
  count = total(jnp.asarray(n, jnp.float32))

  def total_ss(local_ss, local_mean, global_mean):
    # Law of total variance summed over coordinates: within-shard + between-shard squares.
    between = tree_math.sq_norm(jax.tree.map(jnp.subtract, local_mean, global_mean))
    return total(local_ss + n * between)

  # Norm test: coordinates of g.
  local_mean = jax.tree.map(lambda g: g.mean(axis=0), grads)
  gbar = jax.tree.map(lambda m: total(n * m) / count, local_mean)
  grad_sq_norm = tree_math.sq_norm(gbar)
  ss = sum(jnp.sum(jnp.square(g - m)) for g, m in zip(leaves, jax.tree.leaves(local_mean)))
  norm_var = total_ss(ss, local_mean, gbar) / (count - ddof)

  # Inner-product test: u_i = <g_i, gbar>, a scalar per sample.
  u_N = sum(jnp.tensordot(g, m, axes=m.ndim) for g, m in zip(leaves, jax.tree.leaves(gbar)))
  u_local_mean = u_N.mean()
  u_mean = total(n * u_local_mean) / count
  ip_ss = total(jnp.sum(jnp.square(u_N - u_local_mean)) + n * jnp.square(u_local_mean - u_mean))
  ip_var = ip_ss / (count - ddof)

  # Orthogonality test: o_i = g_i - c_i gbar, c_i = u_i/|gbar|^2 (c_i = 0 if gbar = 0).
  # mean(o) = gbar (1 - mean(c)) exactly, so the global mean needs no further all-reduce.
  nonzero = grad_sq_norm > 0
  c_N = jnp.where(nonzero, u_N / jnp.where(nonzero, grad_sq_norm, 1.0), 0.0)
  c_local_mean = c_N.mean()
  c_mean = total(n * c_local_mean) / count
  o_local_mean = jax.tree.map(lambda m, gb: m - c_local_mean * gb, local_mean, gbar)
  o_mean = jax.tree.map(lambda gb: (1.0 - c_mean) * gb, gbar)
  o_ss = sum(
      jnp.sum(jnp.square(g - jnp.reshape(c_N, (n,) + (1,) * (g.ndim - 1)) * gb - om))
      for g, gb, om in zip(leaves, jax.tree.leaves(gbar), jax.tree.leaves(o_local_mean)))
  orth_var = total_ss(o_ss, o_local_mean, o_mean) / (count - ddof)

  return GradientStatistics(count=count, grad_sq_norm=grad_sq_norm, norm_var=norm_var,
                            ip_var=ip_var, orth_var=orth_var)


def statistics_from_moments(moments: moments_lib.Moments) -> GradientStatistics:
  """Norm-test statistics from combined coordinate moments (e.g. merged over micro-batches).

  Only the norm test is available this way: the inner-product and orthogonality tests need
  <g_i, gbar> with the final gbar, so ip_var and orth_var are NaN.
  """
  nan = jnp.asarray(jnp.nan, jnp.float32)
  return GradientStatistics(
      count=jnp.asarray(moments.count, jnp.float32),
      grad_sq_norm=tree_math.sq_norm(moments.mean),
      norm_var=sum(jnp.sum(v) for v in jax.tree.leaves(moments.variance)), ip_var=nan,
      orth_var=nan)


def _safe_ratio(num, den):
  """num/den with x/0 = inf for x > 0 and 0/0 = NaN (callers treat NaN as 'no evidence')."""
  return jnp.asarray(num, jnp.float32) / jnp.asarray(den, jnp.float32)


def required_batch_norm(stats: GradientStatistics, eta=0.1) -> jax.Array:
  """Norm test (Byrd et al. 2012; Lau et al. 2024): b >= sum_j Var_j / (eta^2 |gbar|^2)."""
  return _safe_ratio(stats.norm_var, eta**2 * stats.grad_sq_norm)


def required_batch_inner_product(stats: GradientStatistics, theta=0.1) -> jax.Array:
  """Inner-product test (Bollapragada et al. 2018): b >= Var(<g_i,gbar>) / (theta^2 |gbar|^4)."""
  return _safe_ratio(stats.ip_var, theta**2 * jnp.square(stats.grad_sq_norm))


def required_batch_orthogonality(stats: GradientStatistics, nu=0.1) -> jax.Array:
  """Orthogonality test (Bollapragada et al. 2018): b >= sum_j Var(o_i)_j / (nu^2 |gbar|^2)."""
  return _safe_ratio(stats.orth_var, nu**2 * stats.grad_sq_norm)


def required_batch_augmented(stats: GradientStatistics, theta=0.1, nu=0.1) -> jax.Array:
  """Augmented inner-product test: both the inner-product and the orthogonality test."""
  return jnp.fmax(required_batch_inner_product(stats, theta),
                  required_batch_orthogonality(stats, nu))


def grow_batch(current, required, unit=1, max_size: Optional[int] = None) -> jax.Array:
  """max(current, min(ceil(required / unit), max_size)) as int32, in units of `unit` examples.

  `current` and `max_size` are in units (micro-batches, or examples when unit=1). A NaN
  requirement (0/0: no gradient and no noise) keeps the current size; +inf gives `max_size`.
  The size never shrinks, also when `current` already exceeds `max_size`.
  """
  cap = _UNCAPPED if max_size is None else max_size
  units = jnp.asarray(required, jnp.float32) / unit
  units = jnp.where(jnp.isnan(units), 0.0, jnp.minimum(units, cap))
  return jnp.maximum(jnp.asarray(current, jnp.int32), jnp.ceil(units).astype(jnp.int32))


def norm_test(stats: GradientStatistics, batch_size, eta=0.1,
              max_batch_size: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """Returns (required batch size, new batch size) of the norm test; sizes in examples."""
  required = required_batch_norm(stats, eta)
  return required, grow_batch(batch_size, required, 1, max_batch_size)


def inner_product_test(stats: GradientStatistics, batch_size, theta=0.1,
                       max_batch_size: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """Returns (required batch size, new batch size) of the inner-product test."""
  required = required_batch_inner_product(stats, theta)
  return required, grow_batch(batch_size, required, 1, max_batch_size)


def orthogonality_test(stats: GradientStatistics, batch_size, nu=0.1,
                       max_batch_size: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """Returns (required batch size, new batch size) of the orthogonality test."""
  required = required_batch_orthogonality(stats, nu)
  return required, grow_batch(batch_size, required, 1, max_batch_size)


def augmented_inner_product_test(stats: GradientStatistics, batch_size, theta=0.1, nu=0.1,
                                 max_batch_size: Optional[int] = None
                                 ) -> tuple[jax.Array, jax.Array]:
  """Returns (required batch size, new batch size) of the augmented inner-product test."""
  required = required_batch_augmented(stats, theta, nu)
  return required, grow_batch(batch_size, required, 1, max_batch_size)
