"""Language-model batches: a token stream cut into windows, shuffled and batched by grain.

A split is one stream of tokens: documents tokenized and joined with an end-of-document
token (text), or the records of one Markov chain in order (`markov`). Window w is
`stream[w*T : w*T + T + 1]` for T = seq_len, so consecutive windows share one token and
every token but the first is a target exactly once. Windows are shuffled with the seed (a new
order each epoch) and grouped into global batches; global batch j is the same rows in the
same order whatever the number of processes, and process p reads only its rows
[p*b, (p+1)*b), b = global_batch_size // process_count.

The array_record split is read once per (dataset, split, tokenizer) into a flat uint16
token file in the cache dir; a window is then a slice of a memmap, random access that reads
only what it needs (tfds' per-record decoding, ~0.4 ms, would cost more than the step).
"""
import contextlib
import fcntl
import functools
import os
import re

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from data import markov
from data import python_source
from data import tokenizers

_NAMES = "'python_source', 'markov' or 'tfds:<name>' (a TFDS text dataset in array_record)"


def default_data_config(name: str = 'python_source') -> ml_collections.ConfigDict:
  """Every field the loader reads, with defaults; embed as `config.data`."""
  c = ml_collections.ConfigDict()
  c.name = name  # 'python_source' | 'markov' | 'tfds:<name>', e.g. 'tfds:lm1b'
  c.text_key = 'text'  # feature holding the text, for 'tfds:<name>'
  c.tokenizer = 'bytes'  # 'bytes' (vocab 257) | 'sentencepiece'; ignored by 'markov'
  c.spm_model = ''  # path of a SentencePiece .model when tokenizer='sentencepiece'
  c.data_dir = ''  # TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.cache_dir = ''  # tokenized streams; '' = <data_dir>/batchscale_tokens (must be local)
  c.read_threads = 2
  c.prefetch_batches = 2
  c.markov = ml_collections.ConfigDict(dict(
      vocab_size=128, concentration=0.1, num_sequences=2048, num_validation_sequences=128,
      sequence_length=512, seed=0))
  return c


def _kind(data_config) -> str:
  name = data_config.name
  if name in ('python_source', 'markov'):
    return name
  if isinstance(name, str) and name.startswith('tfds:') and len(name) > 5:
    return 'tfds'
  raise ValueError(f'config.data.name={name!r} is not a dataset; valid: {_NAMES}')


def vocab_size(data_config) -> int:
  """Number of token ids the model must embed and predict."""
  if _kind(data_config) == 'markov':
    return data_config.markov.vocab_size
  return tokenizers.make_tokenizer(data_config).vocab_size


def known_entropy_rate(data_config) -> float | None:
  """The exact irreducible loss (nats/token) for 'markov'; None for real text."""
  if _kind(data_config) != 'markov':
    return None
  m = data_config.markov
  return markov.entropy_rate(markov.transition_matrix(m.vocab_size, m.concentration, m.seed))


