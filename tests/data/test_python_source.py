"""Tests for data/python_source.py and the corpus statistics in lm.py."""
import os

import numpy as np
import pytest

from data import lm
from data import python_source


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  b = python_source.builder(data_dir=str(tmp_path_factory.mktemp('tfds')))
  b.download_and_prepare()
  return b


def test_splits_are_disjoint_by_file_and_cover_the_stdlib(built):
  files = python_source.source_files()
  paths = {s: [r['path'].decode() for r in built.as_data_source(split=s)]
           for s in ('train', 'validation')}
  assert not set(paths['train']) & set(paths['validation'])
  assert sorted(paths['train'] + paths['validation']) == sorted(files)
  assert all(python_source.split_of(p) == 'validation' for p in paths['validation'])
  assert 0.02 < len(paths['validation']) / len(files) < 0.08
  assert not any('site-packages' in p for p in files)


def test_examples_hold_the_file_bytes(built):
  r = built.as_data_source(split='validation')[0]
  with open(os.path.join(python_source.stdlib_root(), r['path'].decode()), 'rb') as f:
    assert r['text'] == f.read()


def test_build_is_idempotent(built):
  info = os.path.join(built.data_dir, 'dataset_info.json')
  mtime = os.path.getmtime(info)
  python_source.builder(data_dir=str(built.data_dir_root)).download_and_prepare()
  assert os.path.getmtime(info) == mtime


def test_corpus_entropies_are_those_of_python_source(built):
  config = lm.default_data_config('python_source')
  stream = lm.token_stream(config, 'train', data_dir=str(built.data_dir_root))
  x = np.asarray(stream[0:len(stream)])
  x = x[x != 256]  # drop end-of-document tokens: statistics of the bytes alone
  # Python 3.11's standard library: 3.25 and 2.43 nats.
  assert abs(lm.unigram_entropy(x) - 3.25) < 0.25
  assert abs(lm.bigram_conditional_entropy(x) - 2.43) < 0.25


def test_entropy_helpers_match_closed_forms():
  assert lm.unigram_entropy(np.arange(8)) == pytest.approx(np.log(8))
  x = np.tile([0, 1, 2, 3], 100)  # deterministic successor: H(x_t+1 | x_t) = 0
  assert lm.bigram_conditional_entropy(x) == pytest.approx(0.0, abs=1e-12)
  assert lm.unigram_entropy(x) == pytest.approx(np.log(4))
