r"""Preflight: compile the real train step for a TPU slice on this CPU machine.

  python -m launch.preflight --config=configs/lm.py:125m --topology=v5p-64

libtpu describes the slice's chips without the hardware (JAX's compile-only topology devices),
so the step that `train.trainer` would run -- `setup(config, mesh=...)`, then
`make_train_step(...).jitted.lower(...)` on ShapeDtypeStruct inputs carrying the shardings --
is compiled ahead of time by the TPU compiler. It prints the per-device memory the compiler
planned (arguments, outputs, temporaries) against the chip's HBM, the compiled step's FLOPs
(XLA cost analysis) and the model's (models/flops.py). A model, batch and mesh that would not
fit exit 2 with one line; so does a missing libtpu (pip install -r requirements-tpu.txt).

--topology takes a gcloud accelerator type (v4-8, v5litepod-16, v5p-64, v6e-8) or a libtpu
topology (v5e:4x4, v5p:2x4x4). Any config field can be overridden as for train
(--config.mesh.fsdp=-1, --config.global_batch_size=512). A SentencePiece config whose model
file is not given gets a stand-in vocabulary (--vocab_size): the data pipeline is not part of
the compiled step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time

from launch import common

INSTALL_HINT = "pip install -r requirements-tpu.txt"


class MissingLibtpu(ValueError):
  """libtpu, the optional TPU compiler, is not installed."""


class DoesNotFit(ValueError):
  """The step needs more memory per device than the chip has."""


@dataclasses.dataclass(frozen=True)
class MemoryUse:
  """Per-device bytes from the compiled program's memory analysis."""
  arguments: int
  outputs: int
  aliased: int  # outputs written in place of donated arguments (the train state)
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass(frozen=True)
class Report:
  label: str
  tpu: common.TpuSlice
  device_kind: str
  num_processes: int
  mesh_shape: dict
  global_batch_size: int
  micro_batch_size: int
  num_microbatches: int
  example: str  # what one batch row is: 'sequences of 1024 tokens'
  num_params: int
  params_per_device: int  # bytes
  optimizer_per_device: int  # bytes
  memory: MemoryUse
  xla_flops: float | None  # per device per step
  model_flops: float  # per device per step, models/flops.py
  scanned_layers: bool
  compile_s: float
  notes: tuple = ()

  @property
  def hbm(self) -> int:
    return self.tpu.gen.hbm_per_device

  @property
  def fits(self) -> bool:
    return self.memory.total <= self.hbm


def require_libtpu() -> None:
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    raise MissingLibtpu("launch.preflight compiles with libtpu (the TPU compiler), an optional "
                        f"dependency that is not installed: {INSTALL_HINT}") from None


def prepare_environment() -> None:
  """Before JAX loads libtpu: CPU is the only backend; libtpu loads as a compiler only."""
  # Not a TPU VM: no metadata server to ask.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # libtpu holds /tmp/libtpu_lockfile for the process's life; any other process that loaded
  # it (another preflight, a JAX program probing for TPUs) would otherwise make this one fail.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")


@contextlib.contextmanager
def quiet_stderr(show: bool = False):
  """Hides what libtpu's C++ writes to fd 2 (it warns that this is not a TPU VM)."""
  if show:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def topology_devices(tpu: common.TpuSlice, verbose: bool = False) -> list:
  """The slice's compile-only devices, described by libtpu."""
  if not tpu.topology:
    grid = "x".join("ABC"[:tpu.gen.dims])
    raise ValueError(f"{tpu.accelerator_type} ({tpu.chips} chips) has no usual chip grid; give "
                     f"the grid as a topology: --topology={tpu.gen.libtpu}:{grid}.")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  with quiet_stderr(verbose):
    try:
      desc = topologies.get_topology_desc(
          tpu.topology, "tpu", chip_config_name=tpu.chip_config_name,
          chips_per_host_bounds=tpu.chips_per_host_bounds, num_slices=1)
    except RuntimeError as e:
      if "INVALID_ARGUMENT" in str(e):
        raise ValueError(f"--topology={tpu.topology}: libtpu: "
                         f"{str(e).split(':', 1)[-1].strip()}") from None
      raise
  return list(desc.devices)


