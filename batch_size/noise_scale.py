"""Gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018, arXiv 1812.06162).

Pure, jittable estimators from two batch sizes (Sec. 2.2 and App. A): `two_batch_estimates`,
the EMA state `noise_scale_init` / `noise_scale_update` / `noise_scale_value`, and the two
squared norms they take: `two_batch_sq_norms` (per-shard gradients stacked on a leading axis)
and `sharded_two_batch_sq_norms` (inside `shard_map`: the local gradient before the all-reduce
is the small batch). `b_small`/`b_big` set the unit of B_simple: pass examples to get
examples, tokens to get tokens. Papers index: docs/papers.md §9.8.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from batch_size import tree_math

PyTree = Any
AxisName = Any


class NoiseScaleState(NamedTuple):
  """EMA state of the two-batch noise-scale estimator; a pytree of float32/int32 scalars.

  `weight` is the EMA of the constant 1 (= 1 - decay^count for a fixed decay), so the
  bias-corrected EMAs are `sq_norm_ema / weight` and `trace_ema / weight` without storing decay.
  """

  count: jax.Array  # int32 [], valid measurements folded in
  sq_norm_ema: jax.Array  # f32 [], EMA of the |G|^2 estimates
  trace_ema: jax.Array  # f32 [], EMA of the tr(Sigma) estimates
  weight: jax.Array  # f32 [], EMA of 1 (bias correction)


def noise_scale_init() -> NoiseScaleState:
  zero = jnp.zeros((), jnp.float32)
  return NoiseScaleState(count=jnp.zeros((), jnp.int32), sq_norm_ema=zero, trace_ema=zero,
                         weight=zero)


def two_batch_estimates(sq_norm_small, sq_norm_big, b_small, b_big):
  """Unbiased |G|^2 and tr(Sigma) from two batch sizes (McCandlish et al. 2018, App. A).

  From E|G_B|^2 = |G|^2 + tr(Sigma)/B:
    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
  Either estimate may be negative for one draw; only their EMAs are meaningful.
  Requires b_big > b_small > 0.
  """
  sq_small, sq_big = tree_math.f32(sq_norm_small), tree_math.f32(sq_norm_big)
  b_small, b_big = jnp.asarray(b_small, jnp.float32), jnp.asarray(b_big, jnp.float32)
  sq_norm_g = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
  trace_sigma = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
  return sq_norm_g, trace_sigma


def noise_scale_update(state: NoiseScaleState, sq_norm_small, sq_norm_big, b_small, b_big,
                       decay=0.99) -> tuple[NoiseScaleState, jax.Array]:
  """Folds one two-batch measurement into the EMAs and returns B_simple = tr(Sigma)/|G|^2.

  B_simple = EMA(tr Sigma) / EMA(|G|^2) (McCandlish et al. 2018, eq. for B_simple, Sec. 2.2;
  smoothing as in App. A / gpt-neox `gradient_noise_scale.py`: the two parts are smoothed
  separately, then divided; bias corrections cancel in the ratio).

  Args:
    state: from `noise_scale_init`.
    sq_norm_small: |G_small|^2, squared norm of a gradient averaged over `b_small` examples
      (may already be a mean over several such small batches, see `two_batch_sq_norms`).
    sq_norm_big: |G_big|^2 of the gradient averaged over `b_big` examples.
    b_small, b_big: batch sizes (runtime values allowed). A measurement with
      b_big <= b_small or non-finite norms is skipped (state unchanged).
    decay: EMA decay in [0, 1); may be a runtime value.

  Returns:
    (new state, b_simple); b_simple is NaN until EMA(|G|^2) > 0.
  """
  sq_norm_g, trace_sigma = two_batch_estimates(sq_norm_small, sq_norm_big, b_small, b_big)
  valid = ((jnp.asarray(b_big) > jnp.asarray(b_small)) & (jnp.asarray(b_small) > 0)
           & jnp.isfinite(sq_norm_g) & jnp.isfinite(trace_sigma))
  decay = jnp.asarray(decay, jnp.float32)

  def ema(old, new):
    return jnp.where(valid, decay * old + (1.0 - decay) * new, old)

  state = NoiseScaleState(
      count=state.count + valid.astype(jnp.int32),
      sq_norm_ema=ema(state.sq_norm_ema, jnp.where(valid, sq_norm_g, 0.0)),
      trace_ema=ema(state.trace_ema, jnp.where(valid, trace_sigma, 0.0)),
      weight=ema(state.weight, 1.0),
  )
  return state, noise_scale_value(state)


def noise_scale_value(state: NoiseScaleState) -> jax.Array:
  """B_simple of the current EMAs; NaN while EMA(|G|^2) <= 0 (including before any update)."""
  ok = state.sq_norm_ema > 0
  return jnp.where(ok, state.trace_ema / jnp.where(ok, state.sq_norm_ema, 1.0), jnp.nan)


def noise_scale_estimates(state: NoiseScaleState) -> tuple[jax.Array, jax.Array]:
  """Bias-corrected EMAs (|G|^2, tr Sigma), for logging; NaN before any valid update."""
  ok = state.weight > 0
  w = jnp.where(ok, state.weight, 1.0)
  return (jnp.where(ok, state.sq_norm_ema / w, jnp.nan),
          jnp.where(ok, state.trace_ema / w, jnp.nan))


def two_batch_sq_norms(grads_S: PyTree) -> tuple[jax.Array, jax.Array]:
  """(mean_s |g_s|^2, |mean_s g_s|^2) from per-shard mean gradients stacked on axis 0.

  Each g_s is the gradient averaged over B_small examples (one data-parallel shard or one
  micro-batch); with S equal-size shards the big batch is their mean, B_big = S * B_small.
  Averaging the S small-batch norms keeps the estimator unbiased and lowers its variance.
  """
  leaves = jax.tree.leaves(grads_S)
  sq_small = sum(jnp.sum(jnp.square(tree_math.f32(g)), axis=tuple(range(1, g.ndim))).mean()
                 for g in leaves)
  sq_big = sum(jnp.sum(jnp.square(tree_math.f32(g).mean(axis=0))) for g in leaves)
  return sq_small, sq_big


def sharded_two_batch_sq_norms(local_grad: PyTree, axis_name: AxisName,
                               global_grad: Optional[PyTree] = None
                               ) -> tuple[jax.Array, jax.Array]:
  """`two_batch_sq_norms` inside `shard_map`: the local gradient before the all-reduce is G_small.

  Take the local gradient w.r.t. a device-varying copy of the parameters,
  `jax.grad(loss)(jax.lax.pcast(params, axis_name, to="varying"), local_batch)`: the gradient
  w.r.t. replicated parameters inside `shard_map` is already summed over devices.

  Args:
    local_grad: this device's gradient, averaged over its B_small examples, full (unsharded
      over model axes) parameter shapes.
    axis_name: the data-parallel mesh axis (or tuple of axes) the gradient is averaged over.
    global_grad: the already all-reduced mean gradient, if the caller has it; else computed
      with `pmean`.

  Returns:
    (sq_norm_small, sq_norm_big), identical on every device; B_big = axis size * B_small.
  """
  sq_small = jax.lax.pmean(tree_math.sq_norm(local_grad), axis_name)
  if global_grad is None:
    global_grad = jax.tree.map(lambda g: jax.lax.pmean(g, axis_name), local_grad)
  return sq_small, tree_math.sq_norm(global_grad)
