"""`digits`: scikit-learn's copy of the UCI handwritten digits (8x8 grayscale), as TFDS.

1797 images of the digits 0-9 (Alpaydin & Kaynak 1998; `sklearn.datasets.load_digits`),
pixel values 0-16 stored as uint8 0-255. The split is fixed: a permutation of the rows by
NumPy's legacy `RandomState(0)` (stable across NumPy versions) puts the last 360 in `test`
and the other 1437 in `train`. The rows come from the `digits.csv.gz` that scikit-learn
ships, read without importing scikit-learn (so none of its own dependencies are needed);
nothing is downloaded. Examples: `{'image': uint8[8, 8, 1], 'label': int64 in [0, 10)}`.
"""
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_TEST = 360
_CSV = os.path.join('datasets', 'data', 'digits.csv.gz')


def csv_path() -> str:
  """Path of scikit-learn's bundled digits CSV (64 pixels and the label per row)."""
  spec = importlib.util.find_spec('sklearn')
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the 'digits' dataset is built from scikit-learn's bundled copy: "
                      'pip install scikit-learn')
  path = os.path.join(list(spec.submodule_search_locations)[0], _CSV)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing from the scikit-learn installation')
  return path


def load_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train'|'test': (uint8[N, 8, 8, 1] images, int64[N] labels)} with the fixed split."""
  rows = np.loadtxt(csv_path(), delimiter=',', dtype=np.float64)
  images = np.round(rows[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
  labels = rows[:, 64].astype(np.int64)
  order = np.random.RandomState(0).permutation(len(rows))
  return {'train': (images[order[:-NUM_TEST]], labels[order[:-NUM_TEST]]),
          'test': (images[order[-NUM_TEST:]], labels[order[-NUM_TEST:]])}


class Digits(tfds.core.GeneratorBasedBuilder):
  """8x8 handwritten digits; train 1437, test 360."""

  VERSION = tfds.core.Version('1.0.0')
  # tfds finds this itself only with the optional `importlib_resources` package.
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True)  # records in split order, so the split is exactly reproducible

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    arrays = load_arrays()
    return {split: self._generate_examples(*arrays[split]) for split in ('train', 'test')}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': label}


def builder(data_dir: str | None = None) -> Digits:
  """The builder, in array_record format (random access, read by grain without TF)."""
  return Digits(data_dir=data_dir, file_format='array_record')
