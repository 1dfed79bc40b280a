"""Pieces every config family shares: variant parsing, listing and the training defaults."""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import textwrap
import types

import ml_collections

from sharding.rules import DEFAULT_RULES


def _split_top_level(text: str) -> list[str]:
  """Splits at the commas outside brackets: 'a=(0, 1),b=2' -> ['a=(0, 1)', 'b=2']."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return [p for p in parts + [text[start:]] if p]


def parse_arg(arg: str | None, default: str) -> tuple[str, dict]:
  """'tiny,seq_len=64,grid.seeds=(0, 1)' -> ('tiny', {'seq_len': 64, 'grid.seeds': (0, 1)}).

  Commas inside brackets belong to the value, so tuples and lists can be given inline."""
  parts = _split_top_level(arg or default)
  variant, overrides = default, {}
  for part in parts:
    if "=" in part:
      key, value = part.split("=", 1)
      try:
        overrides[key.strip()] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        overrides[key.strip()] = value
    else:
      variant = part.strip()
  return variant, overrides


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets dotted keys; an unknown key raises naming it (ConfigDict is locked)."""
  for dotted, value in overrides.items():
    *path, leaf = dotted.split(".")
    node = config
    for key in path:
      if key not in node:
        raise KeyError(f"config.{dotted}: no field {key!r} (valid: {sorted(node.keys())}).")
      node = node[key]
    if leaf not in node:
      raise KeyError(f"config.{dotted}: no field {leaf!r} (valid: {sorted(node.keys())}).")
    node[leaf] = value


def pick_variant(variant: str, variants: dict, family: str):
  if variant not in variants:
    raise ValueError(f"unknown {family} config variant {variant!r}; valid: {sorted(variants)}.")
  return variants[variant]


LIST = "list"  # `--config=FILE.py:list` prints FILE's variants (train/cli.py)
_VARIANT_LINE = re.compile(r"^  (\S+(?: / \S+)*)\s{2,}(\S.*)$")  # "  tiny   text", "  a / b  text"


def _described_variants(doc: str) -> dict[str, str]:
  """Variant -> its description in the docstring's "Variants...:" section (2-space indent)."""
  described, lines = {}, (doc or "").splitlines()
  start = next((i + 1 for i, l in enumerate(lines) if re.match(r"^Variants\b.*:\s*$", l)), None)
  if start is None:
    return described
  names, paragraph = [], []

  def flush():
    text = " ".join(paragraph)
    first = re.match(r"(.{30,}?\.)(?:\s|$)", text)  # the first sentence, if it fits
    line = (first.group(1) if first and len(first.group(1)) <= 100 else
            textwrap.shorten(text, 100, placeholder=" ...", break_on_hyphens=False))
    for name in names:
      described.setdefault(name, line.rstrip(":"))

  for line in lines[start:]:
    if not line.strip() or not line.startswith("  "):
      break  # the section ends at a blank line or at unindented text
    m = _VARIANT_LINE.match(line)
    if m:
      flush()
      names, paragraph = m.group(1).split(" / "), [m.group(2).strip()]
    elif line.startswith("   ") and paragraph and not paragraph[-1].endswith(":"):
      paragraph.append(line.strip())  # continuation, up to a line that introduces a command
  flush()
  return described


def list_variants(module: types.ModuleType) -> list[tuple[str, str]]:
  """(name, one-line description) of each variant of a config module.

  The names are the module's `_VARIANTS` keys (or, without that dict, the names its docstring
  lists); the descriptions come from the docstring's "Variants:" section.
  """
  described = _described_variants(module.__doc__)
  names = list(getattr(module, "_VARIANTS", None) or described)
  return [(n, described.get(n, "(not described in the config file's docstring)"))
          for n in names]


def load_config_module(path: str) -> types.ModuleType:
  """Imports a config file by path, as `--config=PATH` does."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such config file {path!r}")
  name = "_listed_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def format_variants(path: str) -> str:
  """What `--config=PATH:list` prints: one line per variant."""
  rows = list_variants(load_config_module(path))
  width = max(len(n) for n, _ in rows)
  head = f"{path} variants (--config={path}:NAME[,field=value,...]):"
  return "\n".join([head] + [f"  {n.ljust(width)}  {d}" for n, d in rows])


def training_defaults() -> ml_collections.ConfigDict:
  """Loop, logging, checkpointing and mesh fields shared by every trainer config."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.seq_len = 128
  c.global_batch_size = 32  # sequences per optimizer step
  c.micro_batch_size = 0  # 0 = no accumulation; else the global batch is k micro-batches
  c.num_steps = 1000
  c.max_tokens = 0  # > 0: also stop once this many tokens were trained on (adaptive batches)
  c.eval_every = 200
  c.eval_batches = 8
  c.eval_batch_size = 32
  c.log_every = 10
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.nan_policy = "stop"  # stop | skip: what a non-finite loss or gradient does
  c.loss_bound = 0.0  # > 0: a loss above it counts as diverged (sweeps)
  c.device_peak_flops = 0.0  # 0 = known accelerator peak, or a measured matmul peak on CPU
  c.lr_scale = 1.0  # runtime multiplier of the schedule (sweeps vary it without recompiling)
  c.init_from = ""  # workdir whose latest checkpoint starts this run (a new training phase)
  # > 0: the run stops ('stopped', with a checkpoint) once the EMA (decay stop_loss_ema) of
  # its logged training loss reaches this (studies of steps to a target loss).
  c.stop_at_loss = 0.0
  c.stop_loss_ema = 0.9
  # Dotted fields a resume may change from the workdir's config.json (e.g. ("num_steps",) to
  # train on); each change is logged to config_history.jsonl. Any other change is refused.
  c.resume_allow_changes = ()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
  c.logical_axis_rules = [list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])]
                          for r in DEFAULT_RULES]
  return c
