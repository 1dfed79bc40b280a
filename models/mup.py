"""μP, the Maximal Update Parametrization (Yang et al. 2022, Tensor Programs V, arXiv 2203.03466).

Generic: everything here works from a params pytree, the logical axis names of each leaf (the
names the models already give for sharding) and a width multiplier `width_mult = d / d_base`.
The decoder LM (`models/transformer.py`) and any other model that uses the same logical names
(`embed` for the residual stream, `mlp`, `heads`, `kv` for hidden widths, `vocab`, `length`,
`layers` for fixed ones) gets μP from the same code.

Which leaf is which (TP5 Table 3: "input weights" map a finite dimension to an infinite
one, "output weights" an infinite one to a finite one, "hidden weights" infinite to infinite):
  * `layers` axes are dropped (a scanned stack is one weight per layer).
  * fan-in axes: none for vectors and for leaves without an `embed` axis (biases, norm gains);
    the leading `embed` if the leaf starts with it ([embed, mlp], [embed, heads, kv],
    [embed, vocab]); else the axes before the first `embed` ([vocab, embed], [mlp, embed],
    [heads, kv, embed]).
    The other axes are fan-out.
  * a group of axes is "infinite" if it holds one of WIDTH_AXES; its multiplier is `width_mult`
    (all widths grow with d_model, TP5's single n), or, if `width_mult` is a dict
    {axis name: d/d_base}, the product over its axes (see `axis_width_mults`, mup's base shapes).

  kind      fan-in  fan-out  examples
  input     finite  inf      token/position embeddings, all biases, norm gains ("input weights
                             & all biases", one column in Tables 3 and 8)
  hidden    inf     inf      q, k, v, o, MLP in/out kernels
  output    inf     finite   readout [embed, vocab]
  fixed     finite  finite   e.g. an output bias [vocab]: nothing scales

We use the formulation of TP5 Table 8 (the equivalent form with an output multiplier, the one
the `mup` package implements): the readout's forward pass carries the multiplier 1/width_mult,
which turns Table 3's output-weight rules (init var 1/fan_in², Adam lr 1/fan_in, SGD lr
1/fan_in) into a width-independent init, Adam lr ×1 and SGD lr ×fan_in. Relative to the
base-width model, with m_in / m_out the fan-in / fan-out width multipliers of a leaf:

                 input    hidden         output
  init std       ×1       ×1             ×sqrt(m_in), or zero
  forward mult   1        1              1/m_in  (the model: logits / width_mult)
  Adam lr        ×1       ×1/m_in        ×1      (Table 8; mup.MuAdam)
  SGD lr         ×m_out   ×m_out/m_in    ×m_in   (Table 8; mup.MuSGD)
  trust ratio    ×1       ×1/sqrt(m_in)  ×1      (LAMB, LARS: derived below)
plus attention logits q·k/d_head instead of q·k/sqrt(d_head) (`models/layers.py`; the mup
README's `query @ key.T * 8 / d`). Init std is relative to the standard init: 1/sqrt(fan_in)
for matrices, a fixed std for embeddings (fan_in = vocab is finite), which are already μP, so
only the readout changes: to the base model's std (Table 8), or to zero as the decoder does
(mup's `readout_zero_init`); `mup_init` converts a standard-initialised model. "Hidden
×m_out/m_in" for SGD is mup.MuSGD's refinement of Table 8's 1 (equal when fan-in and fan-out
widths grow together).

Adam-type optimizers (adamw, adagrad: per-coordinate normalised) use the Adam row, SGD-type
ones (sgd, adagrad_norm: the step is proportional to the gradient) the SGD row (mup's docstring:
"Adam-like ... normalizing the gradient entrywise" vs "SGD-like"). Weight decay is left out of
the multipliers (`optimizers.factory`): lr·λ, the per-step shrink, is what the config sets at
every width, as in mup.MuAdam/MuSGD, which divide λ by the lr multiplier. Two caveats the
coordinate check shows: AdaGrad is only Adam-like when Σg² dominates its initial accumulator
b0², and μP gradients shrink with width (readout, embeddings ∝ 1/width_mult), so the default
b0² = 1e-2 makes the readout's step SGD-like at large width (logits 17× smaller at 16× width
after 5 steps; flat with b0² = 1e-12), the ε issue of Everett et al. 2024, "Scaling exponents
across parameterizations and optimizers". AdaGradNorm's single normaliser ‖g‖ mixes layers whose
gradient norms scale differently, so its SGD row holds only once hidden layers dominate ‖g‖.

Trust-ratio optimizers (LAMB, LARS). For each adapted layer they set ‖Δx‖ = η‖x‖ (Frobenius
norm; times the trust coefficient for LARS), whatever the scale of the inner direction. So:
  1. A multiplier on the gradient or on LAMB's inner Adam direction is undone: the ratio
     φ(‖x‖)/‖u‖ is invariant to rescaling u. Adam's 1/m_in applied before the ratio does
     nothing. Applied after it, it would be double-counting only if the ratio already gave
     μP's width scaling, and it does not (2).
  2. The ratio makes the relative *Frobenius* update width-independent, but μP needs the
     relative *spectral* update to be Θ(1) (Yang, Simon, Bernstein 2023, "A spectral condition
     for feature learning"). A hidden W (entries of variance 1/fan_in) has ‖W‖_F =
     sqrt(fan_out) but a Θ(1) spectral norm, while a step is low-rank (outer products of
     activations and gradients; an Adam step of a rank-1 gradient is sign(a)sign(b)ᵀ), so
     ‖ΔW‖_F ≈ ‖ΔW‖_2. LAMB's ‖ΔW‖_2 ≈ η·sqrt(fan_out) against μP's sqrt(fan_out/fan_in):
     hidden matrices need the extra factor 1/sqrt(m_in). Input weights, norm gains and biases
     (Θ(1) entries, so ‖x‖_F ∝ sqrt(n); μP's step is Θ(η) per entry, also ∝ sqrt(n)) and the
     readout behind its 1/m_in multiplier come out right at ×1: there the ratio is already μP.
So for lamb and lars this module gives hidden matrices ×1/sqrt(m_in) and the other adapted
leaves ×1, applied after the trust ratio (`optimizers.factory`). Leaves the optimizer does not
adapt (`config.optimizer.mask`; by default biases and norms) take the plain inner step and get
their base optimizer's row: Adam for LAMB, SGD for LARS. Init, the 1/d attention and the
1/width_mult output multiplier apply as for any optimizer. A coordinate check
(`studies.yang2022_mup.study.coord_check`, asserted in tests/models/test_mup.py) backs this:
under LAMB with these multipliers every layer stays within 1.4× from width 64 to 1024 after 5
steps; with none, some layers grow 3.8×; with Adam's table after the ratio, some shrink to
0.5×. It is our derivation, not a table of TP5, which covers SGD- and Adam-type optimizers.
Zero readout: ‖x‖ = 0 makes the first step the inner step (ratio 1). For LAMB that is an Adam
step, already μP; for LARS it is a plain SGD step, whose size ∝ 1/width_mult the trust ratio
then preserves (logits 167× smaller at 16× width after 5 steps). So use LARS with
`readout_zero_init=False` in the model config (the base width's init std, TP5 Table 8).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

WIDTH_AXES = frozenset({"embed", "mlp", "heads", "kv"})
KINDS = ("input", "hidden", "output", "fixed")
# config.optimizer.name -> which table of lr multipliers (module docstring).
OPTIMIZER_RULES = {"adamw": "adam", "adagrad": "adam", "sgd": "sgd", "adagrad_norm": "sgd",
                   "lamb": "trust_ratio", "lars": "trust_ratio"}
# What a trust-ratio optimizer does to the leaves it does not adapt.
_UNADAPTED_RULE = {"lamb": "adam", "lars": "sgd"}

WidthMult = float | Mapping[str, float]


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def logical_axes(params_state) -> Any:
  """Pure-dict pytree of logical-name tuples from an nnx params State (real or abstract)."""
  specs = nnx.to_pure_dict(nnx.get_partition_spec(params_state))
  return jax.tree.map(lambda v: tuple(v.get_value()) if hasattr(v, "get_value") else tuple(v),
                      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def fan_axes(names) -> tuple[tuple, tuple]:
  """(fan-in names, fan-out names) of a leaf from its logical axis names (module docstring)."""
  names = tuple(n for n in names if n != "layers")
  if "embed" not in names or len(names) == 1:
    return (), names
  i = names.index("embed")
  split = 1 if i == 0 else i
  return names[:split], names[split:]


def _group_mult(group, width_mult: WidthMult) -> float:
  if isinstance(width_mult, Mapping):
    return math.prod(float(width_mult.get(n, 1.0)) for n in group)
  return float(width_mult) if any(n in WIDTH_AXES for n in group) else 1.0


def leaf_kind(names) -> str:
  """'input' | 'hidden' | 'output' | 'fixed' from logical axis names (TP5 Sec. 5)."""
  fan_in, fan_out = fan_axes(names)
  inf_in = any(n in WIDTH_AXES for n in fan_in)
  inf_out = any(n in WIDTH_AXES for n in fan_out)
  return {(False, True): "input", (True, True): "hidden", (True, False): "output",
          (False, False): "fixed"}[(inf_in, inf_out)]


def fan_mults(names, width_mult: WidthMult) -> tuple[float, float]:
  """(m_in, m_out): fan-in and fan-out width multipliers of one leaf."""
  fan_in, fan_out = fan_axes(names)
  return _group_mult(fan_in, width_mult), _group_mult(fan_out, width_mult)


def leaf_lr_multiplier(names, width_mult: WidthMult, rule: str) -> float:
  """One leaf's lr multiplier for rule 'adam' | 'sgd' | 'trust_ratio' (module docstring table)."""
  kind = leaf_kind(names)
  m_in, m_out = fan_mults(names, width_mult)
  if rule == "adam":  # TP5 Table 8, Adam LR row
    return 1.0 / m_in if kind == "hidden" else 1.0
  if rule == "sgd":  # TP5 Table 8, SGD LR row (hidden: mup.MuSGD's fan_out/fan_in)
    return {"input": m_out, "hidden": m_out / m_in, "output": m_in, "fixed": 1.0}[kind]
  if rule == "trust_ratio":
    return 1.0 / math.sqrt(m_in) if kind == "hidden" else 1.0
  raise ValueError(f"μP rule {rule!r} is not valid; choose one of ['adam', 'sgd', 'trust_ratio']")


