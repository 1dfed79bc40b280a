"""Masked-LM batches (Devlin et al. 2019 §3.1 "Task #1: Masked LM"), from the LM token streams.

A split's token stream (`data.lm.token_stream`: python_source bytes by default)
is cut into non-overlapping windows of `seq_len` tokens. In each window exactly
round(mask_prob · seq_len) positions are chosen (Google BERT's `create_pretraining_data.py`
picks a fixed count too); a chosen token becomes [MASK] with probability 0.8, a uniformly
random real token with 0.1, and stays itself with 0.1. The loss is predicted only at the
chosen positions (`weights`). [MASK] is the id just past the data vocabulary (257 for bytes),
so the model embeds `vocab_size(data) + 1` ids. No [CLS]/[SEP] and no next-sentence task (Liu
et al. 2019, RoBERTa, find it unneeded).

Masks are drawn by grain's per-record generator, seeded by the seed and the record's position
in the epoch-repeated stream: deterministic per seed, new for each epoch (RoBERTa's dynamic
masking), independent of the process count, and restored exactly with the iterator state.
"""
from __future__ import annotations

import functools

import grain
import numpy as np

from data import lm

MASK_PROB = 0.15
MASK_TOKEN_FRAC = 0.8  # of the chosen positions: [MASK]
RANDOM_TOKEN_FRAC = 0.1  # random token; the remaining 0.1 keep the original


def mask_id(data_config) -> int:
  """The [MASK] id: one past the data vocabulary."""
  return lm.vocab_size(data_config)


def mlm_vocab_size(data_config) -> int:
  """Ids the MLM model embeds and predicts: the data vocabulary plus [MASK]."""
  return lm.vocab_size(data_config) + 1


def mask_tokens(tokens_T: np.ndarray, rng: np.random.Generator, *, mask_token: int,
                num_real_tokens: int, mask_prob: float = MASK_PROB) -> dict:
  """The 80/10/10 rule on one window: {'tokens' (input), 'targets', 'weights'} of shape [T]."""
  t = len(tokens_T)
  n = max(1, int(round(t * mask_prob)))
  chosen_N = rng.choice(t, size=n, replace=False)
  u_N = rng.random(n)
  inputs_T = np.array(tokens_T, np.int32)
  inputs_T[chosen_N[u_N < MASK_TOKEN_FRAC]] = mask_token
  randomised = chosen_N[(u_N >= MASK_TOKEN_FRAC) & (u_N < MASK_TOKEN_FRAC + RANDOM_TOKEN_FRAC)]
  inputs_T[randomised] = rng.integers(0, num_real_tokens, size=len(randomised))
  weights_T = np.zeros(t, np.float32)
  weights_T[chosen_N] = 1.0
  return {'tokens': inputs_T, 'targets': np.asarray(tokens_T, np.int32), 'weights': weights_T}


def _window(stream, seq_len, w):
  return np.asarray(stream[w * seq_len:(w + 1) * seq_len], np.int32)


def make_mlm_iterator(data_config, *, split: str, global_batch_size: int, seq_len: int,
                      seed: int, process_index: int = 0, process_count: int = 1,
                      data_dir: str | None = None, repeat: bool = True,
                      mask_prob: float = MASK_PROB) -> grain.DatasetIterator:
  """Yields {'tokens', 'targets': int32[b, T], 'weights': float32[b, T]}, b = global / P.

  Training (`repeat=True`) shuffles windows with the seed, a new order each epoch; an eval
  pass (`repeat=False`) reads windows in order and ends after the last full global batch.
  Global batch j is the same rows whatever the process count; process p reads rows
  [p*b, (p+1)*b). Checkpoint with `get_state()` / `set_state()`.
  """
  lm.check_process_shard(global_batch_size, process_index, process_count)
  stream = lm.token_stream(data_config, split, data_dir)
  num_windows = len(stream) // seq_len
  num_batches = num_windows // global_batch_size
  if num_batches == 0:
    raise ValueError(f'split {split!r} of {data_config.name} has {len(stream)} tokens: less '
                     f'than one global batch of {global_batch_size} x {seq_len}')
  ds = grain.MapDataset.range(num_windows)
  ds = ds.shuffle(seed=seed).repeat() if repeat else ds[:num_batches * global_batch_size]
  ds = ds.map(functools.partial(_window, stream, seq_len))
  ds = ds.random_map(functools.partial(
      mask_tokens, mask_token=mask_id(data_config), num_real_tokens=mask_id(data_config),
      mask_prob=mask_prob), seed=seed)
  # Local batch k holds global rows [k*b, (k+1)*b): global batch j, process p is k = j*P + p.
  ds = ds.batch(global_batch_size // process_count)[process_index::process_count]
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.get('read_threads', 2),
      prefetch_buffer_size=data_config.get('prefetch_batches', 2))))
