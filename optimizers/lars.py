"""LARS (You, Gitman, Ginsburg 2017): momentum SGD with a per-layer local learning rate.

"Layer", `mask` and `layer_axis` mean what they mean for LAMB (see `optimizers/lamb.py`): one
pytree leaf or one slice along its stacked `layers` axis; `mask` True = the leaf gets weight
decay AND layer adaptation, `None` = `default_mask`.
"""
import jax
import jax.numpy as jnp
import optax

from optimizers.lamb import _NO_PARAMS, MaskOrFn, _resolve_axes, resolve_mask, slice_norm


def scale_by_lars(
    weight_decay: float = 0.0, trust_coefficient: float = 0.001, eps: float = 0.0,
    mask: MaskOrFn = None, layer_axis=None,
) -> optax.GradientTransformation:
  """g ← local_lr·(g + λx), local_lr = η_trust‖x‖/(‖g‖ + λ‖x‖ + ε) per layer (docs/papers.md §1.2).

  Written out because optax.lars adds decay first and divides by ‖g + λx‖, not ‖g‖ + λ‖x‖, and
  is per leaf. Masked-out leaves: no decay, local_lr = 1. A zero norm gives local_lr = 1.
  """
  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS)
    def scale(g, x, adapt, axis):
      if not adapt:
        return g
      x_norm, g_norm = slice_norm(x, axis), slice_norm(g, axis)
      den = g_norm + weight_decay * x_norm
      ok = (x_norm > 0) & (den > 0)
      local_lr = jnp.where(ok, trust_coefficient * x_norm / (jnp.where(ok, den, 1.0) + eps), 1.0)
      return (local_lr * (g + weight_decay * x)).astype(g.dtype)
    out = jax.tree.map(scale, updates, params, resolve_mask(mask, params),
                       _resolve_axes(layer_axis, params))
    return out, state
  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def lars(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    weight_decay: float = 5e-4,
    eps: float = 0.0,
    nesterov: bool = False,
    mask: MaskOrFn = None,
    layer_axis=None,
) -> optax.GradientTransformation:
  """LARS, You, Gitman, Ginsburg 2017 Alg. 1 (docs/papers.md §1.2).

  m = μm + η·local_lr·(g + λx), x ← x − m; momentum after the lr as in the paper (so lr changes
  are smoothed by momentum). Default weight_decay 5e-4: the LARS paper's AlexNet runs [MEM,
  unverified]; set it explicitly.
  """
  return optax.chain(
      scale_by_lars(weight_decay, trust_coefficient, eps, mask=mask, layer_axis=layer_axis),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum, nesterov=nesterov),
  )
