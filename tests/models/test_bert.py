"""BERT: 15% / 80-10-10 masking, bidirectional attention, and the LAMB two-phase recipe."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from train import loop
from train import trainer
from configs import bert as bert_config
from data import lm
from data import mlm
from models import bert
from models import transformer


def _batches(process_count, steps, seed=0, seq_len=64):
  c = lm.default_data_config()
  its = [mlm.make_mlm_iterator(c, split="train", global_batch_size=16, seq_len=seq_len,
                               seed=seed, process_index=p, process_count=process_count)
         for p in range(process_count)]
  return [{k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
          for bs in ([next(it) for it in its] for _ in range(steps))]


def test_masking_follows_the_80_10_10_rule():
  batches = _batches(1, 40)
  tokens, targets, weights = (np.concatenate([b[k] for b in batches])
                              for k in ("tokens", "targets", "weights"))
  chosen = weights.astype(bool)
  assert tokens.shape == (640, 64) and tokens.dtype == np.int32
  assert (chosen.sum(axis=1) == round(0.15 * 64)).all()  # exactly 15% of each window
  assert (tokens[~chosen] == targets[~chosen]).all()  # unchosen positions are untouched
  mask_id = mlm.mask_id(lm.default_data_config())
  assert mask_id == 257 and (tokens[~chosen] != mask_id).all()
  t, y = tokens[chosen], targets[chosen]
  masked, kept = np.mean(t == mask_id), np.mean(t == y)
  # 6400 chosen positions: 0.8 and 0.1 (+ random hits of the original byte) within 4 sigma.
  assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02, (masked, kept)
  randomised = (t != mask_id) & (t != y)
  assert abs(randomised.mean() - 0.1) < 0.02 and t[randomised].max() < mask_id


def test_masks_are_deterministic_per_seed_and_process_count_free():
  one, again = _batches(1, 3), _batches(1, 3)
  two = _batches(2, 3)
  for a, b, c in zip(one, again, two):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
      np.testing.assert_array_equal(a[key], c[key])
  other = _batches(1, 1, seed=1)[0]
  assert not np.array_equal(other["weights"], one[0]["weights"])


def test_encoder_attends_both_ways_and_decoder_does_not():
  cfg = transformer.TransformerConfig(vocab_size=384, d_model=32, num_layers=1, num_heads=2,
                                      mlp_dim=64, mlp_activation="gelu", max_seq_len=16)
  tokens = np.arange(8)[None] % 256
  changed = tokens.copy()
  changed[0, -1] = 200  # only the last token differs
  encoder = bert.Bert(cfg, rngs=nnx.Rngs(0))
  decoder = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  assert encoder(tokens).shape == (1, 8, 384)
  assert not np.allclose(encoder(tokens)[0, 0], encoder(changed)[0, 0])
  np.testing.assert_allclose(decoder(tokens)[0, 0], decoder(changed)[0, 0], rtol=1e-6)


def test_mup_is_refused_by_name():
  cfg = transformer.TransformerConfig(vocab_size=384, d_model=32, num_layers=1, num_heads=2,
                                      mlp_dim=64, parametrization="mup")
  with pytest.raises(ValueError, match="config.model.parametrization='mup'"):
    bert.Bert(cfg, rngs=nnx.Rngs(0))


def test_phase_two_needs_init_from():
  with pytest.raises(ValueError, match="config.init_from is empty"):
    trainer.tasks_lib.make_task(bert_config.get_config("tiny,phase=2"))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


PHASE1_STEPS, PHASE2_STEPS, WARMUP2 = 60, 12, 8


def _phase(phase, **overrides):
  c = bert_config.get_config(f"tiny,phase={phase}")
  c.mesh.update(data=8, fsdp=1)
  c.num_steps = PHASE1_STEPS + (PHASE2_STEPS if phase == 2 else 0)
  c.schedule.phase_start = 0 if phase == 1 else PHASE1_STEPS
  c.schedule.total_steps = PHASE1_STEPS if phase == 1 else PHASE2_STEPS
  c.schedule.warmup_steps = 6 if phase == 1 else WARMUP2
  c.update(eval_every=0, checkpoint_every=1000, async_checkpointing=False, **overrides)
  return c


def test_two_phases_keep_the_optimizer_state_and_rewarm_the_lr(tmp_path, monkeypatch):
  """Phase 1 (seq 32, batch 16) then phase 2 (seq 64, batch 8) from its workdir."""
  seen = {}
  make_train_step = trainer.make_train_step

  def spy(s):
    step_fn = make_train_step(s)

    def wrapped(state, batch, lr_inputs):
      step = int(lr_inputs["step"])
      if step == PHASE1_STEPS:  # phase 2's first step: what it starts from (pre-donation)
        seen["phase2_start"] = jax.device_get(state)
      state, metrics, flags = step_fn(state, batch, lr_inputs)
      if step == PHASE1_STEPS - 1:
        seen["phase1_end"] = jax.device_get(state)
      return state, metrics, flags
    return wrapped
  monkeypatch.setattr(trainer, "make_train_step", spy)

  phase1, phase2 = str(tmp_path / "phase1"), str(tmp_path / "phase2")
  loop.train(_phase(1, seq_len=32, global_batch_size=16, log_every=5), phase1)
  losses = [m["loss"] for m in _metrics(phase1)]
  assert losses[-1] < losses[0] - 1.0, losses  # the MLM loss falls (~6 nats at init)

  result = loop.train(_phase(2, seq_len=64, global_batch_size=8, log_every=1,
                                init_from=phase1), phase2)
  assert result["step"] == PHASE1_STEPS + PHASE2_STEPS

  end, start = seen["phase1_end"], seen["phase2_start"]
  assert int(start["step"]) == PHASE1_STEPS
  jax.tree.map(np.testing.assert_array_equal, start["params"], end["params"])
  # LAMB's moments and counts carry over exactly (not a fresh, all-zero init).
  moments = jax.tree.leaves(start["opt_state"].inner_state)
  jax.tree.map(np.testing.assert_array_equal, start["opt_state"].inner_state,
               end["opt_state"].inner_state)
  assert any(np.abs(m).max() > 0 for m in moments if np.ndim(m) > 1)

  rows = [m for m in _metrics(phase2) if m["step"] > PHASE1_STEPS]
  lrs = np.array([m["lr"] for m in rows])
  peak = bert_config.get_config("tiny,phase=2").schedule.peak_lr
  assert lrs[0] < 0.2 * peak  # re-warmed from ~0 at the phase change
  assert (np.diff(lrs[:WARMUP2]) > 0).all() and lrs[WARMUP2] == pytest.approx(peak, rel=1e-5)
  assert all(m["batch_size"] == 8 for m in rows)