def lr_multipliers(logical, width_mult: WidthMult, rule: str, adapted=None) -> Any:
  """Pytree like `logical` (leaves: tuples of axis names) of per-leaf lr multipliers (floats).

  `adapted` (optional, rule 'trust_ratio'): pytree of bools, False where the optimizer takes
  its plain inner step; those leaves use `unadapted_rule` given as adapted=(tree, rule).
  """
  if adapted is None:
    return jax.tree.map(lambda n: leaf_lr_multiplier(n, width_mult, rule), logical,
                        is_leaf=_is_names)
  adapted_tree, inner_rule = adapted
  return jax.tree.map(
      lambda n, a: leaf_lr_multiplier(n, width_mult, rule if a else inner_rule),
      logical, adapted_tree, is_leaf=_is_names)


def optimizer_lr_multipliers(opt_config, logical, width_mult: WidthMult) -> Any:
  """Per-leaf lr multipliers for the optimizer `opt_config.name` (with its adaptation mask)."""
  name = opt_config.name
  if name not in OPTIMIZER_RULES:
    raise ValueError(f"config.optimizer.name={name!r} has no μP rule; valid: "
                     f"{sorted(OPTIMIZER_RULES)}")
  rule = OPTIMIZER_RULES[name]
  if rule != "trust_ratio":
    return lr_multipliers(logical, width_mult, rule)
  from optimizers.lamb import resolve_mask  # the optimizer's own mask semantics
  placeholders = jax.tree.map(lambda _: 0, logical, is_leaf=_is_names)
  mask = {"default": None, "all": True}.get(opt_config.get("mask", "default"))
  if name == "lamb" and opt_config.get("adaptation_mask", "same") == "all":
    mask = True
  adapted = resolve_mask(mask, placeholders)
  return lr_multipliers(logical, width_mult, rule, adapted=(adapted, _UNADAPTED_RULE[name]))


