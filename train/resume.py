"""Resume checks: a run resumes only with the config that wrote its checkpoints.

Fields may change on resume only when the new config declares them in
`config.resume_allow_changes`; every declared change is logged to config_history.jsonl.
"""
from __future__ import annotations

import hashlib
import json
import os

import ml_collections

# Fields a resume may change without declaring them: the declaration itself, and the
# accelerator peak (MFU reporting only; sweeps re-measure it on CPU in every process).
RESUME_UNCHECKED = ("resume_allow_changes", "device_peak_flops")
CONFIG_HISTORY = "config_history.jsonl"


def hash_fields(fields: dict) -> str:
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config) -> str:
  fields = json.loads(config.to_json(sort_keys=True))
  for key in RESUME_UNCHECKED:
    fields.pop(key, None)
  return hash_fields(fields)


def differing_fields(a, b, ignore=()) -> list[str]:
  """Dotted names of the fields whose values differ between configs a and b."""
  fa = flatten(json.loads(a.to_json_best_effort(sort_keys=True)))
  fb = flatten(json.loads(b.to_json_best_effort(sort_keys=True)))
  return [f"config.{k}" for k in sorted(set(fa) | set(fb))
          if k.split(".")[0] not in ignore and fa.get(k) != fb.get(k)]


def flatten(tree, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}: a nested config dict by dotted field names."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _references(config, prefix: str = "") -> dict:
  """Dotted key -> FieldReference for fields that share a reference (e.g. schedule.total_steps
  = get_ref('num_steps')); resolved copies have none."""
  out = {}
  for key, value in getattr(config, "_fields", {}).items():
    if isinstance(value, ml_collections.FieldReference):
      out[f"{prefix}{key}"] = value
      value = value.get()
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_references(value, f"{prefix}{key}."))
  return out


def _short(value) -> str:
  text = json.dumps(value) if not isinstance(value, str) else repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def check_resume_config(cfg, workdir: str, steps) -> dict:
  """Compares cfg with the config of the run whose checkpoints (`steps`) are in workdir.

  The previous config comes from workdir/config.json (else the checkpoint meta's
  config_hash). Fields that differ raise ValueError in one line unless cfg declares them in
  cfg.resume_allow_changes (a field that references a declared one, like
  schedule.total_steps -> num_steps, follows it); returns the allowed {field: [old, new]}.
  """
  if not steps:
    return {}
  where = f"--workdir={workdir}'s checkpoint"
  allowed = tuple(cfg.get("resume_allow_changes") or ())
  new = flatten(json.loads(cfg.to_json_best_effort(sort_keys=True)))
  unknown = [k for k in allowed if k not in new]
  if unknown:
    raise ValueError(f"config.resume_allow_changes names {', '.join(unknown)}, which the "
                     "config has no field for (use dotted names, e.g. 'schedule.peak_lr').")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    meta_path = os.path.join(workdir, "checkpoints", str(steps[-1]), "meta", "metadata")
    try:
      with open(meta_path) as f:
        stored = json.load(f).get("config_hash")
    except (OSError, ValueError):
      return {}  # unreadable meta: the restore reports the checkpoint
    if stored and stored != config_hash(cfg):
      raise ValueError(
          f"the config differs from the one that wrote {where} (config hash {stored}, this run "
          f"{config_hash(cfg)}; {path} is missing, so the fields cannot be named): resume with "
          "the same config, or use a new --workdir.")
    return {}
  with open(path) as f:
    old = flatten(json.load(f))
  missing = object()
  changed = {k: [old.get(k, missing), new.get(k, missing)] for k in sorted(set(old) | set(new))
             if k not in RESUME_UNCHECKED and old.get(k, missing) != new.get(k, missing)}
  refs = _references(cfg)
  declared = set(allowed) | {k for k, r in refs.items()
                             if any(refs.get(a) is r for a in allowed)}
  refused = [k for k in changed if k not in declared]
  if refused:
    def show(v):
      return "unset" if v is missing else _short(v)
    diffs = "; ".join(f"config.{k}: {show(changed[k][1])} in this run, {show(changed[k][0])} "
                      f"in {where}" for k in refused)
    roots = []  # a field that references another one follows it: declare the first only
    for k in refused:
      if k not in refs or not any(refs.get(r) is refs[k] for r in roots):
        roots.append(k)
    raise ValueError(
        f"{diffs}. Resume with the checkpoint's config, use a new --workdir, or, if the "
        f"change keeps the run meaningful, declare it: --config.resume_allow_changes=\"{tuple(roots)}\".")
  return {k: [None if o is missing else o, None if n is missing else n]
          for k, (o, n) in changed.items()}
