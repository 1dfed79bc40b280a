"""The colabs: committed without outputs, and each runs top to bottom headless (tiny settings).

Each notebook runs in a fresh python3 kernel (nbclient) from the repository root with
BATCHSCALE_NOTEBOOK_TINY=1, which its parameters cell reads. The kernel gets this process's
environment without JAX_PLATFORMS, conftest.py's XLA_FLAGS and what importing jax here set:
the notebook's device cell must set up the 8 virtual CPU devices itself, as it does on Colab.
A probe cell appended to the in-memory copy prints a few of the notebook's variables as JSON
(and the kernel's CPU seconds); the assertions are about those numbers.

BATCHSCALE_NOTEBOOK_MODE=sweep (and BATCHSCALE_NOTEBOOK_SWEEP_CONFIG=test) in the environment
runs scaling_laws.ipynb on a live sweep instead of synthetic rows (minutes, not seconds).
"""
import json
import os
import re
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLABS = os.path.join(ROOT, "colabs")
NOTEBOOKS = ("quickstart", "large_batch_optimizers", "scaling_laws", "chinchilla")
CELL_TIMEOUT_S = 600
_MARK = "NOTEBOOK_PROBE:"

# The expression each probe cell prints (evaluated in the notebook's namespace).
PROBES = {
    "quickstart": """dict(
        losses=[m['loss'] for m in metrics if 'loss' in m],
        eval_loss=final_eval['eval_loss'], devices=jax.device_count(),
        mesh=dict(s.mesh.shape), specs={p: str(spec) for p, _, spec in sharding_rows})""",
    "large_batch_optimizers": """dict(
        results={f'{o}/{b}': r['final_loss'] for (o, b), r in results.items()},
        initial_loss=initial_loss, trust=trust_check)""",
    "scaling_laws": """dict(
        mode=MODE, prediction={k: [v.value, v.lo, v.hi] for k, v in prediction.items()},
        target=dict(N=TARGET_N, D=TARGET_D), truth=truth, report=sorted(os.listdir(REPORT_DIR)))""",
    "chinchilla": """dict(
        params=fit.params, n=fit.n, one_start=one.params, tight_start=tight.params,
        tokens_per_param=float(np.divide(*fit.compute_optimal(5.76e23)[::-1])))""",
}


def _read(name):
  return nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)


def run_notebook(name):
  """Executes colabs/NAME.ipynb with tiny settings: (probe dict, seconds, executed notebook)."""
  nb = _read(name)
  nb.cells.append(nbformat.v4.new_code_cell(
      f"import json as _json, time as _time\n"
      f"print({_MARK!r} + _json.dumps(dict({PROBES[name]}, cpu_s=_time.process_time()), "
      "default=float))"))
  env = dict(os.environ, BATCHSCALE_NOTEBOOK_TINY="1", BATCHSCALE_NOTEBOOK_TEST="1")
  # Also what importing jax in this process set (TF_CPP_MIN_LOG_LEVEL=1, libtpu's paths).
  for key in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "TPU_LIBRARY_PATH", "TPU_SKIP_MDS_QUERY"):
    env.pop(key, None)
  # Not conftest's device count (the notebook asks for its own 8 devices): only a flag that
  # skips LLVM's optimisations, since compiling, not running, is what tiny runs spend their
  # time on (the init of the tiny LM compiles in 2 s instead of 4.5 s of CPU).
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": ROOT}})
  start = time.monotonic()
  client.execute(env=env)
  seconds = time.monotonic() - start
  text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  line = next(l for l in text.splitlines() if l.startswith(_MARK))
  probe = json.loads(line[len(_MARK):])
  print(f"{name}.ipynb executed in {seconds:.1f} s ({probe['cpu_s']:.1f} s of kernel CPU)")
  return probe, seconds, nb


def _errors(nb):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if o.output_type == "error"]


