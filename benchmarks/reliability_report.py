r"""The README's reliability figures: faults injected, runs that survived, work lost.

  python -m benchmarks.reliability_report                   # runs tests/reliability (~6 CPU-min)
  python -m benchmarks.reliability_report --seed=3          # other random kill points
  python -m benchmarks.reliability_report --record=FILE     # re-print an earlier run's table

The figures come from the fault-injection suite itself (tests/reliability), so every number
printed is also asserted there: each test appends what it injected and measured to the
JSON-lines file named by $RELIABILITY_RECORD, and this script runs the suite with it set and
prints one markdown table. "Work lost" is what had to be computed again after a fault: steps
re-run after a kill (the checkpoint interval bounds it, plus the steps that ran while the
newest asynchronous save was still being written) and trials re-run in a sweep (target 0).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_RECORD = flags.DEFINE_string("record", None, "Print the table of this record instead of "
                              "running the suite.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random fault points.")
_KEEP = flags.DEFINE_string("keep", None, "Also copy the record to this path.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_suite(record: str, seed: int) -> int:
  env = dict(os.environ, RELIABILITY_RECORD=record, RELIABILITY_SEED=str(seed),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings",
                         "tests/reliability"], cwd=ROOT, env=env, capture_output=True,
                        text=True)
  summary = [l for l in proc.stdout.splitlines() if l.strip()][-1:]
  print(f"pytest tests/reliability (seed {seed}): {' '.join(summary)}")
  if proc.returncode:
    print(proc.stdout[-4000:], file=sys.stderr)
  return proc.returncode


def _rows(records: list[dict]) -> list[tuple]:
  """(fault, injected, survived, work lost, note) per scenario."""
  by = {}
  for r in records:
    by.setdefault(r["scenario"], []).append(r)
  out = []
  if "sigkill" in by:
    r = by["sigkill"][0]
    lost = [k["lost"] for k in r["kills"]]
    over = sum(max(0, x - r["interval"]) for x in lost)
    kinds = ", ".join(f"{k['kind']}" + (f" {k['at']}" if k["kind"] != "time" else
                                        f" {k['at']:.1f}s") for k in r["kills"])
    out.append(("SIGKILL of a training run", r["runs"], f"{r['survived']}/{r['runs']}",
                f"{sum(lost)} steps recomputed (max {max(lost)}/kill; interval "
                f"{r['interval']}, {over} beyond it: async save in flight)",
                f"final state bitwise equal; kills at {kinds}"))
  if "sigterm" in by:
    r = by["sigterm"][0]
    out.append(("SIGTERM (preemption)", r["runs"], f"{r['survived']}/{r['runs']}",
                f"{r['recomputed']} steps", f"checkpoint at step {r['at']}, exit 0 after "
                f"{r['seconds']:.1f} s (grace 30 s)"))
  if "corrupt" in by:
    rs = by["corrupt"]
    out.append(("Corrupt latest checkpoint", len(rs), f"{sum(r['survived'] for r in rs)}/{len(rs)}",
                f"{sum(r['recomputed'] for r in rs)} steps ({rs[0]['interval']} each: one "
                "interval)", "fell back with a warning, bitwise equal: "
                + ", ".join(r["kind"] for r in rs)))
  writes = by.get("write_failure", []) + by.get("disk_full", [])
  if writes:
    out.append(("Checkpoint write fails", len(writes),
                f"{sum(r['survived'] for r in writes)}/{len(writes)}",
                f"{sum(r['recomputed'] for r in writes)} steps (since the last good checkpoint)",
                "one line, exit 3, previous checkpoint kept, resumed: "
                + ", ".join(r["kind"] for r in writes)))
  nans = by.get("nan_stop", []) + by.get("nan_skip", [])
  if nans:
    out.append(("NaN loss", len(nans), f"{sum(r['survived'] for r in nans)}/{len(nans)}",
                "0 steps", "; ".join(r["kind"] for r in nans)
                + " (stop: one line naming the step, exit 3, last good checkpoint finite)"))
  if "sweep_kill" in by:
    r = by["sweep_kill"][0]
    out.append(("SIGKILL of the sweep driver", r["runs"], f"{r['survived']}/{r['runs']}",
                f"{r['trials_rerun']} trials re-run; {r['recomputed']} steps recomputed in "
                f"{r['interrupted_trials']} interrupted trials (interval "
                f"{r['checkpoint_interval']})",
                f"{r['trials']}/{r['trials']} trials finished exactly once, laws.json and "
                "report.md identical"))
  if "claim_race" in by:
    r = by["claim_race"][0]
    out.append(("Workers racing for trials (one killed)", 1, "1/1",
                f"{r['claimed_twice']} trials run twice",
                f"{r['runs']} processes, {r['trials']} trials, {r['claims']} claims"))
  if "trial_faults" in by:
    r = by["trial_faults"][0]
    out.append(("Trials that raise / diverge", r["raised"] + r["diverged"],
                f"sweep finished", "0 trials lost",
                f"{r['retried']} retries, {r['failed_for_good']} recorded failed after its "
                f"retries, {r['diverged']} recorded diverged (NaN)"))
  if "bad_input" in by:
    rs = by["bad_input"]
    out.append(("Malformed configs and flags", len(rs), f"{len(rs)}/{len(rs)} one line, exit 2",
                "nothing started", "unknown keys, wrong types, zero/negative sizes, mesh, "
                "batch and sequence divisibility, unknown names, unwritable workdir, CSV "
                "columns"))
  return out


def print_table(records: list[dict]) -> None:
  rows = _rows(records)
  print("| Fault | Injected | Survived | Work lost | Checked |")
  print("|---|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(str(x) for x in row) + " |")
  injected = sum(r[1] for r in rows)
  print(f"\n{injected} faults injected in {len(rows)} scenarios.")


def main(argv):
  del argv
  path = _RECORD.value
  code = 0
  if path is None:
    path = os.path.join(tempfile.mkdtemp(), "reliability.jsonl")
    code = run_suite(path, _SEED.value)
  records = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
  if _KEEP.value and records:
    with open(_KEEP.value, "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
  print_table(records)
  return code


if __name__ == "__main__":
  app.run(main)
