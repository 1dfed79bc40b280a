"""make_optimizer, learning_rate_fn, AdaGrad(Norm) vs NumPy (Lau et al. 2024; docs/papers.md §3)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optimizers import factory, schedules
from optimizers.adagrad import adagrad, adagrad_norm
from optimizers.lamb import lamb


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"layers": {"mlp": {"kernel": n(2, 4, 6), "bias": n(2, 6)}, "norm": {"scale": n(2, 4)}},
          "head": {"kernel": n(4, 3)}}


def grads_seq(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
          for _ in range(steps)]


def opt_config(**overrides):
  c = factory.default_optimizer_config()
  c.update(overrides)
  return c


def sched_config(**overrides):
  c = factory.default_schedule_config()
  c.update(overrides)
  return c


def run(opt, params, grads, lr):
  """Trainer-style use: lr written into the injected hyperparams each step."""
  state = opt.init(params)
  for g in grads:
    state.hyperparams["learning_rate"] = jnp.float32(lr)
    u, state = opt.update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, u, state


@pytest.mark.parametrize("name", factory.OPTIMIZERS)
def test_every_optimizer_builds_and_takes_runtime_lr(name):
  params = make_params()
  opt = factory.make_optimizer(opt_config(name=name))
  state = opt.init(params)
  assert set(state.hyperparams) == {"learning_rate"}
  assert float(state.hyperparams["learning_rate"]) == 0.0
  g = grads_seq(params, 1)[0]
  u0, _ = opt.update(g, state, params)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u0))
  _, u, _ = run(opt, params, [g], 0.1)
  assert all(float(jnp.max(jnp.abs(x))) > 0.0 for x in jax.tree.leaves(u))


def test_unknown_names_are_rejected_with_the_field():
  with pytest.raises(ValueError, match=r"config\.optimizer\.name='adam'.*lamb"):
    factory.make_optimizer(opt_config(name="adam"))
  with pytest.raises(ValueError, match=r"config\.schedule\.name='step'.*warmup_poly"):
    factory.learning_rate_fn(sched_config(name="step"))
  with pytest.raises(ValueError, match=r"config\.optimizer\.mask"):
    factory.make_optimizer(opt_config(mask="nobias"))
  with pytest.raises(ValueError, match=r"config\.optimizer\.phi_clip"):
    factory.make_optimizer(opt_config(name="lamb", phi_clip=(2.0, 1.0)))
  with pytest.raises(ValueError, match=r"config\.schedule\.batch_size_rule"):
    factory.learning_rate_fn(sched_config(batch_size_rule="cubic"))


def test_lamb_from_config_matches_direct_call():
  params = make_params()
  axes = {"layers": jax.tree.map(lambda _: 0, params["layers"]), "head": {"kernel": None}}
  grads = grads_seq(params, 3)
  c = opt_config(name="lamb", phi_clip=(0.1, 2.0), bias_correction=False)
  got, _, _ = run(factory.make_optimizer(c, layer_axis=axes), params, grads, 0.01)
  want, _, _ = run(optax.inject_hyperparams(lamb)(
      learning_rate=0.0, layer_axis=axes, phi_clip=(0.1, 2.0), bias_correction=False),
      params, grads, 0.01)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # b1 etc. injected as f32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grad_clip_norm():
  params = make_params()
  g = jax.tree.map(lambda x: 100.0 * x, grads_seq(params, 1)[0])
  opt = factory.make_optimizer(opt_config(name="sgd", momentum=0.0, grad_clip_norm=1.0))
  _, u, _ = run(opt, params, [g], 1.0)
  np.testing.assert_allclose(float(optax.global_norm(u)), 1.0, rtol=1e-5)


def test_adagrad_matches_numpy():
  """b²_{k,j} = b²_{k-1,j} + g²_{k,j}, x_j -= α g_j / b_{k,j}, b²_0 = 1e-2."""
  params = make_params()
  grads = grads_seq(params, 4)
  got, _, _ = run(optax.inject_hyperparams(adagrad)(learning_rate=0.0), params, grads, 0.3)
  for key, x in (("head", params["head"]["kernel"]),):
    x, b2 = np.asarray(x, np.float64), np.full(x.shape, 1e-2)
    for g in grads:
      gk = np.asarray(g[key]["kernel"], np.float64)
      b2 += gk ** 2
      x = x - 0.3 * gk / np.sqrt(b2)
    np.testing.assert_allclose(got[key]["kernel"], x, rtol=1e-5)


def test_adagrad_norm_matches_numpy():
  """One scalar b² += ‖g‖² over all leaves; x -= α g / b (b0 = 0.1)."""
  params = make_params()
  grads = grads_seq(params, 4)
  got, _, state = run(optax.inject_hyperparams(adagrad_norm)(learning_rate=0.0), params, grads,
                      0.3)
  x = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
  b2 = 0.1 ** 2
  for g in grads:
    gl = [np.asarray(t, np.float64) for t in jax.tree.leaves(g)]
    b2 += sum(np.sum(t ** 2) for t in gl)
    x = [xi - 0.3 * gi / np.sqrt(b2) for xi, gi in zip(x, gl)]
  for a, b in zip(jax.tree.leaves(got), x):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(float(state.inner_state[0].b_squared), b2, rtol=1e-5)


def _fn_args(step):
  return jnp.int32(step), jnp.float32(step * 1e9), jnp.float32(512)


@pytest.mark.parametrize("name,direct", [
    ("power", lambda s, t, bs: schedules.power(t, bs, a=4.6, b=-0.5, lr_max=0.02,
                                               warmup_tokens=5e9)),
    ("wsd", lambda s, t, b: schedules.wsd(s, peak=1e-3, warmup_steps=10, stable_steps=50,
                                          decay_steps=40, decay_shape="1-sqrt")),
    ("warmup_poly", lambda s, t, b: schedules.warmup_poly(s, peak=1e-3, warmup_steps=10,
                                                          total_steps=100, power=2.0)),
    ("cosine", lambda s, t, b: schedules.cosine(s, peak=1e-3, warmup_steps=10, total_steps=100)),
    ("linear", lambda s, t, b: schedules.linear(s, peak=1e-3, warmup_steps=10, total_steps=100)),
    ("constant", lambda s, t, b: schedules.constant(s, peak=1e-3, warmup_steps=10)),
])
def test_learning_rate_fn_matches_schedules(name, direct):
  c = sched_config(name=name, peak_lr=1e-3, warmup_steps=10, total_steps=100, stable_steps=50,
                   decay_steps=40, decay_shape="1-sqrt", poly_power=2.0, warmup_tokens=5e9,
                   a=4.6, b=-0.5, lr_max=0.02)  # a, b, lr_max: PowerSchedulerFit's keys
  fn = jax.jit(factory.learning_rate_fn(c))
  for step in (0, 5, 30, 80, 150):
    np.testing.assert_allclose(float(fn(*_fn_args(step))), float(direct(*_fn_args(step))),
                               rtol=1e-6)


def test_learning_rate_fn_batch_size_rule():
  fn = factory.learning_rate_fn(sched_config(name="constant", peak_lr=0.1,
                                             batch_size_rule="sqrt", base_batch_size=256))
  np.testing.assert_allclose(float(fn(0, 0.0, 1024)), 0.2, rtol=1e-6)
  with pytest.raises(ValueError, match="base_batch_size"):
    factory.learning_rate_fn(sched_config(batch_size_rule="linear"))
  with pytest.raises(ValueError, match="proportional to batch_size"):
    factory.learning_rate_fn(sched_config(name="power", batch_size_rule="sqrt",
                                          base_batch_size=256))


def test_configs_hold_every_field_and_accept_overrides():
  o, s = factory.default_optimizer_config(), factory.default_schedule_config()
  for field in ("name", "b1", "b2", "eps", "weight_decay", "bias_correction", "phi_clip",
                "momentum", "nesterov", "trust_coefficient", "initial_accumulator", "b0", "mask",
                "adaptation_mask", "grad_clip_norm"):
    assert field in o, field
  o.grad_clip_norm, o.phi_clip, o.eps = 1.0, (0.0, 10.0), 1e-6  # None placeholders are typed
  s.decay_start, s.decay_start_tokens, s.base_batch_size = 500, 9e11, 256
  with pytest.raises(TypeError):
    o.b1 = "high"


@pytest.mark.parametrize("name", factory.OPTIMIZERS)
def test_validate_optimizer_accepts_the_defaults(name):
  factory.validate_optimizer(opt_config(name=name))


@pytest.mark.parametrize("name,field,value,valid", [
    ("adamw", "b1", -0.1, "in [0, 1)"), ("adamw", "b2", 1.5, "in [0, 1)"),
    ("lamb", "b2", 1.0, "in [0, 1)"), ("adamw", "eps", 0.0, "> 0"),
    ("lamb", "eps", float("nan"), "> 0"), ("adamw", "weight_decay", -1.0, ">= 0"),
    ("lamb", "weight_decay", float("inf"), ">= 0"), ("lars", "weight_decay", -1e-4, ">= 0"),
    ("sgd", "weight_decay", -1.0, ">= 0"), ("lars", "eps", -1.0, ">= 0"),
    ("lars", "trust_coefficient", 0.0, "> 0"), ("lars", "momentum", 1.0, "in [0, 1)"),
    ("sgd", "momentum", -0.5, "in [0, 1)"), ("adagrad", "initial_accumulator", 0.0, "> 0"),
    ("adagrad_norm", "b0", -0.1, "> 0"), ("adamw", "grad_clip_norm", float("nan"), "> 0"),
])
def test_validate_optimizer_names_the_field(name, field, value, valid):
  with pytest.raises(ValueError) as raised:
    factory.validate_optimizer(opt_config(name=name, **{field: value}))
  line = str(raised.value)
  assert "\n" not in line and line.startswith(f"config.optimizer.{field}={value!r}: ") \
      and valid in line, line


@pytest.mark.parametrize("name", factory.SCHEDULES)
def test_validate_schedule_accepts_the_defaults_and_a_peak_of_one(name):
  c = factory.default_schedule_config()
  c.name = name
  c.peak_lr = 1.0  # sweeps: the lr is the trainer's runtime lr_scale
  factory.validate_schedule(c, num_steps=c.total_steps)


@pytest.mark.parametrize("overrides,num_steps,field", [
    (dict(peak_lr=-0.003), None, "peak_lr=-0.003"), (dict(peak_lr=float("nan")), None, "peak_lr=nan"),
    (dict(peak_lr=0.0), None, "peak_lr=0.0"), (dict(final_lr=-1e-5), None, "final_lr"),
    (dict(warmup_steps=-1), None, "warmup_steps=-1"),
    (dict(warmup_steps=1000, total_steps=20), None, "warmup_steps=1000"),
    (dict(warmup_steps=100), 20, "warmup_steps=100"),
    (dict(total_steps=0), None, "total_steps=0"),
    (dict(name="wsd", decay_steps=-5), None, "decay_steps=-5"),
    (dict(name="warmup_poly", poly_power=0.0), None, "poly_power=0.0"),
    (dict(name="power", lr_max=-1.0), None, "lr_max=-1.0"),
    (dict(name="power", decay_final_ratio=0.0), None, "decay_final_ratio=0.0"),
])
def test_validate_schedule_names_the_field(overrides, num_steps, field):
  c = factory.default_schedule_config()
  c.update(overrides)
  with pytest.raises(ValueError) as raised:
    factory.validate_schedule(c, num_steps=num_steps)
  line = str(raised.value)
  assert "\n" not in line and line.startswith(f"config.schedule.{field}"), line
