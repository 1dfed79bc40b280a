"""LAMB (You et al., ICLR 2020) with per-layer trust ratios, and the layer-wise helpers LARS shares.

LARS (You, Gitman, Ginsburg 2017) is in `optimizers/lars.py`; it uses the masks and norms here.

"Layer" means one pytree leaf, or one slice of a leaf along its stacked `layers` axis when the
trainer scans over layers (`layer_axis`). Norms are plain reductions, so under `jit` with
NamedSharding they are norms of the logical (global) array.

Masks (`mask`): True = the leaf gets weight decay AND layer adaptation. `None` means
`default_mask` (biases and normalisation scales/offsets excluded from both, as in the TF/ALBERT
reference code); `True`/`False` apply to every leaf; otherwise a pytree of bools (or a prefix of
params) or a callable `params -> pytree`. Under `optax.inject_hyperparams` pass a callable mask
as `static_args=('mask',)`, since inject_hyperparams treats every callable as a schedule.
"""
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

MaskOrFn = Union[None, bool, Any, Callable[[Any], Any]]
_NO_PARAMS = "trust-ratio optimizers need params: call update(grads, state, params)"


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def default_mask(params) -> Any:
  """True for leaves that get weight decay and layer adaptation.

  False for `bias` leaves and for every leaf under a module whose name contains "norm"
  (LayerNorm/RMSNorm `scale`, `bias`): TF `exclude_from_weight_decay=["LayerNorm",
  "layer_norm", "bias"]`, reused for `exclude_from_layer_adaptation` (docs/papers.md §1.1).
  """
  def keep(path, _):
    names = [_key_name(k).lower() for k in path]
    return not (names and (names[-1] == "bias" or any("norm" in n for n in names[:-1])))
  return jax.tree_util.tree_map_with_path(keep, params)


def resolve_mask(mask: MaskOrFn, params) -> Any:
  """A pytree of Python bools matching `params` (see module docstring for `mask`)."""
  if mask is None:
    mask = default_mask
  if callable(mask):
    mask = mask(params)
  # A prefix tree (or a single bool) broadcasts over the matching params subtree.
  return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, params)


def _resolve_axes(layer_axis, params) -> Any:
  if layer_axis is None:
    return jax.tree.map(lambda _: None, params)
  # `flatten up to params`: a None leaf in layer_axis stays None.
  return jax.tree.map(lambda _, a: a, params, layer_axis)


def slice_norm(x: jax.Array, axis: Optional[int]) -> jax.Array:
  """L2 norm of `x`, or of each slice along `axis` (keepdims, so it broadcasts against `x`)."""
  x = x.astype(jnp.float32)
  if axis is None:
    return jnp.sqrt(jnp.sum(jnp.square(x)))
  axis = axis % x.ndim
  others = tuple(i for i in range(x.ndim) if i != axis)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=others, keepdims=True))


def trust_ratio(x_norm, u_norm, phi_clip: Optional[Sequence[float]] = None):
  """LAMB Alg. 2 ratio φ(‖x‖)/‖u‖, φ(z) = clip(z, γ_l, γ_u) or identity; 1 if a norm is 0."""
  phi = x_norm if phi_clip is None else jnp.clip(x_norm, phi_clip[0], phi_clip[1])
  ok = (x_norm > 0) & (u_norm > 0)
  return jnp.where(ok, phi / jnp.where(ok, u_norm, 1.0), 1.0)


def scale_by_layer_trust_ratio(
    mask: MaskOrFn = None, layer_axis=None, phi_clip: Optional[Sequence[float]] = None
) -> optax.GradientTransformation:
  """u ← φ(‖x‖)/‖u‖ · u per layer slice; leaves with mask False pass through unchanged.

  Hand-written instead of `optax.scale_by_trust_ratio` because that one takes one norm per leaf
  (a scanned [L, ...] stack would share a single ratio), has no φ clipping, and wrapping it in
  `optax.masked` would misalign `layer_axis` with the masked tree.
  """
  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS)
    def scale(u, x, adapt, axis):
      if not adapt:
        return u
      r = trust_ratio(slice_norm(x, axis), slice_norm(u, axis), phi_clip)
      return (u * r).astype(u.dtype)
    out = jax.tree.map(scale, updates, params, resolve_mask(mask, params),
                       _resolve_axes(layer_axis, params))
    return out, state
  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_adam_uncorrected(b1=0.9, b2=0.999, eps=1e-6) -> optax.GradientTransformation:
  """r = m/(sqrt(v)+ε) without bias correction (ALBERT `lamb_optimizer.py`, docs/papers.md §1.1).

  `optax.scale_by_adam` always bias-corrects, so this variant is written out; it keeps
  `optax.ScaleByAdamState` so checkpoints look the same either way.
  """
  def init_fn(params):
    # Two trees, not one shared twice: a donated step must not receive the same buffer twice.
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=optax.tree.zeros_like(params),
                                  nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    r = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    count = optax.safe_increment(state.count)
    return r, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
  return optax.GradientTransformation(init_fn, update_fn)


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    bias_correction: bool = True,
    phi_clip: Optional[Sequence[float]] = None,
    mask: MaskOrFn = None,
    layer_axis=None,
    adaptation_mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """LAMB, You et al. 2020 Alg. 2 (docs/papers.md §1.1).

  r = m̂/(sqrt(v̂)+ε), u = r + λx, x ← x − η φ(‖x‖)/‖u‖ u, per layer (slice).
  `mask` selects decay AND adaptation (None = `default_mask`); `adaptation_mask` overrides the
  adaptation part only (None = same as `mask`, True = adapt every leaf as `optax.lamb` does).
  Masked-out leaves take the plain Adam step −η r.
  """
  adam = (optax.scale_by_adam(b1=b1, b2=b2, eps=eps) if bias_correction
          else scale_by_adam_uncorrected(b1=b1, b2=b2, eps=eps))
  adapt = mask if adaptation_mask is None else adaptation_mask
  return optax.chain(
      adam,
      optax.add_decayed_weights(weight_decay, mask=lambda p: resolve_mask(mask, p)),
      scale_by_layer_trust_ratio(mask=adapt, layer_axis=layer_axis, phi_clip=phi_clip),
      optax.scale_by_learning_rate(learning_rate),
  )
