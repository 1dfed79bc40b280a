r"""Predict the optimal learning rate, batch size and loss at (N, D) from a sweep's laws.

  python -m laws.predict --workdir=/tmp/sweep --params=2e5 --tokens=1e7

Reads <workdir>/report/laws.json (`--laws` for another file; `--family` when the sweep had
several optimizers/schedules/parametrizations) and prints η* and B* (Step Law, Li et al.
2025), the loss L(N, D) (Chinchilla approach 3) with bootstrap intervals, the compute-optimal
split of C = 6ND, and the config overrides that train it with train. B* is in
tokens when the sweep recorded sequence lengths; it is converted to sequences with the
sweep's seq_len (or --seq_len).
"""
from __future__ import annotations

import json
import math
import os
import sys

from absl import flags

from train import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory.")
_LAWS = flags.DEFINE_string("laws", None, "laws.json to read (default <workdir>/report/).")
_FAMILY = flags.DEFINE_string("family", None, "Which report/<family>/ of a multi-family sweep.")
_PARAMS = flags.DEFINE_float("params", None, "N: parameters (as the sweep counted them).")
_TOKENS = flags.DEFINE_float("tokens", None, "D: training tokens.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per sequence (default: the sweep's).")
_LEVEL = flags.DEFINE_float("level", 0.95, "Interval level.")
cli.define_distributed_flags()  # for --traceback


def laws_path(workdir: str, laws: str | None = None, family: str | None = None) -> str:
  if laws:
    return laws
  report = os.path.join(workdir, "report")
  path = os.path.join(report, family, "laws.json") if family else os.path.join(report,
                                                                               "laws.json")
  if not os.path.exists(path):
    families = sorted(d for d in os.listdir(report)
                      if os.path.exists(os.path.join(report, d, "laws.json"))) if (
                          os.path.isdir(report)) else []
    hint = (f"; pass --family, one of {families}" if families else
            "; run `python -m sweep` or `python -m laws.fit` first")
    raise FileNotFoundError(f"--workdir={workdir}: no {path}{hint}.")
  return path


def sweep_seq_len(workdir: str) -> int | None:
  """The sweep's tokens per sequence, from its sweep_config.json (without importing JAX)."""
  path = os.path.join(workdir, "sweep_config.json")  # sweep.runner.CONFIG_FILE
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return int(json.load(f)["base"]["seq_len"])


def prediction(laws: dict, N: float, D: float, *, seq_len: int | None = None,
               level: float = 0.95) -> dict:
  """laws.estimate.predict plus what it means for a run: batch size in sequences, the
  steps, the trainer overrides, and the fitted ranges N and D fall outside of."""
  from laws import estimate  # pylint: disable=g-import-not-at-top
  if not (N > 0 and D > 0):
    raise ValueError(f"--params={N} and --tokens={D} must be positive.")
  for law, why in sorted((laws.get("undetermined") or {}).items()):
    if law in ("chinchilla", "step_law"):
      raise ValueError(f"{law}: not determined by this grid ({why}); no prediction.")
  est = estimate.predict(laws, N, D, level=level)
  if "lr" not in est and "loss" not in est:
    raise ValueError("the laws hold neither a Step Law nor L(N, D) fit; see the report's "
                     "notes for why.")
  floor = (laws.get("irreducible_loss") or {}).get("known_E")
  if "loss" in est and floor is not None and est["loss"].value < floor:
    raise ValueError(f"chinchilla: the predicted loss {est['loss'].value:.4g} is below the "
                     f"corpus's known entropy rate {floor:.4g}; the fit is biased (see the "
                     "report's irreducible-loss table), no prediction.")
  out = {"N": N, "D": D, "estimates": est, "overrides": [], "outside": []}
  step = laws.get("step_law")
  if step is not None:
    b = est["batch_size"].value
    if step.batch_unit == "tokens":
      if not seq_len:
        raise ValueError("--seq_len is needed: B* is in tokens and the sweep's sequence "
                         "length is unknown.")
      b_seq = max(1, round(b / seq_len))
    else:
      b_seq = max(1, round(b))
    out["batch_sequences"] = b_seq
    out["steps"] = max(1, round(D / (b_seq * (seq_len or 1))))
    out["overrides"] = [f"--config.schedule.peak_lr={est['lr'].value:.4g}",
                        f"--config.global_batch_size={b_seq}",
                        f"--config.num_steps={out['steps']}"]
  power = laws.get("power_scheduler")
  if power is not None:
    out["power_overrides"] = [f"--config.schedule.{k}={v:.4g}" if isinstance(v, float) else
                              f"--config.schedule.{k}={v}"
                              for k, v in power.schedule_config().items()]
  cells = [o.cell for o in laws.get("lr_optima", [])]
  for name, value, key in (("N", N, "N"), ("D", D, "D")):
    seen = [c[key] for c in cells]
    if not seen and laws.get("chinchilla") is not None:
      continue
    if seen and not min(seen) <= value <= max(seen):
      factor = value / max(seen) if value > max(seen) else min(seen) / value
      side = "above the largest" if value > max(seen) else "below the smallest"
      out["outside"].append(f"{name}={value:.3g} is {factor:.3g}x {side} fitted {name} "
                            f"(range [{min(seen):.3g}, {max(seen):.3g}]): extrapolating")
  return out


