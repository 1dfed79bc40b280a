"""Tests for batch_size/controllers.py and batch_size/config.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from batch_size import config as config_lib
from batch_size import controllers
from batch_size import noise_scale as noise_lib
from batch_size import norm_tests
from tests.batch_size import least_squares as ls


def _config(**overrides):
  c = config_lib.default_batch_size_config()
  for path, value in overrides.items():
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  root = ml_collections.ConfigDict()
  root.batch_size = c
  return root


class _Traced:
  """Wraps a function and counts how often JAX traces it."""

  def __init__(self, fn):
    self.fn, self.traces = fn, 0

  def __call__(self, *args):
    self.traces += 1
    return self.fn(*args)


@jax.jit
def _sgd_step_and_measure(params, batch):
  """One SGD step on a 64-example micro-batch, with its per-sample test statistics."""
  g = ls.per_example_grads(params, batch)
  params = jax.tree.map(lambda p, g_: p - 0.05 * g_.mean(0), params, g)
  return params, controllers.Measurements(grad_stats=norm_tests.gradient_statistics(g))


def _norm_test_run(eta, steps=30, seed=0):
  """SGD on least squares while the norm-test controller watches the per-sample gradients."""
  config = _config(controller="norm_test", micro_batch_size=32, initial_batch_size=64,
                   max_batch_size=2**20, **{"adaptive.eta": eta})
  ctrl = controllers.make_controller(config)
  traced = _Traced(ctrl.update)
  update = jax.jit(traced)
  state, params = ctrl.init(), ls.flat_to_params(3.0 * ls.delta())
  sizes = [int(state.num_microbatches) * 32]
  x, y = ls.draw(seed, steps, 64)
  for step in range(steps):
    params, measurements = _sgd_step_and_measure(params, (x[step], y[step]))
    state, k = update(state, measurements, jnp.int32(step), jnp.float32(0))
    sizes.append(int(k) * 32)
  return sizes, traced.traces, state


def test_norm_test_controller_grows_monotonically_and_compiles_once():
  sizes_small_eta, traces, state = _norm_test_run(eta=0.1)
  sizes_large_eta, _, _ = _norm_test_run(eta=0.5)
  sizes_huge_eta, _, _ = _norm_test_run(eta=1e6)
  assert traces == 1
  for sizes in (sizes_small_eta, sizes_large_eta, sizes_huge_eta):
    assert all(b >= a for a, b in zip(sizes, sizes[1:])), sizes
  assert sizes_small_eta[-1] > sizes_large_eta[-1] > 64
  assert set(sizes_huge_eta) == {64}
  entries = controllers.history_entries(state.history)
  assert entries[0] == (0, 64) and entries[-1][1] == sizes_small_eta[-1]
  assert len(entries) == len(set(sizes_small_eta))


def test_adaptive_interval_and_augmented_controller():
  g_ND, g_tree = ls.random_per_sample_grads(7, 64)
  m = controllers.Measurements(grad_stats=jax.jit(norm_tests.gradient_statistics)(g_tree))
  config = _config(controller="augmented_inner_product", micro_batch_size=8,
                   initial_batch_size=8, max_batch_size=1 << 16,
                   **{"adaptive.theta": 0.2, "adaptive.nu": 0.7, "adaptive.interval": 5})
  ctrl = controllers.make_controller(config)
  update = jax.jit(ctrl.update)
  state = ctrl.init()
  _, k = update(state, m, jnp.int32(3), jnp.float32(0))  # not a test step
  assert int(k) == 1
  _, k = update(state, m, jnp.int32(5), jnp.float32(0))
  required = ls.numpy_reference(g_ND, 1.0, 0.2, 0.7, 8, 1 << 16)["req"]["aug"]
  assert int(k) == int(np.ceil(required / 8))
  with pytest.raises(ValueError, match="grad_stats"):
    ctrl.update(state, controllers.Measurements(), 5, 0.0)


def test_ramp_controller_steps():
  config = _config(controller="ramp", micro_batch_size=32, initial_batch_size=32,
                   **{"ramp.unit": "steps", "ramp.schedule": ((0, 64), (10, 128), (20, 256))})
  ctrl = controllers.make_controller(config)
  traced = _Traced(ctrl.update)
  update = jax.jit(traced)
  state = ctrl.init()
  assert int(state.num_microbatches) == 2
  got = {}
  for step in range(25):
    state, k = update(state, controllers.Measurements(), jnp.int32(step), jnp.float32(0))
    got[step + 1] = int(k)  # k is the number of micro-batches for step + 1
  assert [got[s] for s in (9, 10, 19, 20, 25)] == [2, 4, 4, 8, 8]
  assert traced.traces == 1
  assert controllers.history_entries(state.history) == [(0, 64), (10, 128), (20, 256)]


def test_ramp_controller_tokens_and_linear_schedule():
  schedule = config_lib.linear_ramp_schedule(64, 256, 64, ramp_length=3e9, start=1e9)
  assert schedule == ((1e9, 64), (2e9, 128), (3e9, 192), (4e9, 256))
  config = _config(controller="ramp", micro_batch_size=32, initial_batch_size=32,
                   **{"ramp.unit": "tokens", "ramp.schedule": schedule})
  ctrl = controllers.make_controller(config)
  update = jax.jit(ctrl.update)
  state = ctrl.init()
  assert int(state.num_microbatches) == 1  # before the first threshold: initial_batch_size
  expected = {0.0: 1, 0.99e9: 1, 1e9: 2, 2.5e9: 4, 3.5e9: 6, 4e9: 8, 1e13: 8}
  for tokens, k_expected in expected.items():
    _, k = update(state, controllers.Measurements(), jnp.int32(0), jnp.float32(tokens))
    assert int(k) == k_expected, tokens


def _noise_measurements(trace, b_small=32, b_big=256, sq_g=1.0):
  """Noise-free measurements whose two-batch estimate is exactly B_simple = trace/sq_g."""
  return controllers.Measurements(sq_norm_small=jnp.float32(sq_g + trace / b_small),
                         sq_norm_big=jnp.float32(sq_g + trace / b_big),
                         b_small=jnp.float32(b_small), b_big=jnp.float32(b_big))


@pytest.mark.parametrize("only_grow", [False, True])
def test_noise_scale_controller_proportional_clip_round(only_grow):
  config = _config(controller="noise_scale", micro_batch_size=32, initial_batch_size=64,
                   min_batch_size=64, max_batch_size=4096,
                   **{"noise_scale.decay": 0.0, "noise_scale.multiplier": 2.0,
                      "noise_scale.warmup_steps": 3, "noise_scale.only_grow": only_grow})
  ctrl = controllers.make_controller(config)
  traced = _Traced(ctrl.update)
  update = jax.jit(traced)
  state = ctrl.init()
  traces = [1000.0] * 4 + [1e7] * 2 + [100.0] * 2 + [10.0] * 2
  ks = []
  for step, tr in enumerate(traces):
    state, k = update(state, _noise_measurements(tr), jnp.int32(step), jnp.float32(0))
    ks.append(int(k))
  # warmup: 2 steps unchanged; 2*1000 = 2000 examples -> ceil(2000/32) = 63 micro-batches;
  # 2e7 -> clipped to 4096 (128); 200 -> 7 micro-batches (224 >= 200); 20 -> min 64 (2).
  if only_grow:
    assert ks == [2, 2, 63, 63, 128, 128, 128, 128, 128, 128]
  else:
    assert ks == [2, 2, 63, 63, 128, 128, 7, 7, 2, 2]
  assert traced.traces == 1
  np.testing.assert_allclose(noise_lib.noise_scale_value(state.noise), 10.0, rtol=1e-4)


def test_noise_scale_controller_update_interval_and_missing_fields():
  config = _config(controller="noise_scale", micro_batch_size=32, initial_batch_size=32,
                   **{"noise_scale.decay": 0.0, "noise_scale.warmup_steps": 1,
                      "noise_scale.update_interval": 4})
  ctrl = controllers.make_controller(config)
  state = ctrl.init()
  ks = []
  for step in range(5):
    state, k = ctrl.update(state, _noise_measurements(640.0), step, 0.0)
    ks.append(int(k))
  assert ks == [20] * 5  # 640/32; step 0 is an update step
  state = ctrl.init()
  state, k = ctrl.update(state, _noise_measurements(640.0), 1, 0.0)
  assert int(k) == 1  # step 1: not an update step
  state, k = ctrl.update(state, _noise_measurements(640.0), 4, 0.0)
  assert int(k) == 20
  with pytest.raises(ValueError, match="sq_norm_small"):
    ctrl.update(state, controllers.Measurements(), 4, 0.0)


@pytest.mark.parametrize("name", ["noise_scale", "fixed", "ramp", "norm_test"])
def test_noise_state_from_the_caller_is_stored_not_recomputed(name):
  # The train step folds the two-batch norms into the EMAs once (with_noise_scale) and hands
  # the updated state over in Measurements.noise: every controller stores it, and noise_scale
  # gives the same sizes and state as when it folds the norms in itself.
  config = _config(controller=name, micro_batch_size=32, initial_batch_size=64,
                   min_batch_size=64, max_batch_size=4096,
                   **{"noise_scale.decay": 0.5, "noise_scale.warmup_steps": 2})
  ctrl = controllers.make_controller(config)
  decay = config.batch_size.noise_scale.decay
  _, g_tree = ls.random_per_sample_grads(8, 64)
  grad_stats = jax.jit(norm_tests.gradient_statistics)(g_tree)

  @jax.jit
  def measured_here(state, m, step):
    m, b_simple = controllers.with_noise_scale(state.noise, m, decay)
    # Only the noise state: recomputing it from the norms would fail on the missing fields.
    state, k = ctrl.update(state, controllers.Measurements(grad_stats=grad_stats, noise=m.noise),
                           step, jnp.float32(step * 1e3))
    return state, k, b_simple

  @jax.jit
  def recomputed(state, m, step):
    if name != "noise_scale":  # as the train step did before Measurements.noise
      state = state._replace(noise=controllers.with_noise_scale(state.noise, m, decay)[0].noise)
    return ctrl.update(state, m._replace(grad_stats=grad_stats), step, jnp.float32(step * 1e3))

  state_a = state_b = ctrl.init()
  for step, tr in enumerate([1000.0, 1000.0, 5000.0, 200.0, 20.0]):
    m = _noise_measurements(tr)
    state_a, k_a, b_simple = measured_here(state_a, m, jnp.int32(step))
    state_b, k_b = recomputed(state_b, m, jnp.int32(step))
    assert int(k_a) == int(k_b), step
    np.testing.assert_allclose(b_simple, noise_lib.noise_scale_value(state_a.noise), rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  assert int(state_a.noise.count) == 5
  if name == "noise_scale":
    assert int(state_a.num_microbatches) * 32 != 64  # the noise scale did move the batch


def test_fixed_controller_and_state_is_checkpointable():
  config = _config(controller="noise_scale", micro_batch_size=16, initial_batch_size=32,
                   **{"noise_scale.warmup_steps": 2})
  ctrl = controllers.make_controller(config)
  update = jax.jit(ctrl.update)
  trace_seq = np.linspace(100.0, 3000.0, 20)

  def run(state, start, stop):
    ks = []
    for step in range(start, stop):
      state, k = update(state, _noise_measurements(trace_seq[step]), jnp.int32(step),
                        jnp.float32(0))
      ks.append(int(k))
    return state, ks

  state, ks_a = run(ctrl.init(), 0, 10)
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  restored = jax.tree.unflatten(treedef, [np.asarray(x).copy() for x in leaves])  # as orbax
  final_a, ks_b = run(state, 10, 20)
  final_b, ks_c = run(restored, 10, 20)
  assert ks_b == ks_c and ks_b[-1] > ks_a[0]
  jax.tree.map(np.testing.assert_array_equal, final_a, final_b)

  fixed = controllers.make_controller(_config(controller="fixed", micro_batch_size=16,
                                     initial_batch_size=48))
  s = fixed.init()
  s2, k = jax.jit(fixed.update)(s, controllers.Measurements(), jnp.int32(0), jnp.float32(0))
  assert int(k) == 3 and not fixed.needs_sq_norms and not fixed.needs_grad_stats
  # All controllers share one state structure, so one checkpoint layout fits all.
  assert jax.tree.structure(s2) == jax.tree.structure(state)


def test_history_ring_buffer():
  h = controllers.history_init(3, 64)
  for step, size in [(5, 64), (7, 128), (9, 128), (11, 256), (13, 512), (20, 1024)]:
    h = jax.jit(controllers.history_record)(h, step, size)
  assert int(h.count) == 5
  assert controllers.history_entries(h) == [(11, 256), (13, 512), (20, 1024)]


def test_unknown_controller_and_bad_fields_raise():
  with pytest.raises(ValueError) as e:
    controllers.make_controller(_config(controller="linear"))
  msg = str(e.value)
  assert "config.batch_size.controller" in msg and "'linear'" in msg
  for name in config_lib.CONTROLLERS:
    assert name in msg
  with pytest.raises(ValueError, match=r"config.batch_size.initial_batch_size=40"):
    controllers.make_controller(_config(micro_batch_size=32, initial_batch_size=40))
  with pytest.raises(ValueError, match=r"config.batch_size.ramp.schedule"):
    controllers.make_controller(
        _config(controller="ramp", **{"ramp.schedule": ((10, 64), (5, 128))}))
  with pytest.raises(ValueError, match=r"config.batch_size.noise_scale.decay=1.0"):
    controllers.make_controller(_config(controller="noise_scale", **{"noise_scale.decay": 1.0}))
  # The block itself is accepted, as well as the root config.
  assert controllers.make_controller(config_lib.default_batch_size_config()).name == "fixed"