def _data_dir(data_dir):
  return os.path.expanduser(
      data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


@contextlib.contextmanager
def _file_lock(path):
  """Serialises builds between processes of one host (local multi-process runs)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def _cached_stream(source, encode, dtype, path) -> np.ndarray:
  """concat(encode(record) for record in source), written once to `path`, then memmapped."""
  if not os.path.exists(path):
    tmp = f'{path}.tmp{os.getpid()}'
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, 'wb') as f:
      for i in range(0, len(source), 256):
        for r in source.__getitems__(list(range(i, min(i + 256, len(source))))):
          f.write(np.asarray(encode(r), dtype).tobytes())
    os.replace(tmp, path)  # atomic: readers never see a partial file
  if not os.path.getsize(path):
    return np.zeros(0, dtype)  # an empty split: memmap refuses empty files
  return np.memmap(path, dtype=dtype, mode='r')


def _text_source(data_config, split, data_dir):
  """(random-access source of documents, key of their text); builds python_source."""
  if _kind(data_config) == 'python_source':
    builder = python_source.builder(data_dir=_data_dir(data_dir))
    builder.download_and_prepare()  # a no-op once built
    return builder.as_data_source(split=split), 'text'
  return (tfds.data_source(data_config.name[5:], split=split, data_dir=data_dir or None),
          data_config.text_key)


def token_stream(data_config, split: str, data_dir: str | None = None) -> np.ndarray:
  """The split as one 1-D token array (a read-only memmap); builds what is missing."""
  data_dir = data_dir or data_config.get('data_dir')
  cache = data_config.get('cache_dir') or os.path.join(_data_dir(data_dir), 'batchscale_tokens')
  split_name = re.sub(r'[^\w.-]', '_', split)
  with _file_lock(os.path.join(cache, '.lock')):
    if _kind(data_config) == 'markov':
      builder = markov.builder(markov.markov_config(**data_config.markov),
                               data_dir=_data_dir(data_dir))
      builder.download_and_prepare()
      source, encode, tag = builder.as_data_source(split=split), lambda r: r['tokens'], 'ids'
      dtype = np.uint16
    else:
      source, text_key = _text_source(data_config, split, data_dir)
      tokenizer = tokenizers.make_tokenizer(data_config)
      eod = np.asarray([tokenizer.eod_id])
      encode = lambda r: np.concatenate([tokenizer.encode(r[text_key]), eod])
      tag = tokenizer.tag
      dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    path = os.path.join(cache, source.dataset_info.full_name,
                        f'{split_name}.{tag}.{np.dtype(dtype).name}.bin')
    return _cached_stream(source, encode, dtype, path)


def bytes_per_token_factor(data_config, data_dir: str | None = None,
                           max_bytes: int = 1 << 20) -> float:
  """Tokens per byte of text: loss in nats/token times this is nats/byte.

  1 for bytes (end-of-document tokens aside) and for 'markov' (whose tokens are not text);
  for SentencePiece, measured on the first `max_bytes` of the validation split.
  """
  if _kind(data_config) == 'markov' or data_config.tokenizer == 'bytes':
    return 1.0
  tokenizer = tokenizers.make_tokenizer(data_config)
  source, text_key = _text_source(data_config, 'validation',
                                  data_dir or data_config.get('data_dir'))
  num_bytes = num_tokens = 0
  for i in range(len(source)):
    text = source[i][text_key]
    num_bytes += len(text.encode('utf-8') if isinstance(text, str) else text)
    num_tokens += len(tokenizer.encode(text)) + 1
    if num_bytes >= max_bytes:
      break
  return num_tokens / num_bytes


def _window(stream, seq_len, w):
  return {'tokens': np.asarray(stream[w * seq_len:(w + 1) * seq_len + 1], np.int32)}


def check_process_shard(global_batch_size: int, process_index: int, process_count: int):
  """Raises ValueError unless process_index of process_count reads an equal share."""
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')


def make_lm_iterator(data_config, *, split: str, global_batch_size: int, seq_len: int,
                     seed: int, process_index: int = 0, process_count: int = 1,
                     data_dir: str | None = None, repeat: bool = True,
                     shuffle: bool | None = None) -> grain.DatasetIterator:
  """Yields {'tokens': int32[global_batch_size // process_count, seq_len + 1]}.

  `data_dir` defaults to `data_config.data_dir`. Checkpoint with `it.get_state()` / `it.set_state(state)`: resuming is exact. With
  `repeat=False` the pass ends after the last full global batch (every process gets the
  same number of batches). `shuffle` defaults to `repeat`: training shuffles, an eval pass
  (`split='validation', repeat=False`) reads windows in order.
  """
  check_process_shard(global_batch_size, process_index, process_count)
  shuffle = repeat if shuffle is None else shuffle
  stream = token_stream(data_config, split, data_dir)
  num_windows = (len(stream) - 1) // seq_len
  num_batches = num_windows // global_batch_size
  if num_batches == 0:
    raise ValueError(f'split {split!r} of {data_config.name} has {len(stream)} tokens: less '
                     f'than one global batch of {global_batch_size} x {seq_len + 1}')
  ds = grain.MapDataset.range(num_windows)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # a fresh permutation per epoch once repeated
  ds = ds.repeat() if repeat else ds[:num_batches * global_batch_size]
  ds = ds.map(functools.partial(_window, stream, seq_len))
  # Local batch k holds global rows [k*b, (k+1)*b): global batch j, process p is k = j*P + p.
  ds = ds.batch(global_batch_size // process_count)[process_index::process_count]
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.get('read_threads', 2),
      prefetch_buffer_size=data_config.get('prefetch_batches', 2))))


def _entropy(counts) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def unigram_entropy(x) -> float:
  """Plug-in H(x_t) in nats of a 1-D array of non-negative ints (bytes or token ids)."""
  return _entropy(np.bincount(np.asarray(x).ravel()))


def bigram_conditional_entropy(x) -> float:
  """Plug-in H(x_{t+1} | x_t) = H(x_t, x_{t+1}) - H(x_t) in nats.

  For a Markov chain this estimates its entropy rate (biased low by about V^2 / 2n).
  """
  x = np.asarray(x, np.int64).ravel()
  V = int(x.max()) + 1
  pairs = x[:-1] * V + x[1:]
  joint = np.bincount(pairs) if V * V <= 1 << 26 else np.unique(pairs, return_counts=True)[1]
  return _entropy(joint) - _entropy(np.bincount(x[:-1]))
