"""Schedules vs the papers' formulas (docs/papers.md §2.2-2.3, §5, §6, §9.4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optimizers import schedules as S

SEQ = 4096  # tokens per sequence in the IBM config (docs/papers.md §2.3)


def val(x):
  return float(np.asarray(x))


@pytest.mark.parametrize("tokens,expected", [(1e10, 0.02), (3e10, 0.018579), (1e11, 0.010054),
                                             (1e12, 0.0031071), (2e12, 0.0021819)])
def test_power_vectors(tokens, expected):
  np.testing.assert_allclose(val(S.power(tokens, 1024)), expected, rtol=1e-4)


def test_power_vector_levanter_a():
  np.testing.assert_allclose(val(S.power(1e12, 1024, a=4.6)), 0.0035732, rtol=1e-4)


def test_power_proportional_to_batch_size():
  n = jnp.array([2e11, 1e12, 5e12])  # 2048·4·n^-0.51 < 0.02 needs n > 1.1e11
  np.testing.assert_allclose(S.power(n, 2048) / S.power(n, 1024), 2.0, rtol=1e-6)
  assert val(S.power(1e9, 2048)) == pytest.approx(0.02)  # capped by lr_max


def test_power_independent_of_planned_length():
  n = jnp.linspace(1e9, 8e11, 50)
  free = S.power(n, 1024, warmup_tokens=5e9)
  for end in (1e12, 3e12):  # decay over the last 10% of two different run lengths
    planned = S.power(n, 1024, warmup_tokens=5e9, decay_start_tokens=0.9 * end,
                      decay_tokens=0.1 * end)
    np.testing.assert_array_equal(planned, free)


def test_power_batch_size_change_mid_run():
  """Tokens are the real history; the current β sets the level (Eq. 7 evaluated as is)."""
  tokens = 20000 * 512 * SEQ + 5000 * 1024 * SEQ  # 20k steps at β=512, then 5k at β=1024
  expected = min(0.02, 1024 * 4.0 * tokens ** -0.51)
  np.testing.assert_allclose(val(S.power(tokens, 1024)), expected, rtol=1e-5)
  assert expected < 0.02  # in the power-law regime, so β matters
  np.testing.assert_allclose(val(S.power(tokens, 1024)) / val(S.power(tokens, 512)), 2.0,
                             rtol=1e-6)


def test_power_warmup_and_decay_shape():
  kw = dict(warmup_tokens=1e10, decay_start_tokens=9e11, decay_tokens=1e11)
  eta = lambda n: min(0.02, 1024 * 4.0 * n ** -0.51)
  np.testing.assert_allclose(val(S.power(0.0, 1024, **kw)), 0.0)
  np.testing.assert_allclose(val(S.power(2.5e9, 1024, **kw)), 0.25 * eta(1e10), rtol=1e-5)
  np.testing.assert_allclose(val(S.power(9.5e11, 1024, **kw)), 0.01 ** 0.5 * eta(9e11),
                             rtol=1e-4)
  np.testing.assert_allclose(val(S.power(1e12, 1024, **kw)), 0.01 * eta(9e11), rtol=1e-4)
  lin = S.power(9.5e11, 1024, decay="linear", decay_final_ratio=0.0, **kw)
  np.testing.assert_allclose(val(lin), 0.5 * eta(9e11), rtol=1e-4)
  n = jnp.linspace(1e10, 1.1e12, 400)
  assert np.all(np.diff(np.asarray(S.power(n, 1024, **kw))) <= 1e-9)  # non-increasing


def _boundary_gaps(fn, boundaries, peak):
  """|lr(b + δ) − lr(b − δ)| / peak at each boundary b (δ small, positions as floats)."""
  return [abs(val(fn(b + 1e-3)) - val(fn(b - 1e-3))) / peak for b in boundaries]


@pytest.mark.parametrize("name,fn,boundaries,peak", [
    ("power", lambda t: S.power(t * 1e8, 1024, warmup_tokens=3e10, decay_start_tokens=5e11,
                                decay_tokens=1e11), [300.0, 5000.0, 6000.0], 0.02),
    ("wsd-linear", lambda s: S.wsd(s, peak=1.0, warmup_steps=10, stable_steps=50,
                                   decay_steps=40), [10.0, 60.0, 100.0], 1.0),
    ("wsd-cosine", lambda s: S.wsd(s, peak=1.0, warmup_steps=10, stable_steps=50, decay_steps=40,
                                   decay_shape="cosine", final_lr=0.1), [10.0, 60.0, 100.0], 1.0),
    ("wsd-1-sqrt", lambda s: S.wsd(s, peak=1.0, warmup_steps=10, stable_steps=50,
                                   decay_steps=40, decay_shape="1-sqrt"), [10.0, 100.0], 1.0),
    ("warmup_poly", lambda s: S.warmup_poly(s, peak=1.0, warmup_steps=10, total_steps=100,
                                            power=2.0), [10.0, 100.0], 1.0),
    ("cosine", lambda s: S.cosine(s, peak=1.0, warmup_steps=10, total_steps=100), [10.0, 100.0],
     1.0),
    ("linear", lambda s: S.linear(s, peak=1.0, warmup_steps=10, total_steps=100), [10.0, 100.0],
     1.0),
    ("constant", lambda s: S.constant(s, peak=1.0, warmup_steps=10), [10.0], 1.0),
])
def test_continuous_at_phase_boundaries(name, fn, boundaries, peak):
  assert max(_boundary_gaps(fn, boundaries, peak)) < 2e-3, name


def test_wsd_values_and_shapes():
  kw = dict(peak=2.0, warmup_steps=10, stable_steps=50, decay_steps=40)
  assert val(S.wsd(0, **kw)) == 0.0
  assert val(S.wsd(5, **kw)) == pytest.approx(1.0)
  assert val(S.wsd(30, **kw)) == 2.0
  mid = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - np.sqrt(0.5)}
  for shape, s in mid.items():
    np.testing.assert_allclose(val(S.wsd(80, decay_shape=shape, final_lr=0.2, **kw)),
                               0.2 + 1.8 * s, rtol=1e-6)
    np.testing.assert_allclose(val(S.wsd(100, decay_shape=shape, final_lr=0.2, **kw)), 0.2)
    np.testing.assert_allclose(val(S.wsd(500, decay_shape=shape, final_lr=0.2, **kw)), 0.2)
  np.testing.assert_allclose(val(S.wsd(70, decay_shape="cosine", **kw)),
                             np.cos(np.pi * 0.25) + 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="1-sqrt"):
    S.wsd(0, decay_shape="exp", **kw)


def test_wsd_branches_decay_from_any_stable_step():
  """One compiled fn, decay_start as a runtime value: a cooldown branched at step k."""
  kw = dict(peak=1.0, warmup_steps=10, stable_steps=1000, decay_steps=20)
  traces = []

  @jax.jit
  def f(step, start):
    traces.append(1)
    return S.wsd(step, decay_start=start, **kw)

  for k in (30, 200, 700):
    assert val(f(k, k)) == 1.0
    np.testing.assert_allclose(val(f(k + 10, k)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(val(f(k + 20, k)), 0.0, atol=1e-7)
    assert val(f(k + 10, 10 ** 6)) == 1.0  # the main run keeps its stable phase
  assert len(traces) == 1


def test_warmup_poly_bert_recipe_and_rewarmup():
  kw = dict(peak=1.0, warmup_steps=10, total_steps=110, end_lr=0.0)
  np.testing.assert_allclose(val(S.warmup_poly(5, **kw)), 0.5)
  np.testing.assert_allclose(val(S.warmup_poly(60, **kw)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(val(S.warmup_poly(60, power=2.0, **kw)), 0.25, rtol=1e-6)
  np.testing.assert_allclose(val(S.warmup_poly(110, **kw)), 0.0, atol=1e-7)
  # second phase (LAMB 64k/32k: re-warm from 0 at the phase start, then decay again)
  phase2 = dict(kw, phase_start=110)
  assert val(S.warmup_poly(110, **phase2)) == 0.0
  np.testing.assert_allclose(val(S.warmup_poly(115, **phase2)), 0.5)
  np.testing.assert_allclose(val(S.warmup_poly(170, **phase2)), 0.5, rtol=1e-6)


def test_cosine_linear_constant():
  kw = dict(peak=1.0, warmup_steps=10, total_steps=110, final_lr=0.1)
  np.testing.assert_allclose(val(S.cosine(60, **kw)), 0.55, rtol=1e-6)
  np.testing.assert_allclose(val(S.cosine(35, **kw)), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)),
                             rtol=1e-6)
  np.testing.assert_allclose(val(S.linear(85, **kw)), 0.1 + 0.9 * 0.25, rtol=1e-6)
  np.testing.assert_allclose(val(S.linear(1000, **kw)), 0.1)
  np.testing.assert_allclose(val(S.cosine(5, **kw)), 0.5)
  assert val(S.constant(3, peak=0.3, warmup_steps=6)) == pytest.approx(0.15)
  assert val(S.constant(3, peak=0.3)) == pytest.approx(0.3)


def test_schedules_jit_once_for_all_positions():
  traces = []

  @jax.jit
  def all_schedules(step, tokens, batch_size):
    traces.append(1)
    return jnp.stack([
        S.power(tokens, batch_size, warmup_tokens=1e9, decay_start_tokens=1e12, decay_tokens=1e11),
        S.wsd(step, peak=1.0, warmup_steps=10, stable_steps=50, decay_steps=40),
        S.warmup_poly(step, peak=1.0, warmup_steps=10, total_steps=100),
        S.cosine(step, peak=1.0, warmup_steps=10, total_steps=100),
        S.linear(step, peak=1.0, warmup_steps=10, total_steps=100),
        S.constant(step, peak=1.0, warmup_steps=10),
        S.batch_size_lr(1.0, batch_size, 256, "sqrt"),
    ])

  for step in (0, 5, 50, 95, 300):
    out = all_schedules(jnp.int32(step), jnp.float32(step * 4e9), jnp.float32(256 * (1 + step)))
    assert np.all(np.isfinite(out))
  assert len(traces) == 1


@pytest.mark.parametrize("rule,p", [("none", 0.0), ("sqrt", 0.5), ("linear", 1.0), (0.75, 0.75),
                                    ("0.25", 0.25)])
def test_batch_size_lr(rule, p):
  np.testing.assert_allclose(val(S.batch_size_lr(1e-3, 4096, 256, rule)), 1e-3 * 16 ** p,
                             rtol=1e-6)


def test_batch_size_lr_hoffer_sqrt():
  """Hoffer et al. `--lr_bb_fix`: lr = lr0 * (B/128)^0.5 (docs/papers.md §6)."""
  np.testing.assert_allclose(val(S.batch_size_lr(0.1, 512, 128, "sqrt")), 0.2, rtol=1e-6)
  with pytest.raises(ValueError, match="sqrt"):
    S.batch_size_lr(0.1, 512, 128, "cuberoot")
