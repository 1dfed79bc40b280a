"""Logical axis rules: logical names (what models say) -> mesh axes (what config says).

Models name only logical axes (`batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `vocab`,
`layers`). A rule list maps each to a mesh axis, a tuple of axes or None. Rules are tried in
order and a mesh axis is used at most once per array (flax's resolution), so activations
[batch, length, embed] shard the batch over (data, fsdp) while parameters [embed, mlp] shard
embed over fsdp.
"""
from __future__ import annotations

import contextlib
import threading

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

# (data, fsdp, tensor, sequence) in the Megatron/MaxText arrangement.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),  # [embed, ...] params: FSDP shards the model dimension
    ("mlp", "tensor"),  # [embed, mlp] / [mlp, embed]: column then row parallel
    ("heads", "tensor"),  # [embed, heads, kv]: heads split over tensor
    ("kv", None),
    ("vocab", "tensor"),  # [vocab, embed] embedding and logits
    ("layers", None),  # stacked (scanned) layers stay whole on every device
)

_ctx = threading.local()


def as_rules(rules) -> tuple:
  """Normalises rules from config (list of lists from JSON) into a tuple of pairs."""
  return tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in rules)


def logical_to_spec(logical_names, rules) -> P:
  """PartitionSpec for a tuple of logical axis names (None = replicated dim)."""
  if logical_names is None:
    return P()
  return nn.logical_to_mesh_axes(tuple(logical_names), as_rules(rules))


def logical_to_sharding(logical_names, mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_names, rules))


@contextlib.contextmanager
def axis_rules(rules):
  """Makes `rules` the ones `constrain` uses (set around tracing of the train step)."""
  previous = getattr(_ctx, "rules", None)
  _ctx.rules = as_rules(rules)
  try:
    yield
  finally:
    _ctx.rules = previous


def _active():
  """(rules, abstract mesh) of the step being traced, or None outside `axis_rules` and a mesh."""
  rules = getattr(_ctx, "rules", None)
  mesh = jax.sharding.get_abstract_mesh()
  return None if rules is None or mesh.empty else (rules, mesh)


def constrain(x, logical_names):
  """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
  active = _active()
  if active is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_names, active[0]))


def is_split(logical_name: str) -> bool:
  """Whether the current rules and mesh split this logical axis over more than one device."""
  active = _active()
  if active is None:
    return False
  rules, mesh = active
  axes = logical_to_spec((logical_name,), rules)[0]
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return any(mesh.shape[a] > 1 for a in axes)


def tree_shardings(logical_tree, mesh, rules):
  """NamedShardings for a pytree whose leaves are tuples of logical names (or None)."""
  return jax.tree.map(lambda names: logical_to_sharding(names, mesh, rules), logical_tree,
                      is_leaf=lambda x: x is None or isinstance(x, tuple))
