"""AdaGrad and AdaGradNorm as in Lau, Liu, Kolar 2024 (AdAdaGrad; docs/papers.md §3)."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def adagrad(
    learning_rate: optax.ScalarOrSchedule, initial_accumulator: float = 1e-2
) -> optax.GradientTransformation:
  """Coordinate-wise AdaGrad: b²_{k,j} = b²_{k-1,j} + g²_{k,j}; x_j ← x_j − α g_j / b_{k,j}.

  `initial_accumulator` is b²_0 (1e-2 in the reference `adagradnorm.py`). optax's `scale_by_rss`
  is exactly this with eps = 0 (its eps sits inside the root and is not in the paper).
  """
  return optax.chain(
      optax.scale_by_rss(initial_accumulator_value=initial_accumulator, eps=0.0),
      optax.scale_by_learning_rate(learning_rate),
  )


class ScaleByAdaGradNormState(NamedTuple):
  b_squared: jax.Array  # scalar accumulator shared by all parameters


def scale_by_adagrad_norm(b0: float = 0.1) -> optax.GradientTransformation:
  """g ← g / b_k with b²_k = b²_{k-1} + ‖g_k‖², ‖·‖ over all leaves (AdaGradNorm, Lau et al. §2).

  optax has no scalar-accumulator AdaGrad. The global norm is a sum of reductions, so it is the
  norm of the logical arrays under jit + NamedSharding.
  """
  def init_fn(params):
    del params
    return ScaleByAdaGradNormState(b_squared=jnp.square(jnp.asarray(b0, jnp.float32)))

  def update_fn(updates, state, params=None):
    del params
    b_squared = state.b_squared + jnp.square(optax.tree.norm(updates))
    inv_b = jnp.where(b_squared > 0, jax.lax.rsqrt(jnp.where(b_squared > 0, b_squared, 1.0)), 0.0)
    updates = jax.tree.map(lambda g: (g * inv_b).astype(g.dtype), updates)
    return updates, ScaleByAdaGradNormState(b_squared=b_squared)
  return optax.GradientTransformation(init_fn, update_fn)


def adagrad_norm(
    learning_rate: optax.ScalarOrSchedule, b0: float = 0.1
) -> optax.GradientTransformation:
  """AdaGradNorm: x ← x − (α / b_k) g_k, b²_k = b²_0 + Σ_{i≤k} ‖g_i‖² (b²_0 = 1e-2 by default)."""
  return optax.chain(scale_by_adagrad_norm(b0), optax.scale_by_learning_rate(learning_rate))
