"""BERT masked-LM configs with the two-phase LAMB recipe of You et al. 2020 (§4.1).

The recipe: most steps on short sequences, the rest on long ones, a batch size per phase,
a linear warmup + linear (power 1) decay per phase, the learning rate re-warmed from 0 at the
phase change, and LAMB's state carried over (docs/papers.md §1.4). Each phase is one run; phase 2
starts from phase 1's workdir, whose latest checkpoint gives params, optimizer state, step and
token count (`config.init_from`); its data pipeline starts fresh at the new length:

  python -m train --config=configs/bert.py:tiny --workdir=/tmp/bert1
  python -m train --config=configs/bert.py:tiny,phase=2 \\
      --config.init_from=/tmp/bert1 --workdir=/tmp/bert2

`phase=N` is part of the variant argument (it sets seq_len, batch, steps and the schedule
together); `num_steps` counts from the start of phase 1, so phase 2 ends at the sum.

Variants:
  tiny   d=64, 2 layers, python_source bytes, 15% masking, LAMB. Phase 1: seq 64, batch 32,
         300 steps; phase 2: seq 128, batch 16, 100 steps. Measured on 2 CPU cores (~30 s of
         CPU time per phase): eval MLM loss 2.59 nats per masked byte (masked accuracy 0.34)
         after phase 1, from ln(384) = 5.95 at init; 2.44 (0.38) after phase 2.
  base   BERT-Base shapes (d=768, 12 layers, 12 heads, MLP 3072, GELU; ~110M params with a
         30k vocabulary) with the recipe of the LAMB paper's fastest run ("64k/32k mixed"):
         phase 1 seq 128, batch 65536, 7037 steps; phase 2 seq 512, batch 32768, 1562 steps
         (8599 in all, You et al. 2020 Table 1; 76 min on 1024 TPUv3 chips for BERT-Large).
         Peak lr 6e-3 / 4e-3 with 2000 / 200 warmup steps, the values of NVIDIA's public
         LAMB BERT recipe for these batches [MEM, unconfirmed: docs/papers.md §1.4].
  large  BERT-Large shapes (d=1024, 24 layers, 16 heads, MLP 4096, ~340M) with the same
         recipe: the run of the paper's Table 1.
  base/large read a TFDS text corpus with a SentencePiece model (30k, `train_sentencepiece`):
    python -m train --config=configs/bert.py:large \\
        --config.data.spm_model=gs://BUCKET/wiki_30k.model --workdir=gs://BUCKET/bert1
    (then `:large,phase=2 --config.init_from=gs://BUCKET/bert1`; launch/tpu_vm.py runs it on
    every worker of a slice).
"""
from __future__ import annotations

import ml_collections

from batch_size.config import default_batch_size_config
from configs import common
from configs.lm import model_config
from data import default_data_config
from optimizers.factory import default_optimizer_config, default_schedule_config

_BIG_DATA = dict(name="tfds:wikipedia/20230601.en", tokenizer="sentencepiece",
                 train_split="train[1%:]", eval_split="train[:1%]")
# Phase p: seq_len, global_batch_size, steps, peak lr, warmup steps.
_LAMB_64K_32K = [dict(seq_len=128, batch=65536, steps=7037, lr=6e-3, warmup=2000),
                 dict(seq_len=512, batch=32768, steps=1562, lr=4e-3, warmup=200)]

_VARIANTS = {
    "tiny": dict(
        model=dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=256, mlp_activation="gelu",
                   max_seq_len=128),
        phases=[dict(seq_len=64, batch=32, steps=300, lr=1e-2, warmup=30),
                dict(seq_len=128, batch=16, steps=100, lr=5e-3, warmup=20)],
        eval_batches=4, eval_batch_size=32, log_every=50, eval_every=100, checkpoint_every=100),
    "base": dict(
        model=dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072,
                   mlp_activation="gelu", max_seq_len=512, dtype="bfloat16",
                   scan_layers=True, remat=True),
        data=_BIG_DATA, mesh=dict(data=-1, fsdp=1), phases=_LAMB_64K_32K,
        eval_batches=20, eval_batch_size=512, log_every=50, eval_every=500,
        checkpoint_every=500),
    "large": dict(
        model=dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096,
                   mlp_activation="gelu", max_seq_len=512, dtype="bfloat16",
                   scan_layers=True, remat=True),
        data=_BIG_DATA, mesh=dict(data=1, fsdp=-1), phases=_LAMB_64K_32K,
        eval_batches=20, eval_batch_size=512, log_every=50, eval_every=500,
        checkpoint_every=500),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = common.parse_arg(arg, "tiny")
  phase = int(overrides.pop("phase", 1))
  v = common.pick_variant(variant, _VARIANTS, "bert")
  if not 1 <= phase <= len(v["phases"]):
    raise ValueError(f"bert config phase={phase} is invalid; valid: 1..{len(v['phases'])}.")
  p = v["phases"][phase - 1]
  steps_before = sum(q["steps"] for q in v["phases"][:phase - 1])

  c = common.training_defaults()
  c.variant = variant
  c.task = "mlm"
  c.phase = phase  # set through the variant argument (`bert.py:tiny,phase=2`)
  c.model = model_config(tie_embeddings=True, **v["model"])
  c.data = default_data_config("python_source")
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.update(v.get("data", {}))
  c.optimizer = default_optimizer_config()
  c.optimizer.name = "lamb"
  c.schedule = default_schedule_config()
  c.schedule.name = "warmup_poly"
  c.schedule.poly_power = 1.0  # linear decay (You et al. 2020; Devlin et al. 2019)
  c.schedule.peak_lr = p["lr"]
  c.schedule.warmup_steps = p["warmup"]
  c.schedule.total_steps = p["steps"]  # phase-relative
  c.schedule.phase_start = steps_before  # re-warm from 0 at the phase change
  c.batch_size = default_batch_size_config()
  c.mesh.update(v.get("mesh", {}))
  c.seq_len = p["seq_len"]
  c.global_batch_size = p["batch"]
  c.num_steps = steps_before + p["steps"]
  for key in ("eval_batches", "eval_batch_size", "log_every", "eval_every",
              "checkpoint_every"):
    c[key] = v[key]
  c.lock()
  common.apply_overrides(c, overrides)
  return c
