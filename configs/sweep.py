r"""Scaling-law sweeps: a grid of decoder-LM trials, then the fits and the report.

  python -m sweep --config=configs/sweep.py:tiny --workdir=/tmp/sweep

The grid is the product of model sizes (d_model, num_layers) -> N, token budgets D, batch
sizes B (sequences), learning rates (a log grid), optimizers, schedules, seeds and
parametrizations (standard | mup). Each point is one trial of the `base` trainer config (an
lm.py config); trials that differ only in learning rate or seed share one compiled step.
N is `models.flops.decoder_matmul_params` (matmul parameters: the embedding lookup excluded,
the readout included); D = num_steps x B x seq_len.

Variants:
  tiny    THE MAIN JOB. `markov` corpus with 32 tokens (entropy rate E = 1.7476 nats
          known exactly); 2 models (N = 1.3k, 17k) x 3 D (16k-66k tokens) x 3 B (8-32
          sequences of 16 tokens) x 5 lr (0.01-0.16, factor 2) = 90 trials in 18 compiled
          cells, 32-512 steps each. Measured on this code (2026-12-04): 1 min 19 s wall at
          load ~2, vectorised ('auto'); a second run at load 5-7 gave a byte-identical
          laws.json. Determined by this grid: lr* per cell (16 of 18 interior), Step Law,
          critical batch at N = 1.7e4, Power calibration. Not determined, and reported so:
          L(N, D) (2 model sizes; it needs >= 3) and the critical batch at N = 1280. Best
          loss 1.785 against the known E = 1.7476. The smallest B wins in most cells (these
          models are step-limited), so B*(D) is weakly determined.
  small   ~1 h on an idle 2-core CPU (estimated from the tiny run's costs per compile, per
          step and per FLOP: ~30 min of CPU; not run here): markov with 64 tokens, 4 models
          (N = 1.5k-135k) x 4 D (66k-524k tokens) x 4 B x 6 lr = 384 trials, 64 cells.
  test    the tests' sweep: same code path, 2 models x 3 D x 1 B x 3 lr, seconds a trial.
  tpu     a TPU/GPU ladder (documented, not run here): 5 GPT shapes (N ~12M-300M with a
          32k vocabulary) on `tfds:c4/en` with a SentencePiece model, D from 2e9 to 2e10
          tokens, B 64-1024 sequences of 1024, 7 learning rates; vectorised trials on
          accelerators. Run one worker per host against one database:
            python -m sweep --config=configs/sweep.py:tpu \
                --config.base.data.spm_model=gs://BUCKET/c4_32k.model \
                --workdir=/tmp/ladder --storage=postgresql://USER:PASS@HOST/sweeps
          (or launch/tpu_vm.py to start it on every worker).

Fields (all overridable: `sweep.py:tiny,layout=vectorized` or `--config.grid.seeds="(0,1)"`):
  base                the trainer config each trial starts from (model shape, B, steps, lr
                      and schedule lengths are set per trial).
  grid.*              the axes above; `learning_rates` (explicit) overrides lr_min/lr_max/num_lrs.
  warmup_fraction, decay_fraction   schedule phases as fractions of each trial's steps.
  num_evals           eval-loss points per trial, log-spaced in steps (critical batch curves).
  loss_bound          a loss above it (or NaN/inf) marks a trial diverged; 0 = 1.5 ln(vocab).
  layout              auto (vectorised on GPU/TPU, measure on CPU) | sequential | vectorized |
                      measure (time both on the first cell; the choice is kept in the store).
  vectorized.*        max_trials per program (0 = a whole cell); trial_shards: groups of
                      devices the trial axis is split over (1 = none, 0 = one per device).
  store.*             Optuna storage ('' = sqlite in the workdir), heartbeat, retries.
  study               '' (this grid, then the law fits); a study module's sweep config
                      (e.g. studies/you2020_large_batch/config.py) names its own.
  fit.*               laws/report.py settings (bootstrap sizes, Chinchilla grid, ...).
"""
from __future__ import annotations

import ml_collections

from configs import common
from configs import lm as lm_configs


def _lm_base(seq_len: int, eval_batches: int, eval_batch_size: int,
             data: str = "markov") -> ml_collections.ConfigDict:
  base = lm_configs.get_config("tiny")
  base.data = lm_configs.default_data_config(data)
  base.seq_len = seq_len
  base.model.max_seq_len = seq_len
  base.eval_batches = eval_batches
  base.eval_batch_size = eval_batch_size
  base.keep_checkpoints = 1
  base.optimizer.name = "adamw"
  return base