def without_data_files(config, vocab_size: int):
  """(config, note): a SentencePiece config without its model file gets `vocab_size` tokens.

  Building the task reads nothing else: the step's shapes depend on the vocabulary alone.
  """
  data = config.data
  if config.task != "lm" or data.get("tokenizer") != "sentencepiece" or data.name in (
      "python_source", "markov"):
    return config, None
  if data.get("spm_model"):
    import data as data_lib  # pylint: disable=g-import-not-at-top
    vocab_size = data_lib.vocab_size(data)
    note = f"vocabulary: {vocab_size} from {data.spm_model}"
  else:
    note = (f"vocabulary: {vocab_size} (--vocab_size) stands in for config.data.spm_model, "
            "which is not given")
  config = config.copy_and_resolve_references()
  config.data.name = "markov"
  config.data.markov.vocab_size = vocab_size
  return config, note


def _image_spec(config):
  from data import images  # pylint: disable=g-import-not-at-top
  info = images.image_info(config.data)
  return {"image": ((info["height"], info["width"], info["channels"]), "float32"),  # [H, W, C]
          "label": ((), "int32")}


# Per-example trailing shapes and dtypes of each task's batch (the loaders' contract).
_EXAMPLE_SPECS = {
    "lm": lambda config: {"tokens": ((config.seq_len + 1,), "int32")},  # [seq_len + 1]
    "mlm": lambda config: {"tokens": ((config.seq_len,), "int32"),  # [seq_len] each
                           "targets": ((config.seq_len,), "int32"),
                           "weights": ((config.seq_len,), "float32")},
    "image": _image_spec,
}


def abstract_inputs(s):
  """ShapeDtypeStructs with shardings for (batch, lr_inputs) of the trainer's step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from train import trainer  # pylint: disable=g-import-not-at-top
  task = s.config.task
  if task not in _EXAMPLE_SPECS:
    raise ValueError(f"config.task={task!r}: preflight knows the batch shapes of "
                     f"{sorted(_EXAMPLE_SPECS)}; add it to launch/preflight.py _EXAMPLE_SPECS.")
  shardings = trainer.batch_shardings(s, leading=(None,))
  batch = {  # [k micro-batches, micro_batch, ...]
      key: jax.ShapeDtypeStruct((s.num_microbatches, s.micro_batch_size) + shape,
                                jnp.dtype(dtype), sharding=shardings[key])
      for key, (shape, dtype) in _EXAMPLE_SPECS[task](s.config).items()}
  replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  lr_inputs = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
  for key in ("tokens", "batch_size", "lr_scale"):
    lr_inputs[key] = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
  return batch, lr_inputs


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def memory_use(compiled) -> MemoryUse:
  m = compiled.memory_analysis()
  return MemoryUse(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                   aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                   code=m.generated_code_size_in_bytes)


def xla_flops(compiled) -> float | None:
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else {}
  flops = (costs or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def _advice(config) -> str:
  tips = ["more chips"]
  if config.mesh.get("fsdp", 1) == 1:
    tips.append("--config.mesh.fsdp=-1 (with --config.mesh.data=1)")
  tips.append("a smaller --config.micro_batch_size")
  if not config.model.get("remat", True):
    tips.append("--config.model.remat=True")
  return "try " + ", ".join(tips)


def _where(tpu: common.TpuSlice, device_kind: str) -> str:
  return (f"{tpu.topology} ({tpu.num_devices} x {device_kind}, "
          f"{format_bytes(tpu.gen.hbm_per_device)} HBM each)")


def check_fits(report: Report, config) -> None:
  if not report.fits:
    raise DoesNotFit(
        f"{report.label} does not fit {_where(report.tpu, report.device_kind)}: it needs "
        f"{format_bytes(report.memory.total)} per device; {_advice(config)}.")


def preflight(config, tpu: common.TpuSlice, label: str = "config", vocab_size: int = 32000,
              verbose: bool = False) -> Report:
  """Compiles the trainer's step for `tpu`; raises DoesNotFit when it would not fit."""
  require_libtpu()
  prepare_environment()
  import jax  # pylint: disable=g-import-not-at-top
  from train import trainer  # pylint: disable=g-import-not-at-top
  from sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sharding import rules as rules_lib  # pylint: disable=g-import-not-at-top

  config, note = without_data_files(config, vocab_size)
  devices = topology_devices(tpu, verbose)
  num_processes = len({d.process_index for d in devices})
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  s = trainer.setup(config, mesh=mesh)
  if s.micro_batch_size % num_processes:
    raise ValueError(f"config.global_batch_size={config.global_batch_size}: micro-batch "
                     f"{s.micro_batch_size} must divide over the slice's {num_processes} hosts.")
  batch, lr_inputs = abstract_inputs(s)
  step = trainer.make_train_step(s)
  start = time.perf_counter()
  with jax.set_mesh(s.mesh), rules_lib.axis_rules(s.rules):
    lowered = step.jitted.lower(s.abstract_state, batch, lr_inputs)
  try:
    with quiet_stderr(verbose):
      compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    why = text.split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0].rstrip(".")
    raise DoesNotFit(f"{label} does not fit {_where(tpu, devices[0].device_kind)}: the TPU "
                     f"compiler says: {why}; {_advice(config)}.") from None
  compile_s = time.perf_counter() - start

  state = s.abstract_state
  report = Report(
      label=label, tpu=tpu, device_kind=devices[0].device_kind, num_processes=num_processes,
      mesh_shape=dict(s.mesh.shape), global_batch_size=config.global_batch_size,
      micro_batch_size=s.micro_batch_size, num_microbatches=s.num_microbatches,
      example=(f"sequences of {config.seq_len} tokens" if config.task in ("lm", "mlm")
               else f"{config.task} examples"),
      num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"])),
      params_per_device=bytes_per_device(state["params"]),
      optimizer_per_device=bytes_per_device(state["opt_state"]),
      memory=memory_use(compiled), xla_flops=xla_flops(compiled),
      model_flops=s.task.flops_per_example * config.global_batch_size / len(devices),
      scanned_layers=bool(config.model.get("scan_layers", False)), compile_s=compile_s,
      notes=(note,) if note else ())
  check_fits(report, config)
  return report