def width_mult_from_config(model_config) -> float:
  """d_model / base_d_model: TP5's width multiplier (every width grows with d_model)."""
  return model_config.d_model / model_config.base_d_model


def lr_multipliers_from_config(config, logical) -> Any | None:
  """The trainer's hook: None for the standard parametrization, else per-leaf lr multipliers."""
  model = config.model
  if model.get("parametrization", "standard") != "mup":
    return None
  return optimizer_lr_multipliers(config.optimizer, logical, width_mult_from_config(model))


def axis_width_mults(shapes, base_shapes, logical) -> dict[str, float]:
  """{axis name: dim / base dim} from the params at the target and at the base width.

  mup's `set_base_shapes` in pytree form: pass the result as `width_mult` when widths do not
  all grow with d_model (for instance a fixed MLP width). Raises if an axis name has
  inconsistent ratios across leaves.
  """
  out: dict[str, float] = {}

  def visit(shape, base, names):
    for dim, base_dim, name in zip(shape.shape, base.shape, names):
      if name is None or name == "layers":
        continue
      ratio = dim / base_dim
      if not math.isclose(out.setdefault(name, ratio), ratio):
        raise ValueError(f"logical axis {name!r} has width ratios {out[name]} and {ratio}")
  jax.tree.map(visit, shapes, base_shapes, logical, is_leaf=_is_names)
  return out


def init_std_multipliers(logical, width_mult: WidthMult) -> Any:
  """Per leaf: μP init std / standard init std (1/sqrt(fan_in) hidden, fixed-std embeddings).

  Only the readout changes: TP5 Table 8 initialises output weights with a width-independent
  variance (that of the base model), i.e. sqrt(m_in) times the 1/sqrt(fan_in) std.
  """
  return jax.tree.map(
      lambda n: math.sqrt(fan_mults(n, width_mult)[0]) if leaf_kind(n) == "output" else 1.0,
      logical, is_leaf=_is_names)


def mup_init(params, logical, width_mult: WidthMult, zero_readout: bool = True):
  """Standard-initialised params -> μP-initialised ones (readout zero, or rescaled)."""
  scales = init_std_multipliers(logical, width_mult)

  def rescale(p, names, s):
    if leaf_kind(names) == "output" and zero_readout:
      return jnp.zeros_like(p)
    return p * jnp.asarray(s, p.dtype) if s != 1.0 else p
  return jax.tree.map(rescale, params, logical, scales)