def _fmt(e, fmt=".4g") -> str:
  iv = "" if not (math.isfinite(e.lo) and math.isfinite(e.hi)) else (
      f"  [{format(e.lo, fmt)}, {format(e.hi, fmt)}]")
  return f"{format(e.value, fmt)}{iv}"


def format_prediction(p: dict, laws: dict, *, seq_len: int | None = None,
                      level: float = 0.95) -> str:
  est = p["estimates"]
  lines = [f"Prediction at N = {p['N']:.4g} parameters, D = {p['D']:.4g} tokens "
           f"({level:.0%} bootstrap intervals):"]
  if "lr" in est:
    unit = laws["step_law"].batch_unit
    lines.append(f"  peak learning rate  η* = {_fmt(est['lr'])}   (Step Law)")
    seqs = (f" = {p['batch_sequences']} sequences of {seq_len}" if unit == "tokens" else "")
    lines.append(f"  batch size          B* = {_fmt(est['batch_size'], '.4g')} {unit}{seqs}")
  if "loss" in est:
    lines.append(f"  loss          L(N, D)    = {_fmt(est['loss'])}   (Chinchilla approach 3)")
    floor = laws.get("irreducible_loss")
    if floor:
      lines.append(f"  irreducible loss: known E = {floor['known_E']:.4g}, fitted E = "
                   f"{laws['chinchilla'].params['E']:.4g}")
    lines.append(f"  compute-optimal at C = 6ND = {6 * p['N'] * p['D']:.3g} FLOP: "
                 f"N_opt = {_fmt(est['N_opt'], '.3g')}, D_opt = {_fmt(est['D_opt'], '.3g')}")
  for note in p["outside"]:
    lines.append(f"  note: {note}")
  if p["overrides"]:
    lines += ["", f"Train it ({p['steps']} steps; the model shape with N = {p['N']:.4g} is "
              "yours to set):", "  " + " ".join(p["overrides"])]
  if p.get("power_overrides"):
    lines += ["Or with the calibrated Power scheduler (Shen et al. 2024):",
              "  " + " ".join(p["power_overrides"])]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if _PARAMS.value is None or _TOKENS.value is None:
    raise ValueError("--params and --tokens are required (N parameters, D tokens).")
  from laws import report  # pylint: disable=g-import-not-at-top
  laws = report.read_laws(laws_path(_WORKDIR.value, _LAWS.value, _FAMILY.value))
  seq_len = _SEQ_LEN.value or sweep_seq_len(_WORKDIR.value)
  p = prediction(laws, _PARAMS.value, _TOKENS.value, seq_len=seq_len, level=_LEVEL.value)
  print(format_prediction(p, laws, seq_len=seq_len, level=_LEVEL.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  sys.exit(cli.run(main))