def format_bytes(n: float) -> str:
  for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def format_seconds(t: float) -> str:
  return f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.2f} us"


def format_report(r: Report) -> str:
  mem = r.memory
  mesh = " ".join(f"{k}={v}" for k, v in r.mesh_shape.items())
  peak = r.tpu.gen.peak_flops_per_device
  lines = [
      f"preflight: {r.label} on {r.tpu.topology} ({r.tpu.accelerator_type}): "
      f"{r.tpu.num_devices} x {r.device_kind}, {r.num_processes} host(s)",
      f"mesh: {mesh}; global batch {r.global_batch_size} = {r.num_microbatches} x "
      f"{r.micro_batch_size} {r.example}",
      f"model: {r.num_params / 1e6:.2f}M parameters; per device: parameters "
      f"{format_bytes(r.params_per_device)}, optimizer state "
      f"{format_bytes(r.optimizer_per_device)}",
      *r.notes,
      f"compiled the train step in {r.compile_s:.1f} s",
      "memory per device (compiled.memory_analysis()):",
      f"  arguments    {format_bytes(mem.arguments):>12}  (train state + batch)",
      f"  outputs      {format_bytes(mem.outputs):>12}  "
      f"({format_bytes(mem.aliased)} of it in place of the donated state)",
      f"  temporaries  {format_bytes(mem.temporaries):>12}",
      f"  code         {format_bytes(mem.code):>12}",
      f"  total        {format_bytes(mem.total):>12}  = {100 * mem.total / r.hbm:.1f}% of "
      f"{format_bytes(r.hbm)} HBM: {'fits' if r.fits else 'does NOT fit'}",
      "FLOPs per device per step:",
      f"  model (models/flops.py)        {r.model_flops:.3e}  = "
      f"{format_seconds(r.model_flops / peak)} at the {peak / 1e12:g} TFLOP/s bf16 peak",
  ]
  if r.xla_flops is not None:
    caveat = " (a scanned layer's body counted once)" if r.scanned_layers else ""
    lines.append(f"  XLA cost analysis              {r.xla_flops:.3e}{caveat}")
  return "\n".join(lines)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file (file.py:variant).",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, f"TPU slice: {common.TOPOLOGY_EXAMPLES}.")
  flags.DEFINE_integer("vocab_size", 32000,
                       "Vocabulary for a SentencePiece config whose model file is not given.")
  flags.DEFINE_bool("verbose", False, "Show libtpu's own log lines.")
  flags.DEFINE_bool("traceback", False, "Print the full traceback for input errors.")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  tpu = common.parse_topology(f.topology)
  label = os.path.basename(f["config"].config_filename)
  print(format_report(preflight(f.config, tpu, label, f.vocab_size, f.verbose)), flush=True)


if __name__ == "__main__":
  from train import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  sys.exit(cli.run(main))
