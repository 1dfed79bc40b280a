"""Third-party INFO/WARNING logs (tensorflow_datasets' blocks at every dataset reopen) are
dropped by the entry points (train/cli.py); --third_party_logs shows them again."""
import re

from tests import testlib

CONFIG = ("--config=configs/lm.py:tiny,num_steps=4,checkpoint_every=4,log_every=2,"
          "eval_every=4")
TFDS_LINE = re.compile(r"\b(dataset_builder|dataset_info)\.py:\d+\]")


def _output(workdir, *extra):
  proc = testlib.run_cli("train", CONFIG, "--config.schedule.warmup_steps=1",
                         f"--workdir={workdir}", *extra, check=True)
  return proc.stdout + proc.stderr


def test_tiny_run_prints_no_tfds_lines(tmp_path):
  text = _output(tmp_path / "quiet")
  assert not TFDS_LINE.search(text), text[-3000:]
  assert "step 4/4" in text  # our own INFO lines (the progress line) stay


def test_third_party_logs_flag_shows_them(tmp_path):
  assert TFDS_LINE.search(_output(tmp_path / "loud", "--third_party_logs"))
