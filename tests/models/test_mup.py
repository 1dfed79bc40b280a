"""μP (models/mup.py): leaf kinds, lr tables (Yang et al. 2022, Table 8), the factory hook, the
trainer hook and coordinate checks (Adam: μP flat, standard grows; LAMB: our trust-ratio rule)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from studies.yang2022_mup import study as mup_transfer
from train import trainer
from models import mup
from models import transformer
from optimizers import factory
from tests import testlib


def decoder(d_model=128, base=32, scan_layers=False, abstract=True, **kw):
  cfg = transformer.TransformerConfig(vocab_size=64, d_model=d_model, num_layers=2, num_heads=2,
                                      mlp_dim=2 * d_model, max_seq_len=16, base_d_model=base,
                                      parametrization="mup", scan_layers=scan_layers, **kw)
  make = lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  return cfg, (nnx.eval_shape(make) if abstract else make())


def logical_of(model):
  return mup.logical_axes(nnx.state(model, nnx.Param))


def leaf(tree, *path):
  for key in path:
    tree = tree[key]
  return tree


HIDDEN = [("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "wi"),
          ("mlp", "wg"), ("mlp", "wo")]
NORMS = [("attn_norm", "scale"), ("mlp_norm", "scale")]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_leaf_kinds_of_the_decoder(scan_layers):
  _, model = decoder(scan_layers=scan_layers)
  logical = logical_of(model)
  kind = lambda *p: mup.leaf_kind(leaf(logical, *p))
  assert kind("embed") == "input" and kind("unembed") == "output"
  assert kind("final_norm", "scale") == "input"
  block = ("blocks",) if scan_layers else ("blocks", 1)
  for p in HIDDEN:
    assert kind(*block, *p) == "hidden", p
  for p in NORMS:
    assert kind(*block, *p) == "input", p
  # Vectors without a residual-stream axis (a q bias, an output bias) are not matrices.
  assert mup.leaf_kind(("heads", "kv")) == "input" and mup.leaf_kind(("vocab",)) == "fixed"


def test_lr_tables_adam_sgd_trust_ratio():
  _, model = decoder()
  logical = logical_of(model)  # width_mult 4
  adam = mup.lr_multipliers(logical, 4.0, "adam")
  sgd = mup.lr_multipliers(logical, 4.0, "sgd")
  trust = mup.lr_multipliers(logical, 4.0, "trust_ratio")
  for p in HIDDEN:
    assert leaf(adam, "blocks", 0, *p) == 0.25  # Table 8: hidden Adam lr 1/fan_in
    assert leaf(sgd, "blocks", 0, *p) == 1.0  # Table 8: hidden SGD lr 1
    assert leaf(trust, "blocks", 0, *p) == 0.5  # 1/sqrt(m_in), models/mup.py
  for p in [("embed",), ("unembed",), ("final_norm", "scale"), ("blocks", 0, *NORMS[0])]:
    assert leaf(adam, *p) == 1.0 and leaf(trust, *p) == 1.0
    assert leaf(sgd, *p) == 4.0  # input: fan_out; output (with the 1/m multiplier): fan_in


def test_trust_ratio_optimizers_use_their_base_row_for_unadapted_leaves():
  _, model = decoder()
  logical = logical_of(model)
  opt = factory.default_optimizer_config()
  norm = ("blocks", 0, "attn_norm", "scale")
  opt.name = "lamb"
  assert leaf(mup.optimizer_lr_multipliers(opt, logical, 4.0), *norm) == 1.0  # Adam row
  opt.name = "lars"
  lars = mup.optimizer_lr_multipliers(opt, logical, 4.0)
  assert leaf(lars, *norm) == 4.0 and leaf(lars, "blocks", 0, "mlp", "wi") == 0.5  # SGD row
  opt.mask = "all"  # every leaf adapted: the trust-ratio row everywhere
  assert leaf(mup.optimizer_lr_multipliers(opt, logical, 4.0), *norm) == 1.0


def test_base_shapes_give_the_same_multipliers_as_the_scalar_width():
  _, model = decoder(d_model=128)
  _, base = decoder(d_model=32)
  logical = logical_of(model)
  shapes = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))
  axes = mup.axis_width_mults(shapes(model), shapes(base), logical)
  assert axes == {"vocab": 1.0, "embed": 4.0, "heads": 1.0, "kv": 4.0, "mlp": 4.0}
  for rule in ("adam", "sgd", "trust_ratio"):
    assert (mup.lr_multipliers(logical, axes, rule) == mup.lr_multipliers(logical, 4.0, rule))


def test_mup_init_is_the_decoder_init():
  cfg, model = decoder(abstract=False)
  logical = logical_of(model)
  params = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))
  standard = transformer.Transformer(dataclasses.replace(cfg, parametrization="standard"),
                                     rngs=nnx.Rngs(0))
  got = mup.mup_init(params(standard), logical, 4.0)
  jax.tree.map(np.testing.assert_array_equal, got, params(model))
  _, nonzero = decoder(abstract=False, readout_zero_init=False)  # Table 8: base width's std
  got = mup.mup_init(params(standard), logical, 4.0, zero_readout=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, params(nonzero))
  assert abs(float(jnp.std(params(nonzero)["unembed"])) * np.sqrt(32) - 1) < 0.05


def test_standard_parametrization_ignores_the_mup_fields():
  params = []
  for base, zero in ((32, True), (128, False)):
    cfg = transformer.TransformerConfig(vocab_size=64, d_model=64, num_layers=1, num_heads=2,
                                        mlp_dim=128, max_seq_len=16, base_d_model=base,
                                        readout_zero_init=zero)
    assert cfg.width_mult == 1.0  # no output multiplier
    model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
    params.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  jax.tree.map(np.testing.assert_array_equal, params[0], params[1])


def params_and_grads(seed=0):
  rng = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {"w": n(4, 4), "scale": n(4)}
  return params, [{"w": n(4, 4), "scale": n(4)} for _ in range(3)]


def run_opt(tx, params, grads, lr=0.1):
  state = tx.init(params)
  for g in grads:
    state.hyperparams["learning_rate"] = jnp.float32(lr)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, u


@pytest.mark.parametrize("name", factory.OPTIMIZERS)
def test_unit_multipliers_change_nothing(name):
  params, grads = params_and_grads()
  c = factory.default_optimizer_config()
  c.name = name
  ones = jax.tree.map(lambda _: 1.0, params)
  want, _ = run_opt(factory.make_optimizer(c), params, grads)
  got, _ = run_opt(factory.make_optimizer(c, lr_multipliers=ones), params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_multipliers_scale_the_step_but_not_the_weight_decay():
  params, grads = params_and_grads()
  m = {"w": 0.25, "scale": 3.0}
  lr, wd = 0.1, 0.5
  c = factory.default_optimizer_config()
  c.update(name="adamw", weight_decay=wd, mask="all")
  _, u = run_opt(factory.make_optimizer(c, lr_multipliers=m), params, grads[:1], lr)
  adam, _ = optax.scale_by_adam().update(grads[0], optax.scale_by_adam().init(params))
  for k in params:  # -lr (m ⊙ adam + λ x): lr·λ is the configured per-step decay
    np.testing.assert_allclose(u[k], -lr * (m[k] * adam[k] + wd * params[k]), rtol=1e-5)
  c.update(name="sgd", momentum=0.0)
  _, u = run_opt(factory.make_optimizer(c, lr_multipliers=m), params, grads[:1], lr)
  for k in params:
    np.testing.assert_allclose(u[k], -lr * (m[k] * grads[0][k] + wd * params[k]), rtol=1e-5)
  c.update(name="lamb")  # after the trust ratio: the whole step scales
  _, want = run_opt(factory.make_optimizer(c), params, grads[:1], lr)
  _, u = run_opt(factory.make_optimizer(c, lr_multipliers=m), params, grads[:1], lr)
  for k in params:
    np.testing.assert_allclose(u[k], m[k] * want[k], rtol=1e-5)


@pytest.mark.parametrize("parametrization", ["standard", "mup"])
def test_trainer_setup_builds_the_mup_optimizer(parametrization):
  """The sweep driver only sets config.model.parametrization; setup() must do the rest."""
  config = testlib.tiny_config(**{"model.parametrization": parametrization,
                                  "model.base_d_model": 16, "optimizer.weight_decay": 0.0})
  s = trainer.setup(config)
  params = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, a.dtype), s.abstract_state["params"])
  grads = jax.tree.map(jnp.ones_like, params)
  plain = factory.make_optimizer(config.optimizer)

  def step(tx):
    opt_state = tx.init(params)
    opt_state.hyperparams["learning_rate"] = jnp.float32(1e-3)
    return tx.update(grads, opt_state, params)[0]
  got, want = step(s.tx), step(plain)
  expected = 16 / 64 if parametrization == "mup" else 1.0  # tiny: d_model 64
  ratio = lambda *p: float(jnp.mean(leaf(got, *p) / leaf(want, *p)))
  assert ratio("blocks", 0, "mlp", "wi") == pytest.approx(expected, rel=1e-5)
  assert ratio("blocks", 1, "attn", "o") == pytest.approx(expected, rel=1e-5)
  assert ratio("embed") == pytest.approx(1.0) and ratio("unembed") == pytest.approx(1.0)


# Coordinate checks (mup README's "coord check"): mean |x| of every layer after 5 steps at
# widths 64 and 1024; small shapes: compiling dominates (one jit per width).
COORD = dict(steps=5, mlp_ratio=1, batch_size=2, seq_len=16, base_d_model=64)
WIDTHS = (64, 1024)


def test_coord_check_adam_mup_is_flat_and_standard_grows():
  mup_spread = mup_transfer.spread(mup_transfer.coord_check("mup", WIDTHS, lr=1e-2, **COORD))
  assert max(mup_spread.values()) < 2.0, mup_spread
  sp = mup_transfer.coord_check("standard", WIDTHS, lr=1e-2, **COORD)
  sp_spread = mup_transfer.spread(sp)
  for layer in ("block0.mlp", "block1.out"):  # hidden outputs grow with width (~100x here)
    assert sp_spread[layer] > 10.0 and sp[1024][layer][-1] > sp[64][layer][-1], sp_spread


def test_coord_check_lamb_needs_the_trust_ratio_rule():
  """models/mup.py: after LAMB's trust ratio, hidden matrices need 1/sqrt(m_in); without it
  activations grow with width (Adam's 1/m_in instead makes them shrink: rule='adam')."""
  run = lambda rule: mup_transfer.coord_check("mup", WIDTHS, lr=0.02, optimizer="lamb",
                                              rule=rule, **COORD)
  ours = run(None)
  assert max(mup_transfer.spread(ours).values()) < 2.0, mup_transfer.spread(ours)
  skipped = run("none")
  grows = {k: skipped[1024][k][-1] / skipped[64][k][-1] for k in skipped[64]}
  assert max(grows.values()) > 2.0, grows


def test_coordinate_check_plot_and_table(tmp_path):
  results = {"mup": {64: {"embed": [1.0, 1.1], "logits": [0.0, 2.0]},
                     128: {"embed": [1.0, 1.2], "logits": [0.0, 2.2]}}}
  text = mup_transfer.coord_check_markdown(results)
  assert "| logits | 2 | 2.2 | 1.10 |" in text
  mup_transfer.plot_coord_check(results, str(tmp_path / "c.png"))
  assert (tmp_path / "c.png").stat().st_size > 1000
  sweep = {"standard": {32: {0.01: 3.0, 0.02: 2.5, 0.04: float("nan")},
                        64: {0.01: 2.4, 0.02: 2.6, 0.04: 2.9}}}
  table = mup_transfer.transfer_markdown(sweep, [0.01, 0.02, 0.04])
  assert "| 32 | 3.000 | **2.500** | div | 0.02 |" in table
  assert "argmin moves by 1 grid step(s)" in table
  mup_transfer.plot_transfer(sweep, str(tmp_path / "t.png"))
  assert (tmp_path / "t.png").stat().st_size > 1000
