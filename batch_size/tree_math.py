"""Pytree arithmetic shared by the noise-scale estimators and the AdAdaGrad statistics."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
AxisName = Any


def f32(x) -> jax.Array:
  """`x` as an array of at least float32 precision (float64 stays float64)."""
  return jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def sq_norm(tree: PyTree) -> jax.Array:
  """Squared L2 norm over all leaves, accumulated in at least float32."""
  return sum(jnp.sum(jnp.square(f32(x))) for x in jax.tree.leaves(tree))
