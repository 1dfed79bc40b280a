r"""One multi-GPU node: install CUDA JAX, check the GPUs, train over all of them.

  python -m launch.gpu_node --config=configs/lm.py:125m --workdir=/data/lm125m \
      --mesh=fsdp -- --config.data.spm_model=/data/c4_32k.model

Run it on the node, from the repository root. One process drives every visible GPU
(CUDA_VISIBLE_DEVICES picks them); --mesh=data replicates the parameters over the GPUs
(config.mesh data=-1), --mesh=fsdp shards them (fsdp=-1), --mesh=config keeps the config's.
Steps: `install`, `check`, `run`, or `all` (the default). --dry-run prints the commands.
"""
from __future__ import annotations

import dataclasses
import sys

from launch import common

STEPS = ("install", "check", "run", "all")
MESHES = {
    "data": ("--config.mesh.data=-1", "--config.mesh.fsdp=1"),
    "fsdp": ("--config.mesh.data=1", "--config.mesh.fsdp=-1"),
    "config": (),
}
JOBS = {"train": "train", "sweep": "sweep"}


@dataclasses.dataclass(frozen=True)
class Options:
  config: str = ""
  workdir: str = ""
  job: str = "train"
  mesh: str = "data"
  args: tuple = ()  # passed on to train / sweep
  python: str = "python3"
  cuda: str = "cuda12"  # the jax extra: jax[cuda12]
  jax_version: str = ""  # '' = the jax pin in requirements.txt


def validate(opts: Options, step: str) -> None:
  if step not in STEPS:
    raise ValueError(f"unknown step {step!r}; valid: {', '.join(STEPS)}.")
  if opts.mesh not in MESHES:
    raise ValueError(f"--mesh={opts.mesh!r}: valid are {', '.join(MESHES)}.")
  if opts.job not in JOBS:
    raise ValueError(f"--job={opts.job!r}: valid are {', '.join(JOBS)}.")
  if step in ("run", "all"):
    if not opts.config:
      raise ValueError("--config is required (e.g. --config=configs/lm.py:125m).")
    if not opts.workdir:
      raise ValueError("--workdir is required.")


def install_commands(opts: Options) -> list[list[str]]:
  version = opts.jax_version or common.pinned_version("jax")
  return [[opts.python, "-m", "pip", "install", "-r", "requirements.txt",
           f"jax[{opts.cuda}]=={version}"]]


# JAX_PLATFORMS=cuda fails loudly when no GPU is visible, instead of training on the CPU.
_ENV = ["env", "JAX_PLATFORMS=cuda"]


def check_commands(opts: Options) -> list[list[str]]:
  probe = ('import jax; d = jax.devices(); '
           'print(len(d), "x", d[0].device_kind, "on", jax.default_backend())')
  return [[*_ENV, opts.python, "-c", probe]]


def run_commands(opts: Options) -> list[list[str]]:
  return [[*_ENV, opts.python, "-m", JOBS[opts.job], f"--config={opts.config}",
           f"--workdir={opts.workdir}", *MESHES[opts.mesh], *opts.args]]


def commands(opts: Options, step: str) -> list[list[str]]:
  validate(opts, step)
  if step == "all":
    return install_commands(opts) + check_commands(opts) + run_commands(opts)
  return {"install": install_commands, "check": check_commands, "run": run_commands}[step](opts)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("config", "", "--config for the job.")
  flags.DEFINE_string("workdir", "", "--workdir for the job.")
  flags.DEFINE_enum("job", "train", list(JOBS), "train or sweep.")
  flags.DEFINE_enum("mesh", "data", list(MESHES), "data=-1, fsdp=-1, or the config's mesh.")
  flags.DEFINE_string("python", "python3", "Python to install into and run with.")
  flags.DEFINE_string("cuda", "cuda12", "The jax extra for the CUDA version: jax[cuda12].")
  flags.DEFINE_string("jax_version", "", "jax version; '' = the pin in requirements.txt.")
  flags.DEFINE_bool("dry_run", False, "Print the commands; run nothing.")
  flags.DEFINE_alias("dry-run", "dry_run")
  flags.DEFINE_bool("traceback", False, "Print the full traceback for input errors.")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  step, args = "all", argv[1:]
  if args and args[0] in STEPS:
    step, args = args[0], args[1:]
  opts = Options(config=f.config, workdir=f.workdir, job=f.job, mesh=f.mesh, args=tuple(args),
                 python=f.python, cuda=f.cuda, jax_version=f.jax_version)
  try:
    common.Runner(f.dry_run).run(commands(opts, step))
  except common.CommandFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  from train import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  sys.exit(cli.run(main))
