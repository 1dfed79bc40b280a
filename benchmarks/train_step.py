r"""Train-step time, tokens/s and MFU of the LM configs against a matmul peak measured here.

  python -m benchmarks.train_step            # tiny, small, ref + the plain-JAX baseline

MFU = model FLOPs per second (models/flops.py, PaLM App. B counting) / the float32 matmul
peak of this device measured in the same run (a jitted 2048x2048 matmul). The `ref` shape
(d_model 256, 4 layers, 4 heads, MLP 1024 GELU, sequence 128, batch 32, byte vocabulary,
AdamW, float32) is also run as a plain jitted step without the framework (benchmarks/
plain_decoder.py), so other codebases can be timed on the same shape.
"""
from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import plain_decoder
from train import trainer
from configs import lm as lm_config
from models import flops as flops_lib

_VARIANTS = flags.DEFINE_list("variants", ["tiny", "small", "ref"], "lm.py variants to time.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per variant (after 3 warm-up steps).")


def _time(step, n):
  for _ in range(3):
    step()
  jax.block_until_ready(step())
  start = time.perf_counter()
  for _ in range(n):
    out = step()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / n


def framework_step_time(variant: str, n: int):
  config = lm_config.get_config(f"{variant},mesh.data=-1")
  config.model.vocab_multiple = 1  # the byte vocabulary (257 with end-of-document) as it is
  s = trainer.setup(config)
  state = {"value": trainer.init_state(s, 0)}
  train_step = trainer.make_train_step(s)
  rng = np.random.default_rng(0)
  local = [{"tokens": rng.integers(0, 256, (s.micro_batch_size, config.seq_len + 1),
                                   dtype=np.int32)} for _ in range(s.num_microbatches)]
  batch = trainer.global_batch(s, local)
  lr_inputs = {"step": np.int32(100), "tokens": np.float32(1e6),
               "batch_size": np.float32(config.global_batch_size), "lr_scale": np.float32(1)}

  def step():
    state["value"], metrics, _ = train_step(state["value"], batch, lr_inputs)
    return metrics["loss"]
  cfg = trainer.tasks_lib.transformer.TransformerConfig.from_config(config.model, 257)
  flops = config.global_batch_size * config.seq_len * flops_lib.decoder_train_flops_per_token(
      cfg, config.seq_len)
  return _time(step, n), flops, config


def plain_step_time(config, n: int):
  m = config.model
  params = plain_decoder.init(jax.random.key(0), vocab=257, d_model=m.d_model,
                              num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim)
  tx, step_fn = plain_decoder.make_step()
  state = {"params": params, "opt": tx.init(params)}
  tokens = np.random.default_rng(0).integers(0, 256, (config.global_batch_size,
                                                       config.seq_len + 1), dtype=np.int32)

  def step():
    state["params"], state["opt"], loss = step_fn(state["params"], state["opt"], tokens)
    return loss
  return _time(step, n)


def main(argv):
  del argv
  peak = flops_lib.measure_matmul_peak(n=2048, seconds=3.0)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; measured float32 "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s\n")
  print("| config | params (matmul) | step (ms) | tokens/s | MFU (of measured peak) |")
  print("|---|---|---|---|---|")
  for variant in _VARIANTS.value:
    dt, flops, config = framework_step_time(variant, _STEPS.value)
    tokens = config.global_batch_size * config.seq_len
    cfg = trainer.tasks_lib.transformer.TransformerConfig.from_config(config.model, 257)
    n_params = flops_lib.decoder_matmul_params(cfg)
    print(f"| {variant} | {n_params / 1e6:.2f}M | {1e3 * dt:.1f} | {tokens / dt:,.0f} | "
          f"{100 * flops / dt / peak:.1f}% |", flush=True)
    if variant == "ref":
      plain = plain_step_time(config, _STEPS.value)
      print(f"| ref, plain jitted JAX step | {n_params / 1e6:.2f}M | {1e3 * plain:.1f} | "
            f"{tokens / plain:,.0f} | {100 * flops / plain / peak:.1f}% |", flush=True)


if __name__ == "__main__":
  app.run(main)