_VARIANTS = {
    "test": dict(
        base=dict(seq_len=32, eval_batches=1, eval_batch_size=16),
        markov=dict(vocab_size=32), vocab_multiple=32,
        models=((8, 1), (16, 1)), tokens=(2048, 4096, 8192), batch_sizes=(8,),
        lrs=(1e-2, 1e-1, 3), num_evals=4, head_dim=8,
        fit=dict(n_boot=50, chinchilla_n_boot=5, critical_batch_n_boot=20)),
    "tiny": dict(
        base=dict(seq_len=16, eval_batches=2, eval_batch_size=128),
        markov=dict(vocab_size=32), vocab_multiple=32,
        models=((8, 1), (32, 1)), tokens=(2**14, 2**15, 2**16), batch_sizes=(8, 16, 32),
        lrs=(1e-2, 1.6e-1, 5), num_evals=8, head_dim=8,
        fit=dict(n_boot=200, chinchilla_n_boot=50, critical_batch_n_boot=100)),
    "small": dict(
        base=dict(seq_len=64, eval_batches=8, eval_batch_size=32),
        markov=dict(vocab_size=64, num_sequences=8192), vocab_multiple=64,
        models=((8, 1), (16, 1), (32, 2), (64, 2)), tokens=(2**16, 2**17, 2**18, 2**19),
        batch_sizes=(8, 16, 32, 64), lrs=(4e-3, 1.28e-1, 6), num_evals=12, head_dim=8,
        fit=dict(n_boot=1000, chinchilla_n_boot=100, critical_batch_n_boot=200)),
    "tpu": dict(
        base=dict(seq_len=1024, eval_batches=20, eval_batch_size=256, data="tfds:c4/en"),
        models=((256, 4), (384, 6), (512, 8), (768, 12), (1024, 16)),
        tokens=(2e9, 5e9, 1e10, 2e10), batch_sizes=(64, 128, 256, 512, 1024),
        lrs=(2.5e-4, 1.6e-2, 7), num_evals=16, tpu=True,
        fit=dict(n_boot=1000, chinchilla_n_boot=100, critical_batch_n_boot=200)),
}


def add_runtime_fields(c: ml_collections.ConfigDict, study: str = "") -> None:
  """The fields every sweep config has, a study's too: how its trials run and are stored.

  study: the module that supplies the points and their analysis ('' = this grid and the law
  fits; see sweep/runner.py).
  """
  c.study = study
  c.layout = "auto"
  c.vectorized = ml_collections.ConfigDict(dict(max_trials=0, trial_shards=1))
  c.store = ml_collections.ConfigDict(dict(
      storage="",  # '' = sqlite:///<workdir>/sweep.db; postgresql://... for many machines
      study_name="sweep",
      heartbeat_s=10,  # a running trial's worker writes a heartbeat this often
      grace_s=60,  # ...and a trial without one for this long is retried
      max_retries=2,  # re-runs of a trial that raised or whose worker died
      poll_s=2.0))
  # Persistent XLA cache: '' = <workdir>/jax_cache (a resumed sweep or a second worker skips
  # the compiles), 'none' = off, or a directory shared between sweeps.
  c.compilation_cache_dir = ""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = common.parse_arg(arg, "tiny")
  v = common.pick_variant(variant, _VARIANTS, "sweep")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.base = _lm_base(**v["base"])
  c.base.data.markov.update(v.get("markov", {}))
  c.base.model.vocab_multiple = v.get("vocab_multiple", c.base.model.vocab_multiple)
  if v.get("tpu"):
    c.base.data.tokenizer = "sentencepiece"
    c.base.model.update(dtype="bfloat16", scan_layers=True, remat=True, max_seq_len=2048)
  c.grid = ml_collections.ConfigDict(dict(
      models=v["models"],  # (d_model, num_layers) pairs: the N axis
      head_dim=v.get("head_dim", 64 if v.get("tpu") else 16),  # num_heads = d_model // head_dim
      mlp_ratio=4,  # mlp_dim = mlp_ratio * d_model
      tokens=v["tokens"],  # D, training tokens per trial
      batch_sizes=v["batch_sizes"],  # B, sequences per optimizer step
      lr_min=v["lrs"][0], lr_max=v["lrs"][1], num_lrs=v["lrs"][2],  # log-spaced peak lr
      learning_rates=(),  # explicit list; overrides the log grid when not empty
      optimizers=("adamw",),
      schedules=("cosine",),  # peak-lr schedules: cosine, linear, wsd, constant, warmup_poly
      seeds=(0,),
      parametrizations=("standard",)))
  c.warmup_fraction = 0.1
  c.decay_fraction = 0.2  # wsd: the final decay's share of the steps
  c.num_evals = v["num_evals"]
  c.checkpoints_per_trial = 2  # a killed trial resumes from the last of these
  c.loss_bound = 0.0
  add_runtime_fields(c)
  c.fit = ml_collections.ConfigDict(dict(
      seed=0, level=0.95, tol=0.0025, chinchilla_grid="small", n_targets=5, **v["fit"]))
  c.lock()
  common.apply_overrides(c, overrides)
  return c
