"""Image-classification batches through grain: embedded `digits` or a TFDS image set by name.

`config.data.name` is 'digits' (built here, no download: `data/digits.py`) or
'tfds:<name>' for a TFDS dataset of fixed-size images the user has prepared in array_record
format (`tfds:cifar10`, `tfds:cifar100`, `tfds:mnist`, `tfds:imagenet_resized/64x64`, ...).
A split is read once into uint8 `.npy` files in the cache dir (images [N, H, W, C], labels
[N]) and memmapped: a batch is then a gather, not N record decodes.

Training augmentation is the standard one for small images (He et al. 2016 §4.2): zero-pad by
`crop_padding` pixels and take a random crop of the original size, plus a random horizontal
flip when `flip` (off for digits: a mirrored digit is another shape). Pixels are then
standardised per channel with the train split's mean and standard deviation. A row's
randomness is a hash of the seed and its position in the epoch-repeated stream, so it does
not depend on the process count, and a run resumed from grain's checkpointed iterator state
sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import functools
import os
import re

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from data import digits
from data import lm

_ENDLESS = 1 << 48  # batches in a repeated (training) stream
_NAMES = "'digits' or 'tfds:<name>' (a TFDS image dataset of fixed-size images in array_record)"


def default_image_data_config(name: str = 'digits') -> ml_collections.ConfigDict:
  """Every field the image loader reads, with defaults; embed as `config.data`."""
  c = ml_collections.ConfigDict()
  c.name = name  # 'digits' | 'tfds:<name>', e.g. 'tfds:cifar10'
  c.image_key = 'image'  # features of a 'tfds:<name>' dataset
  c.label_key = 'label'
  c.train_split = 'train'
  c.eval_split = 'test'
  c.crop_padding = 1 if name == 'digits' else 4  # random crop after zero padding; 0 = none
  c.flip = name != 'digits'  # random horizontal flips
  c.data_dir = ''  # TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.cache_dir = ''  # decoded arrays; '' = <data_dir>/batchscale_images (must be local)
  c.read_threads = 2
  c.prefetch_batches = 2
  return c


def _source(name, split, data_dir):
  if name == 'digits':
    builder = digits.builder(data_dir=lm._data_dir(data_dir))  # pylint: disable=protected-access
    builder.download_and_prepare()  # a no-op once built
    return builder.as_data_source(split=split)
  if isinstance(name, str) and name.startswith('tfds:') and len(name) > 5:
    return tfds.data_source(name[5:], split=split, data_dir=data_dir or None)
  raise ValueError(f'config.data.name={name!r} is not an image dataset; valid: {_NAMES}')


def image_arrays(data_config, split: str, data_dir: str | None = None):
  """(uint8[N, H, W, C], int32[N], num_classes) of a split: memmaps, decoded and cached once."""
  return _image_arrays(data_config.name, split, data_dir or data_config.get('data_dir') or '',
                       data_config.get('cache_dir') or '', data_config.image_key,
                       data_config.label_key)


@functools.lru_cache(maxsize=16)
def _image_arrays(name, split, data_dir, cache_dir, image_key, label_key):
  # pylint: disable=protected-access  (the LM loader's data-dir default and build lock)
  cache = cache_dir or os.path.join(lm._data_dir(data_dir), 'batchscale_images')
  with lm._file_lock(os.path.join(cache, '.lock')):
    source = _source(name, split, data_dir)
    prefix = os.path.join(cache, source.dataset_info.full_name, re.sub(r'[^\w.-]', '_', split))
    if not os.path.exists(prefix + '.labels.npy'):
      _write_arrays(source, image_key, label_key, prefix)
  feature = source.dataset_info.features[label_key]
  labels = np.load(prefix + '.labels.npy', mmap_mode='r')
  num_classes = getattr(feature, 'num_classes', None) or int(np.max(labels)) + 1
  return np.load(prefix + '.images.npy', mmap_mode='r'), labels, num_classes


def _write_arrays(source, image_key, label_key, prefix):
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  first = np.asarray(source[0][image_key])
  if first.ndim == 2:
    first = first[..., None]
  tmp = f'.tmp{os.getpid()}.npy'
  images = np.lib.format.open_memmap(prefix + '.images' + tmp, mode='w+', dtype=np.uint8,
                                     shape=(len(source),) + first.shape)
  labels = np.zeros(len(source), np.int32)
  for start in range(0, len(source), 256):
    records = source.__getitems__(list(range(start, min(start + 256, len(source)))))
    for i, r in enumerate(records, start):
      image = np.asarray(r[image_key])
      if image.shape[:2] != first.shape[:2]:
        raise ValueError(f'{source.dataset_info.full_name}: image {i} is {image.shape}, not '
                         f'{first.shape}; this loader needs fixed-size images')
      images[i] = image.reshape(first.shape)
      labels[i] = r[label_key]
  images.flush()
  del images
  np.save(prefix + '.labels' + tmp, labels)
  # Labels last: their presence marks a complete pair (readers never see a partial file).
  os.replace(prefix + '.images' + tmp, prefix + '.images.npy')
  os.replace(prefix + '.labels' + tmp, prefix + '.labels.npy')


def image_info(data_config, data_dir: str | None = None) -> dict:
  """{'height', 'width', 'channels', 'num_classes'} of the dataset (from its train split)."""
  images, _, num_classes = image_arrays(data_config, data_config.train_split, data_dir)
  _, h, w, c = images.shape
  return {'height': h, 'width': w, 'channels': c, 'num_classes': num_classes}


@functools.lru_cache(maxsize=8)
def _channel_stats(images_path: str) -> tuple[np.ndarray, np.ndarray]:
  images = np.load(images_path, mmap_mode='r')
  mean, sq = np.zeros(images.shape[-1]), np.zeros(images.shape[-1])
  for start in range(0, len(images), 4096):  # chunks: never the whole split in float
    chunk = np.asarray(images[start:start + 4096], np.float64) / 255.0
    mean += chunk.sum(axis=(0, 1, 2))
    sq += np.square(chunk).sum(axis=(0, 1, 2))
  n = images.shape[0] * images.shape[1] * images.shape[2]
  mean /= n
  std = np.sqrt(np.maximum(sq / n - mean**2, 1e-12))
  return mean.astype(np.float32), std.astype(np.float32)


def channel_stats(data_config, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of the train split, pixels scaled to [0, 1]."""
  images, _, _ = image_arrays(data_config, data_config.train_split, data_dir)
  return _channel_stats(images.filename)


