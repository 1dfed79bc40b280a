"""Bad input through the real CLIs: one line on stderr naming the field and what is valid,
exit status 2, no traceback (unless --traceback), and nothing compiled or trained first.

Every case exits while validating, so each costs a process start (~2.5 s of CPU), not a run.
"""
import pytest

from tests import testlib
from tests.reliability import conftest as rel

LM = "--config=configs/lm.py:tiny"
SWEEP = "--config=configs/sweep.py:test"
CSV = "--csv=tests/testdata/chinchilla_svg_extracted.csv"
EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # for mesh divisibility

# id: (module, args, substrings of the error line: the field, then what is valid, env)
CASES = {
    # Config keys and types.
    "unknown_key_flag": ("train", (LM, "--config.optimizer.no_such=1"),
                         ("--config.optimizer.no_such", "no field 'no_such'")),
    "misspelt_key_flag": ("train", (LM, "--config.num_step=5"),
                          ("--config.num_step", "no field 'num_step'; did you mean 'num_steps'?")),
    "unknown_key_in_variant": ("train", (LM + ",nonsense=3",),
                               ("config.nonsense", "valid: ['async_checkpointing'")),
    "wrong_type_int": ("train", (LM, "--config.num_steps=abc"),
                       ("--config.num_steps=abc", "expected an integer")),
    "wrong_type_bool": ("train", (LM, "--config.async_checkpointing=maybe"),
                        ("--config.async_checkpointing=maybe", "true or false")),
    # Sizes and intervals.
    "zero_global_batch": ("train", (LM + ",global_batch_size=0",),
                          ("config.global_batch_size=0", "positive integer")),
    "negative_num_steps": ("train", (LM, "--config.num_steps=-5"),
                           ("config.num_steps=-5", "integer >= 1")),
    "zero_checkpoint_every": ("train", (LM, "--config.checkpoint_every=0"),
                              ("config.checkpoint_every=0", "integer >= 1")),
    "negative_eval_every": ("train", (LM, "--config.eval_every=-1"),
                            ("config.eval_every=-1", ">= 0 (0 = off)")),
    "micro_batch_not_dividing": ("train", (LM, "--config.micro_batch_size=5"),
                                 ("config.micro_batch_size=5",
                                  "must divide config.global_batch_size=16")),
    "seq_len_over_model": ("train", (LM, "--config.seq_len=512"),
                           ("config.seq_len=512", "config.model.max_seq_len=128")),
    "heads_not_dividing": ("train", (LM, "--config.model.num_heads=3"),
                           ("config.model.num_heads=3", "must divide config.model.d_model")),
    # Optimizer and schedule numbers, and the eval split (before any step).
    "negative_peak_lr": ("train", (LM, "--config.schedule.peak_lr=-0.003"),
                         ("config.schedule.peak_lr=-0.003", "finite number > 0")),
    "nan_peak_lr": ("train", (LM, "--config.schedule.peak_lr=nan"),
                    ("config.schedule.peak_lr=nan", "finite number > 0")),
    "warmup_over_num_steps": ("train", (LM, "--config.schedule.warmup_steps=1000",
                                                    "--config.num_steps=20"),
                              ("config.schedule.warmup_steps=1000", "<= config.schedule.total_steps=20")),
    "negative_weight_decay": ("train", (LM, "--config.optimizer.weight_decay=-1"),
                              ("config.optimizer.weight_decay=-1", ">= 0")),
    "b2_over_one": ("train", (LM, "--config.optimizer.b2=1.5"),
                    ("config.optimizer.b2=1.5", "in [0, 1)")),
    "eval_split_under_one_batch": ("train", (LM, "--config.eval_batch_size=100000"),
                                   ("config.eval_batch_size=100000",
                                    "more than the eval split holds")),
    # Mesh, batch and sequence divisibility.
    "mesh_over_devices": ("train", (LM, "--config.mesh.data=3"),
                          ("config.mesh=", "product of the axis sizes must equal")),
    "batch_vs_mesh": ("train", (LM, "--config.global_batch_size=12"),
                      ("config.global_batch_size=12", "data-parallel size 8"), EIGHT),
    "eval_batch_vs_mesh": ("train", (LM, "--config.eval_batch_size=12"),
                           ("config.eval_batch_size=12", "data-parallel size 8"), EIGHT),
    "seq_vs_sequence_axis": ("train",
                             (LM, "--config.mesh.sequence=2", "--config.seq_len=63"),
                             ("config.seq_len=63", "sequence axis"), EIGHT),
    # Names.
    "unknown_optimizer": ("train", (LM, "--config.optimizer.name=adam"),
                          ("config.optimizer.name='adam'", "'adamw'")),
    "unknown_schedule": ("train", (LM, "--config.schedule.name=exp"),
                         ("config.schedule.name='exp'", "'cosine'")),
    "unknown_dataset": ("train", (LM, "--config.data.name=wikitext"),
                        ("config.data.name='wikitext'", "'python_source'")),
    "unknown_controller": ("train", (LM, "--config.batch_size.controller=magic"),
                           ("config.batch_size.controller='magic'", "noise_scale")),
    "unknown_nan_policy": ("train", (LM, "--config.nan_policy=ignore"),
                           ("config.nan_policy='ignore'", "'skip'")),
    "unknown_variant": ("train", ("--config=configs/lm.py:huge",),
                        ("variant 'huge'", "'tiny'")),
    # Files, directories and flags.
    "missing_config_file": ("train", ("--config=configs/nope.py",),
                            ("--config=configs/nope.py", "No such file")),
    "unwritable_workdir": ("train", (LM, "--workdir={file}/sub"),
                           ("--workdir=", "cannot be written (Not a directory)")),
    "init_from_not_a_run": ("train", (LM, "--config.init_from={tmp}/nothing"),
                            ("config.init_from=", "workdir of an earlier run")),
    "unknown_flag": ("train", (LM, "--no_such_flag"),
                     ("no_such_flag", "--helpfull")),
    # The sweep and fit CLIs.
    "sweep_too_few_steps": ("sweep", (SWEEP, "--config.grid.tokens=(64,)"),
                            ("config.grid.tokens", "at least 2")),
    "fit_csv_missing_column": ("laws.fit",
                               (CSV, "--mapping=N:Model Size,C:Training FLOP,loss:nope"),
                               ("'loss' -> 'nope'", "the file has columns")),
    "fit_missing_csv_file": ("laws.fit", ("--csv={tmp}/none.csv", "--mapping=N:N"),
                             ("--csv=", "No such file or directory")),
}


def _run(module, args, tmp_path, env=None):
  file = tmp_path / "a_file"
  file.write_text("")
  args = [a.format(tmp=tmp_path, file=file) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'workdir'}")
  return testlib.run_cli(module, *args, env=env, timeout=300)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path):
  module, args, (field, valid), *env = CASES[case]
  proc = _run(module, args, tmp_path, env[0] if env else None)
  _, other = rel.log_lines(proc.stderr)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(other) == 1, proc.stderr[-3000:]  # the error; absl log lines aside
  line = other[0]
  assert line.startswith("error: ") and field in line and valid in line, line
  assert not (tmp_path / "workdir" / "metrics.jsonl").exists()  # nothing trained
  rel.record("bad_input", case=case, runs=1, survived=1, exit=proc.returncode)


def test_missing_workdir_flag():
  proc = testlib.run_cli("train", LM)
  assert proc.returncode == 2
  assert rel.log_lines(proc.stderr)[1] == [
      "error: flag --workdir=None: Flag --workdir must have a value other than None."]


def test_traceback_flag_shows_the_traceback(tmp_path):
  proc = _run("train", (LM, "--config.nan_policy=ignore", "--traceback"), tmp_path)
  assert proc.returncode == 2
  assert "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.nan_policy='ignore'")
