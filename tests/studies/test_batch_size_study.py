"""The batch-size study's pieces: runs end at the target loss, and the table and fit it writes."""
import json
import os

from studies.mccandlish2018_batch_size import study as study
from tests.reliability import conftest as rel


def test_a_run_stops_at_the_target_with_a_checkpoint(tmp_path):
  config = study.run_config("tiny", batch=8, micro=8, controller="fixed", max_batch=8,
                            max_tokens=8 * 64 * 200, base_lr=3e-3, eta=0.3)
  config.mesh.data = -1
  result, rows = study.run("fixed_8", config, str(tmp_path), target=4.0)
  assert result["status"] == "stopped"
  steps, tokens, _ = study.steps_and_tokens_to_target(rows, 4.0)
  # It stopped at the first step whose loss EMA reached the target, well before max_tokens.
  assert result["step"] == steps == rows[-1]["step"] < config.num_steps
  assert tokens == steps * 8 * 64
  assert rel.checkpoint_steps(tmp_path / "fixed_8") == [steps]


def test_outputs_fit_the_fixed_batch_runs(tmp_path):
  """Runs that follow S = S_min(1 + B_crit/B) exactly give back S_min and B_crit."""
  s_min, b_crit = 48.0, 16.0  # integer steps at every B
  table = []
  for b in (8, 16, 32, 64):
    steps = round(s_min * (1 + b_crit / b))
    table.append(dict(run=f"fixed_{b}", steps=steps, tokens=steps * b * 64, final_batch=b,
                      final_loss=2.5, noise_scale=None))
  table.append(dict(run="norm_test", steps=None, tokens=None, final_batch=64, final_loss=2.7,
                    noise_scale=None))
  study.write_outputs(table, str(tmp_path), target=2.5, seq_len=64)
  text = (tmp_path / "batch_size_study.md").read_text()
  assert "S_min = 48 steps, B_crit = 16.0 sequences" in text
  assert "| norm_test | not reached |" in text
  assert json.loads((tmp_path / "batch_size_study.json").read_text()) == table
  assert os.path.getsize(tmp_path / "batch_size_study.png") > 10_000
