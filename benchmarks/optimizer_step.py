r"""Train-step time of LAMB, LARS and optax.lamb as ratios to AdamW, on the `small` LM.

  nice -n 5 python -m benchmarks.optimizer_step                # small LM, batch 8
  python -m benchmarks.optimizer_step --batch_size=32 --repeats=4

Every optimizer gets the trainer's own jitted step (`train.trainer.make_train_step`:
forward, backward, optimizer, donated state) on the same random batch. The optimizers are
timed interleaved, round by round (the order rotates), and each round's time is divided by
AdamW's time in the same round, so a slow patch of a shared machine hits every optimizer alike;
the table gives the median over rounds. A second table times the optimizer update alone
(`tx.update` + `optax.apply_updates`, jitted, params and optimizer state donated), and the
first table's last column is the step ratio those update times imply,
1 + (update - update_AdamW) / step_AdamW: on a noisy machine the steadier estimate.

The update-only times overstate LAMB and optax.lamb on CPU: there the trust ratio's u = r + λx
is a fresh temporary (34 MB for `small`) that XLA:CPU allocates, and the OS page-faults in, on
every call, whereas inside the train step XLA places it in dead gradient buffers (the step's
temporary memory is the same as AdamW's, `compiled.memory_analysis()`).

The default batch (8 sequences of 128 bytes) is smaller than the `small` config's 32, so the
optimizer is a larger share of the step than in training: the ratios are an upper bound.
`optax_lamb` (optax.lamb(weight_decay=0.01): trust ratio on every leaf, one norm per leaf) is
built here only; it is not one of `optimizers.factory.OPTIMIZERS`.

Measured on 2 shared CPU cores (load average 8-14), train-step ratio to AdamW, median of rounds
(implied by update time): batch 8, 8 rounds: LAMB 1.008 (1.022), LARS 1.056 (0.999), optax.lamb
0.987 (1.044), AdamW step 3.4 s; batch 1, 10 rounds of 2 steps: LAMB 1.126 (1.126), LARS 0.976
(0.993), optax.lamb 1.155 (1.263), AdamW step 0.37 s. Update only: LAMB 2.6-2.8x AdamW, LARS
0.86-0.91x, optax.lamb 4.5x.
"""
from __future__ import annotations

import time
from unittest import mock

from absl import app
from absl import flags
import jax
import numpy as np
import optax

from train import trainer
from configs import lm as lm_config

_OPTIMIZERS = flags.DEFINE_list("optimizers", ["adamw", "lamb", "lars", "optax_lamb"],
                                "Optimizers to time; the first is the reference (ratio 1).")