# ------------------------------------------------------------------ committed files


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, name
  for i, cell in enumerate(code):
    assert cell.outputs == [], f"{name}.ipynb code cell {i} has outputs: strip them"
    assert cell.execution_count is None, f"{name}.ipynb code cell {i} has an execution count"
  # Colab set-up first (clone + install, a no-op in a checkout); tiny mode is switchable.
  assert "requirements.txt" in code[0].source and "train/trainer.py" in code[0].source
  assert any("BATCHSCALE_NOTEBOOK_TINY" in c.source for c in code)
  if any("import jax" in c.source for c in code):
    # The virtual devices must be requested before anything imports JAX.
    assert "xla_force_host_platform_device_count=8" in code[1].source
    assert not any(re.search(r"^\s*(import|from) jax", c.source, re.M) for c in code[:1])


def test_readme_links_every_notebook():
  with open(os.path.join(COLABS, "README.md")) as f:
    readme = f.read()
  for name in NOTEBOOKS:
    assert (f"https://colab.research.google.com/github/OWNER/batchscale/blob/main/colabs/"
            f"{name}.ipynb") in readme, name


# ------------------------------------------------------------------ execution


@pytest.mark.slow
def test_quickstart():
  out, _, nb = run_notebook("quickstart")
  assert not _errors(nb)
  assert out["devices"] == 8 and out["mesh"]["data"] == 2 and out["mesh"]["tensor"] == 2
  losses = out["losses"]
  assert len(losses) >= 3 and losses[-1] < losses[0] - 1.0, losses
  assert out["eval_loss"] < losses[0]
  # Parameters really are split over fsdp and tensor (the table comes from the arrays).
  specs = out["specs"]
  assert any("fsdp" in v and "tensor" in v for v in specs.values()), specs
  # The loss curve was drawn.
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_large_batch_optimizers():
  out, _, nb = run_notebook("large_batch_optimizers")
  results = out["results"]
  assert {k.split("/")[0] for k in results} == {"adamw", "lamb", "lars"}
  assert len({k.split("/")[1] for k in results}) >= 2
  for key, loss in results.items():  # every run learned something
    assert loss < out["initial_loss"] - 0.3, (key, loss, out["initial_loss"])
  # LAMB moves each adapted layer by exactly lr * ||x|| (You et al. 2020, Alg. 2).
  trust = out["trust"]
  assert trust["adapted_leaves"] > 0
  assert abs(trust["max_rel_error"]) < 1e-4, trust
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_scaling_laws():
  out, _, _ = run_notebook("scaling_laws")
  pred, target = out["prediction"], out["target"]
  for key in ("lr", "batch_size", "loss"):
    value, lo, hi = pred[key]
    assert value > 0 and lo <= value <= hi, (key, pred[key])
  assert {"laws.json", "report.md"} <= set(out["report"])
  if out["mode"] == "synthetic":
    # The laws the rows were drawn from are recovered at the extrapolated target.
    truth = out["truth"]
    assert abs(pred["lr"][0] / truth["lr"] - 1) < 0.25, (pred["lr"], truth)
    assert abs(pred["batch_size"][0] / truth["batch_size"] - 1) < 0.25, (pred["batch_size"], truth)
    assert abs(pred["loss"][0] / truth["loss"] - 1) < 0.02, (pred["loss"], truth)
  assert target["N"] > 0 and target["D"] > 0


@pytest.mark.slow
def test_chinchilla():
  out, _, _ = run_notebook("chinchilla")
  p = out["params"]
  assert out["n"] == 240
  # Epoch AI's grid + L-BFGS replication (tests/testdata/README.md).
  assert abs(p["alpha"] - 0.347) < 0.01 and abs(p["beta"] - 0.367) < 0.01, p
  assert abs(p["E"] - 1.817) < 0.01, p
  # From Hoffmann et al.'s constants, scipy's default tolerances stop near them
  # (docs/papers.md §9.7); fit_chinchilla's tight ones reach the grid's optimum.
  assert out["one_start"]["beta"] < 0.3 < p["beta"]
  assert abs(out["tight_start"]["beta"] - p["beta"]) < 1e-3
  assert 15 < out["tokens_per_param"] < 25, out["tokens_per_param"]
