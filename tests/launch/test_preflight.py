"""launch/preflight.py: the real train step compiled for TPU slices on this CPU machine.

The compiling tests need libtpu (requirements-tpu.txt, an optional dependency that CI
installs); without it they skip, naming it, and the missing-libtpu path is tested instead.
"""
import importlib.util
import re
import sys

import pytest

from launch import common
from launch import preflight
from tests import testlib

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="optional dependency libtpu is not installed "
    "(pip install -r requirements-tpu.txt)")


def run_preflight(*args, env=None):
  return testlib.run_cli("launch.preflight", *args, env=env, timeout=300)


def _bytes(text, row):
  """'  total   9.19 MiB ...' -> bytes."""
  match = re.search(rf"^\s*{row}\s+([\d.]+) (B|KiB|MiB|GiB|TiB)", text, re.M)
  assert match, text
  scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
  return float(match.group(1)) * scale[match.group(2)]


@pytest.mark.parametrize("spec, topology, devices, chip_config", [
    ("v5e:4x4", "v5e:4x4", 16, "default"), ("v5litepod-16", "v5e:4x4", 16, "default"),
    ("v5e-16", "v5e:4x4", 16, "default"), ("v5p-64", "v5p:2x4x4", 32, "megacore"),
    ("v5:2x2x1", "v5p:2x2x1", 4, "megacore"), ("v4-8", "v4:2x2x1", 4, "megacore"),
    ("v6e:2x4", "v6e:2x4", 8, "default")])
def test_topologies(spec, topology, devices, chip_config):
  tpu = common.parse_topology(spec)
  assert (tpu.topology, tpu.num_devices, tpu.chip_config_name) == (topology, devices, chip_config)


@pytest.mark.parametrize("spec, message", [
    ("v5e:4x4x4", "2 dimensions"), ("v9:2x2", "unknown TPU generation"),
    ("v5litepod-3", "sizes")])
def test_bad_topologies(spec, message):
  with pytest.raises(ValueError, match=message):
    common.parse_topology(spec)


def test_memory_total_counts_aliased_outputs_once():
  m = preflight.MemoryUse(arguments=100, outputs=90, aliased=80, temporaries=50, code=5)
  assert m.total == 100 + 10 + 50 + 5


def test_check_fits_one_line():
  config = testlib.tiny_config()
  tpu = common.parse_topology("v5e:2x2")
  report = preflight.Report(
      label="lm.py:tiny", tpu=tpu, device_kind="TPU v5 lite", num_processes=1,
      mesh_shape={"data": 4}, global_batch_size=16, micro_batch_size=16, num_microbatches=1,
      example="sequences of 64 tokens", num_params=1, params_per_device=1, optimizer_per_device=1,
      memory=preflight.MemoryUse(17 << 30, 0, 0, 0, 0), xla_flops=None, model_flops=1.0,
      scanned_layers=False, compile_s=1.0)
  with pytest.raises(preflight.DoesNotFit) as e:
    preflight.check_fits(report, config)
  text = str(e.value)
  assert "\n" not in text
  assert text.startswith("lm.py:tiny does not fit v5e:2x2 (4 x TPU v5 lite, 16.00 GiB HBM "
                         "each): it needs 17.00 GiB per device")
  assert "--config.mesh.fsdp=-1" in text


def test_without_libtpu_exit_2_naming_the_requirements_file(tmp_path):
  blocker = tmp_path / "libtpu"
  blocker.mkdir()
  (blocker / "__init__.py").write_text("raise ImportError('libtpu is blocked for this test')\n")
  proc = run_preflight("--config=configs/lm.py:tiny", "--topology=v5e:2x2",
                       env={"PYTHONPATH": str(tmp_path)})
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: launch.preflight compiles with libtpu (the TPU compiler), an optional dependency "
      "that is not installed: pip install -r requirements-tpu.txt"]


@needs_libtpu
def test_tiny_on_v5e_4x4_prints_memory_and_flops():
  proc = run_preflight("--config=configs/lm.py:tiny", "--topology=v5e:4x4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "on v5e:4x4 (v5litepod-16): 16 x TPU v5 lite" in out
  assert "mesh: data=16 fsdp=1 tensor=1 sequence=1; global batch 16" in out
  for row in ("arguments", "outputs", "temporaries", "code", "total"):
    assert _bytes(out, row) > 0
  assert "of 16.00 GiB HBM: fits" in out
  assert re.search(r"model \(models/flops.py\)\s+\d\.\d+e\+\d+", out)
  assert re.search(r"XLA cost analysis\s+\d\.\d+e\+\d+", out)
  # Data parallel: every device holds the whole train state among its arguments.
  state = re.search(r"per device: parameters ([\d.]+) KiB, optimizer state ([\d.]+) MiB", out)
  assert state, out
  assert _bytes(out, "arguments") >= 0.99 * (float(state.group(1)) * (1 << 10)
                                             + float(state.group(2)) * (1 << 20))
  assert proc.stderr.strip() == "", proc.stderr[-2000:]  # libtpu's warnings are hidden


@needs_libtpu
def test_fsdp_on_v4_8_shards_the_state():
  """A megacore 3D slice, named by gcloud's accelerator type; fsdp splits params 4 ways."""
  base = ["--config=configs/lm.py:tiny", "--topology=v4-8"]
  proc = run_preflight(*base, "--config.mesh.data=1", "--config.mesh.fsdp=-1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "4 x TPU v4" in proc.stdout and "mesh: data=1 fsdp=4" in proc.stdout
  num_params = float(re.search(r"([\d.]+)M parameters", proc.stdout).group(1)) * 1e6
  per_device = re.search(r"per device: parameters ([\d.]+) KiB", proc.stdout)
  # float32 params, most of them sharded 4 ways (norm scales stay whole).
  assert float(per_device.group(1)) * 1024 < 0.3 * 4 * num_params


@needs_libtpu
def test_too_big_fails_in_one_line():
  proc = run_preflight("--config=configs/lm.py:1.3b,global_batch_size=4096",
                       "--topology=v5e:2x2")
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: lm.py:1.3b,global_batch_size=4096 does not fit v5e:2x2 "
                             "(4 x TPU v5 lite, 16.00 GiB HBM each)")
  assert "exceeds available HBM" in lines[0] or "per device" in lines[0]
  assert proc.stdout == ""


def test_require_libtpu_raises_when_it_cannot_be_imported(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
  with pytest.raises(preflight.MissingLibtpu, match="pip install -r requirements-tpu.txt"):
    preflight.require_libtpu()