_VARIANT = flags.DEFINE_string("variant", "small", "lm.py variant (model shape, sequence).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_REPEATS = flags.DEFINE_integer("repeats", 8, "Interleaved rounds (median over rounds).")
_STEPS = flags.DEFINE_integer("steps", 1, "Steps per optimizer per round.")
_UPDATE_STEPS = flags.DEFINE_integer("update_steps", 10, "Optimizer-only updates per round.")

BENCHMARK_ONLY = ("optax_lamb",)


def optax_lamb() -> optax.GradientTransformation:
  """optax.lamb as the factory would wrap it (runtime learning rate, docs/papers.md §1.3)."""
  return optax.inject_hyperparams(
      lambda learning_rate: optax.lamb(learning_rate, weight_decay=0.01))(learning_rate=0.0)


def make_setup(config, name: str) -> trainer.Program:
  """trainer.setup with `config.optimizer.name = name`; benchmark-only names patched in."""
  config = config.copy_and_resolve_references()
  if name not in BENCHMARK_ONLY:
    config.optimizer.name = name
    return trainer.setup(config)
  with mock.patch.object(trainer.opt_factory, "make_optimizer", lambda *a, **k: optax_lamb()):
    return trainer.setup(config)


class _Runner:
  """One optimizer's compiled train step and update, with their state."""

  def __init__(self, config, name: str, tokens_BxT1: np.ndarray):
    self.s = s = make_setup(config, name)
    self.state = trainer.init_state(s, config.seed)
    self.train_step = trainer.make_train_step(s)
    self.batch = trainer.global_batch(s, [{"tokens": tokens_BxT1}])
    self.lr_inputs = {"step": np.int32(100), "tokens": np.float32(1e6),
                      "batch_size": np.float32(config.global_batch_size),
                      "lr_scale": np.float32(1e-3)}  # tiny steps: no drift over the rounds
    self.grads = jax.tree.map(lambda p: 1e-3 * np.ones(p.shape, p.dtype),
                              jax.device_get(self.state["params"]))

    def update(params, opt_state, grads):
      updates, opt_state = s.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    self.update = jax.jit(update, donate_argnums=(0, 1))
    # The update-only state is a copy, so the train step keeps its own donated buffers.
    self.u_params = jax.tree.map(lambda x: x.copy(), self.state["params"])
    self.u_opt = self.s.tx.init(self.u_params)

  def steps(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics, _ = self.train_step(self.state, self.batch, self.lr_inputs)
    jax.block_until_ready(metrics["loss"])
    return (time.perf_counter() - start) / n

  def updates(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.u_params, self.u_opt = self.update(self.u_params, self.u_opt, self.grads)
    jax.block_until_ready(self.u_params)
    return (time.perf_counter() - start) / n


def interleaved(runners: dict, fn_name: str, n: int, repeats: int) -> dict:
  """{name: per-round seconds}; the order rotates every round."""
  names = list(runners)
  times = {k: [] for k in names}
  for r in range(repeats):
    for k in names[r % len(names):] + names[:r % len(names)]:
      times[k].append(getattr(runners[k], fn_name)(n))
  return {k: np.array(v) for k, v in times.items()}


def table(times: dict, ref: str, title: str, update_times: dict | None = None) -> str:
  """Median time and median per-round ratio to `ref`; with `update_times`, also the step
  ratio implied by the update-only times, 1 + (update - update_ref) / step_ref, which is far
  less noisy than the direct ratio when the optimizer is a small part of the step."""
  implied = "" if update_times is None else " implied by update time |"
  lines = [f"| optimizer | {title} (ms, median) | ratio to {ref} (median) | ratio range |"
           + implied, "|---|---|---|---|" + ("---|" if implied else "")]
  for k, t in times.items():
    ratios = t / times[ref]
    row = (f"| {k} | {1e3 * np.median(t):.1f} | {np.median(ratios):.3f} | "
           f"{ratios.min():.2f}-{ratios.max():.2f} |")
    if update_times is not None:
      extra = np.median(update_times[k]) - np.median(update_times[ref])
      row += f" {1 + extra / np.median(times[ref]):.3f} |"
    lines.append(row)
  return "\n".join(lines)


def run(variant: str, batch_size: int, names, repeats: int, steps: int,
        update_steps: int) -> tuple[dict, dict]:
  config = lm_config.get_config(f"{variant},global_batch_size={batch_size},mesh.data=-1")
  tokens = np.random.default_rng(0).integers(0, 256, (batch_size, config.seq_len + 1),
                                             dtype=np.int32)
  runners = {}
  for k in names:
    runners[k] = _Runner(config, k, tokens)
    runners[k].steps(1)  # compile
    runners[k].updates(1)
  return (interleaved(runners, "steps", steps, repeats),
          interleaved(runners, "updates", update_steps, repeats))


def main(argv):
  del argv
  names = _OPTIMIZERS.value
  start = time.time()
  step_times, update_times = run(_VARIANT.value, _BATCH.value, names, _REPEATS.value,
                                 _STEPS.value, _UPDATE_STEPS.value)
  config = lm_config.get_config(_VARIANT.value)
  print(f"\nlm.py:{_VARIANT.value}, batch {_BATCH.value} x {config.seq_len} tokens, "
        f"{jax.devices()[0].device_kind} x1, {_REPEATS.value} interleaved rounds of "
        f"{_STEPS.value} steps / {_UPDATE_STEPS.value} updates\n")
  print(table(step_times, names[0], "train step", update_times))
  print()
  print(table(update_times, names[0], "optimizer update only"))
  print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
  app.run(main)
