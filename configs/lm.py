"""Decoder LM configs.

  python -m train --config=configs/lm.py:tiny --workdir=/tmp/lm_tiny

Variants (measured numbers are in the README, with the commands behind them):
  tiny    ~0.1M params, python_source bytes, 2 CPU cores in under a minute.
  small   ~10M params, python_source bytes, a few minutes on 2 CPU cores.
  ref     the benchmark reference shape: d_model 256, 4 layers, 4 heads, MLP 1024 (GELU),
          sequence 128, batch 32, bytes, AdamW, float32.
  125m / 350m / 1.3b   TPU-sized GPT shapes on a TFDS corpus with a SentencePiece model:
    python -m train --config=configs/lm.py:125m \
        --config.data.spm_model=gs://BUCKET/c4_32k.model --workdir=gs://BUCKET/lm125m
    (use launch/tpu_vm.py to run it on every worker of a slice).
Any field: `lm.py:tiny,num_steps=50` or `--config.optimizer.name=lamb`.
"""
from __future__ import annotations

import ml_collections

from batch_size.config import default_batch_size_config
from configs import common
from data import default_data_config
from optimizers.factory import default_optimizer_config, default_schedule_config


def model_config(**overrides) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict(dict(
      d_model=256, num_layers=4, num_heads=4, head_dim=ml_collections.FieldReference(None, int),
      mlp_dim=1024, mlp_activation="swiglu", max_seq_len=1024, tie_embeddings=False,
      remat=False, scan_layers=False, dtype="float32", attention="dense",
      rope_base=10000.0, parametrization="standard", base_d_model=256, init_std=0.02,
      vocab_multiple=128, readout_zero_init=True))
  m.update(overrides)
  return m


_VARIANTS = {
    "tiny": dict(
        model=dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=256, max_seq_len=128),
        seq_len=64, global_batch_size=16, num_steps=400, eval_every=200, eval_batches=4,
        eval_batch_size=32, checkpoint_every=200, log_every=50, lr=3e-3, warmup=40),
    "small": dict(
        model=dict(d_model=256, num_layers=8, num_heads=4, mlp_dim=1024, max_seq_len=256),
        seq_len=128, global_batch_size=16, num_steps=200, eval_every=100, eval_batches=8,
        eval_batch_size=32, checkpoint_every=100, log_every=10, lr=2e-3, warmup=20),
    "ref": dict(
        model=dict(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, mlp_activation="gelu",
                   max_seq_len=128),
        seq_len=128, global_batch_size=32, num_steps=300, eval_every=300, eval_batches=4,
        eval_batch_size=32, checkpoint_every=300, log_every=50, lr=1e-3, warmup=50),
    "125m": dict(
        model=dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, max_seq_len=2048,
                   dtype="bfloat16", scan_layers=True, remat=True),
        data=dict(name="tfds:c4/en", tokenizer="sentencepiece"),
        mesh=dict(data=-1, fsdp=1), seq_len=1024, global_batch_size=256, num_steps=20000,
        eval_every=1000, eval_batches=20, eval_batch_size=256, checkpoint_every=1000,
        log_every=50, lr=6e-4, warmup=1000),
    "350m": dict(
        model=dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096, max_seq_len=2048,
                   dtype="bfloat16", scan_layers=True, remat=True),
        data=dict(name="tfds:c4/en", tokenizer="sentencepiece"),
        mesh=dict(data=1, fsdp=-1), seq_len=2048, global_batch_size=256, num_steps=40000,
        eval_every=2000, eval_batches=20, eval_batch_size=256, checkpoint_every=1000,
        log_every=50, lr=3e-4, warmup=2000),
    "1.3b": dict(
        model=dict(d_model=2048, num_layers=24, num_heads=32, mlp_dim=8192, max_seq_len=2048,
                   dtype="bfloat16", scan_layers=True, remat=True),
        data=dict(name="tfds:c4/en", tokenizer="sentencepiece"),
        mesh=dict(data=1, fsdp=-1), seq_len=2048, global_batch_size=512, num_steps=50000,
        eval_every=2000, eval_batches=20, eval_batch_size=256, checkpoint_every=1000,
        log_every=50, lr=2e-4, warmup=2000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = common.parse_arg(arg, "tiny")
  v = common.pick_variant(variant, _VARIANTS, "lm")
  c = common.training_defaults()
  c.variant = variant
  c.task = "lm"
  c.model = model_config(**v["model"])
  c.data = default_data_config("python_source")
  c.data.update(v.get("data", {}))
  c.optimizer = default_optimizer_config()
  c.optimizer.name = "adamw"
  c.schedule = default_schedule_config()
  c.schedule.name = "cosine"
  c.schedule.peak_lr = v["lr"]
  c.schedule.warmup_steps = v["warmup"]
  c.schedule.total_steps = c.get_ref("num_steps")
  c.batch_size = default_batch_size_config()
  c.mesh.update(v.get("mesh", {}))
  for key in ("seq_len", "global_batch_size", "num_steps", "eval_every", "eval_batches",
              "eval_batch_size", "checkpoint_every", "log_every"):
    c[key] = v[key]
  c.lock()
  common.apply_overrides(c, overrides)
  return c