def row_hashes(seed: int, positions_B: np.ndarray) -> np.ndarray:
  """uint64 SplitMix64 hashes of (seed, position in the stream): per-row randomness that does
  not depend on how rows are batched or split over processes."""
  x = np.asarray(positions_B, np.uint64) + np.asarray(seed, np.uint64) * np.uint64(
      0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def random_crop_flip(images_BxHxWxC: np.ndarray, hashes_B: np.ndarray, *, padding: int,
                     flip: bool) -> np.ndarray:
  """Zero-pad by `padding`, crop back to H x W at a per-row offset, mirror half the rows."""
  b, h, w, _ = images_BxHxWxC.shape
  out = images_BxHxWxC
  if padding:
    span = np.uint64(2 * padding + 1)
    dy = (hashes_B % span).astype(np.intp)
    dx = ((hashes_B >> np.uint64(16)) % span).astype(np.intp)
    padded = np.pad(out, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
    out = windows[np.arange(b), dy, dx].transpose(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]
  if flip:
    mirror_B = ((hashes_B >> np.uint64(32)) & np.uint64(1)).astype(bool)
    out = np.where(mirror_B[:, None, None, None], out[:, :, ::-1], out)
  return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def _load_batch(j, *, images, labels, mean, std, seed, batch, rows, shuffle, augment, padding,
                flip):
  """Local rows `rows` of global batch j: stream positions j*batch + rows, epoch by epoch."""
  n = len(labels)
  positions_B = j * batch + rows
  epochs_B, offsets_B = np.divmod(positions_B, n)
  if shuffle:  # a fresh permutation per epoch
    index_B = np.empty_like(offsets_B)
    for e in np.unique(epochs_B):
      index_B[epochs_B == e] = _epoch_order(seed, int(e), n)[offsets_B[epochs_B == e]]
  else:
    index_B = offsets_B
  order = np.argsort(index_B)  # memmaps read fastest in order
  x = np.empty((len(index_B),) + images.shape[1:], images.dtype)
  x[order] = images[index_B[order]]
  if augment and (padding or flip):
    x = random_crop_flip(x, row_hashes(seed, positions_B), padding=padding, flip=flip)
  return {'image': (x.astype(np.float32) / 255.0 - mean) / std,
          'label': np.asarray(labels[index_B], np.int32)}


def make_image_iterator(data_config, *, split: str, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        data_dir: str | None = None, repeat: bool = True,
                        augment: bool | None = None) -> grain.DatasetIterator:
  """Yields {'image': float32[b, H, W, C], 'label': int32[b]}, b = global / process_count.

  Training (`repeat=True`) shuffles with the seed, a new order each epoch, and augments;
  an eval pass (`repeat=False`) reads the split in order, unaugmented, and ends after the
  last full global batch. Global batch j is the same rows whatever the process count;
  process p reads rows [p*b, (p+1)*b). Checkpoint with `get_state()` / `set_state()`.
  """
  lm.check_process_shard(global_batch_size, process_index, process_count)
  augment = repeat if augment is None else augment
  images, labels, _ = image_arrays(data_config, split, data_dir)
  mean, std = channel_stats(data_config, data_dir)
  num_batches = len(labels) // global_batch_size
  if num_batches == 0:
    raise ValueError(f'split {split!r} of {data_config.name} has {len(labels)} images: less '
                     f'than one global batch of {global_batch_size}')
  b = global_batch_size // process_count
  # One record per global batch, gathered and augmented as a whole (per-image Python would
  # cost more than the step); process p takes rows [p*b, (p+1)*b) of it.
  ds = grain.MapDataset.range(_ENDLESS if repeat else num_batches)
  ds = ds.map(functools.partial(
      _load_batch, images=images, labels=labels, mean=mean, std=std, seed=seed,
      batch=global_batch_size, rows=np.arange(process_index * b, (process_index + 1) * b),
      shuffle=repeat, augment=augment, padding=data_config.crop_padding,
      flip=data_config.flip))
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.get('read_threads', 2),
      prefetch_buffer_size=data_config.get('prefetch_batches', 2))))
