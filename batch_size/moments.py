"""Sample moments of per-sample values, combined across shards by the law of total variance.

Used by the AdAdaGrad statistics (Lau et al. 2024, arXiv 2402.11215; `norm_tests.py`) to
merge (count, mean, variance) over devices or micro-batches exactly, for any per-shard counts.
Papers index: docs/papers.md §3.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from batch_size import tree_math

PyTree = Any
AxisName = Any


class Moments(NamedTuple):
  """Sample moments of per-sample values over a leading sample axis.

  count is a float32 scalar (or [D] when stacked per shard); mean and variance are pytrees
  with the per-sample shape (or [D, ...] when stacked). variance uses the ddof it was made with.
  """

  count: jax.Array
  mean: PyTree
  variance: PyTree


def sample_moments(x: PyTree, ddof: int = 1) -> Moments:
  """Per-coordinate mean and variance over axis 0 of every leaf (ddof=1: Bessel, as torch.var)."""
  n = jax.tree.leaves(x)[0].shape[0]
  mean = jax.tree.map(lambda v: tree_math.f32(v).mean(axis=0), x)
  var = jax.tree.map(
      lambda v, m: jnp.sum(jnp.square(tree_math.f32(v) - m), axis=0) / (n - ddof), x, mean)
  return Moments(count=jnp.asarray(n, jnp.float32), mean=mean, variance=var)


def _combine(moments: Moments, ddof: int, total: Callable) -> Moments:
  """Law of total variance; `total` sums over shards (a stacked axis or a mesh axis).

  Exact for any per-shard counts and either ddof:
    N = sum_d n_d,  mean = sum_d n_d m_d / N,
    (N - ddof) Var = sum_d [(n_d - ddof) Var_d + n_d (m_d - mean)^2].
  The released AdAdaGrad code uses mean_d(Var_d) + mean_d(m_d^2) - mean^2, which equals this
  only for ddof=0 and equal counts.
  """
  count = total(moments.count)

  def bcast(c, v):  # counts [D] against leaves [D, ...] (or scalars against anything)
    return jnp.reshape(c, jnp.shape(c) + (1,) * (jnp.ndim(v) - jnp.ndim(c)))

  mean = jax.tree.map(lambda m: total(bcast(moments.count, m) * m) / count, moments.mean)

  def var(v, m, mu):
    n = bcast(moments.count, v)
    return total((n - ddof) * v + n * jnp.square(m - mu)) / (count - ddof)

  variance = jax.tree.map(lambda v, m, mu: var(v, m, mu), moments.variance, moments.mean, mean)
  return Moments(count=count, mean=mean, variance=variance)


def combine_moments(moments_D: Moments, ddof: int = 1) -> Moments:
  """Combines per-shard moments stacked on a leading axis D into moments of the union."""
  return _combine(moments_D, ddof, lambda x: jnp.sum(x, axis=0))


def psum_moments(moments: Moments, axis_name: AxisName, ddof: int = 1) -> Moments:
  """`combine_moments` across a mesh axis, inside `shard_map`; the result is replicated."""
  return _combine(moments, ddof, lambda x: jax.lax.psum(x, axis_name))


def merge_moments(a: Moments, b: Moments, ddof: int = 1) -> Moments:
  """Moments of the union of two sample sets (e.g. accumulating over micro-batches)."""
  return combine_moments(jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b), ddof)

