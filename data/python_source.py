"""`python_source`: the `.py` files of this interpreter's standard library, as TFDS.

Real text that every machine has, built with no download in about a second. One example is
one file: `{'path': relative path, 'text': the file's bytes}`. `site-packages` is skipped;
the `test/` packages are kept: they are real code and more than half of the ~31 MB.
Files go to `validation` when a stable hash of their relative path says so (~5%), so the
split does not change when files are added elsewhere. The builder config is the Python
version (`py311`): a data_dir shared by several interpreters keeps one corpus per version.
"""
import hashlib
import os
import sys
import sysconfig

from etils import epath
import tensorflow_datasets as tfds

VALIDATION_PERCENT = 5
_SKIP_DIRS = ('site-packages', '__pycache__')


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def source_files(root: str | None = None) -> list[str]:
  """Sorted POSIX paths, relative to `root`, of the standard library's `.py` files."""
  root = root or stdlib_root()
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
    rel = os.path.relpath(d, root)
    out += [f if rel == '.' else f'{rel}/{f}'.replace(os.sep, '/')
            for f in sorted(files) if f.endswith('.py')]
  return out


def split_of(rel_path: str) -> str:
  """'train' or 'validation', from an md5 of the path (stable across runs and machines)."""
  bucket = int(hashlib.md5(rel_path.encode()).hexdigest(), 16) % 100
  return 'validation' if bucket < VALIDATION_PERCENT else 'train'


class PythonSource(tfds.core.GeneratorBasedBuilder):
  """Byte-level corpus of the running interpreter's standard library."""

  VERSION = tfds.core.Version('1.0.0')
  # tfds finds this itself only with the optional `importlib_resources` package.
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=f'py{sys.version_info.major}{sys.version_info.minor}',
      description=f'Python {sys.version.split()[0]} standard library')]

  def _info(self):
    # DatasetInfo directly: `dataset_info_from_configs` would read metadata files from the
    # package folder, which this repository does not keep.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'path': tfds.features.Text(),
            'text': tfds.features.Text(),  # raw bytes: a few test files are not UTF-8
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    files = source_files()
    return {s: self._generate_examples([f for f in files if split_of(f) == s])
            for s in ('train', 'validation')}

  def _generate_examples(self, rel_paths):
    root = stdlib_root()
    for rel in rel_paths:
      with open(os.path.join(root, rel), 'rb') as f:
        yield rel, {'path': rel, 'text': f.read()}


def builder(data_dir: str | None = None) -> PythonSource:
  """The builder, in array_record format (random access, read by grain without TF)."""
  return PythonSource(data_dir=data_dir, file_format='array_record')
