"""Least-squares problem with known gradient statistics, shared by the batch_size tests.

x ~ N(0, I_d), y = x.w* + s*eps, loss 0.5 (x.w - y)^2. At w = w* + delta the per-example
gradient g = x (x.delta - s eps) has mean G = delta and covariance
Sigma = (|delta|^2 + s^2) I + delta delta^T (Gaussian fourth moment), so
tr(Sigma) = (d + 1)|delta|^2 + d s^2 and B_simple = tr(Sigma)/|G|^2.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

# Parameters split into two leaves of different rank so "sum over leaves" is exercised.
SHAPES = {"a": (4, 2), "b": (8,)}
D = 16
NOISE = 1.0
N_DEVICES = 8


def flat_to_params(v_D):
  return {"a": v_D[:8].reshape(4, 2), "b": v_D[8:]}


def params_to_flat(p):
  return jnp.concatenate([p["a"].reshape(-1), p["b"]])


def loss_fn(params, example):
  x_D, y = example
  return 0.5 * jnp.square(jnp.dot(params_to_flat(params), x_D) - y)


per_example_grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))


def delta():
  v = jnp.arange(1.0, D + 1.0)
  return v / jnp.linalg.norm(v)  # |delta| = 1


def analytic(delta_D, noise=NOISE):
  sq = float(jnp.sum(delta_D**2))
  trace = (D + 1) * sq + D * noise**2
  return sq, trace


def draw(seed, *shape, noise=NOISE):
  """Examples of shape [*shape] around w* = 0 (so delta = w). NumPy draws: jitting vmapped
  jax.random costs seconds of compile time on CPU."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape + (D,), dtype=np.float32)
  y = (noise * rng.standard_normal(shape)).astype(np.float32)
  return x, y


def mesh():
  assert jax.device_count() >= N_DEVICES
  return Mesh(np.array(jax.devices()[:N_DEVICES]), ("data",))


def numpy_reference(g_ND, eta, theta, nu, batch, max_batch):
  """The released AdAdaGrad tests.py formulas on a flattened gradient (torch.var correction=1)."""
  g_ND = np.asarray(g_ND, np.float64)
  gbar = g_ND.mean(0)
  sq = gbar @ gbar
  norm_var = g_ND.var(0, ddof=1).sum()
  inner_N = g_ND @ gbar
  ip_var = inner_N.var(ddof=1)
  ortho_ND = g_ND - np.outer(inner_N, gbar) / sq
  orth_var = ortho_ND.var(0, ddof=1).sum()

  def grow(req):
    return max(batch, min(int(np.ceil(req)), max_batch))

  req = {"norm": norm_var / (eta**2 * sq), "ip": ip_var / (theta**2 * sq**2),
         "orth": orth_var / (nu**2 * sq)}
  req["aug"] = max(req["ip"], req["orth"])
  return dict(sq=sq, norm_var=norm_var, ip_var=ip_var, orth_var=orth_var, req=req,
              new={k: grow(v) for k, v in req.items()})


def random_per_sample_grads(seed, n):
  rng = np.random.default_rng(seed)
  mean_D = np.linspace(-1.0, 2.0, D)
  # Correlated, anisotropic noise so that cross-leaf covariances matter.
  mix_DD = rng.standard_normal((D, D)) / np.sqrt(D)
  g_ND = (mean_D + 0.5 * rng.standard_normal((n, D)) @ mix_DD).astype(np.float32)
  return g_ND, {"a": g_ND[:, :8].reshape(n, 4, 2), "b": g_ND[:, 8:]}
