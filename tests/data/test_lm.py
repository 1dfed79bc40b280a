"""Tests for data/lm.py: the loader."""

import numpy as np
import pytest

import data as data_lib
from data import lm


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def small_markov():
  c = lm.default_data_config('markov')
  # 2048 train tokens: 63 windows of 33 at seq_len=32, an epoch every ~8 batches of 8.
  c.markov.update(vocab_size=16, num_sequences=16, num_validation_sequences=4,
                  sequence_length=128)
  return c


def _global_batches(config, data_dir, process_count, steps, **kw):
  its = [lm.make_lm_iterator(config, global_batch_size=8, seq_len=32, seed=0,
                             process_index=p, process_count=process_count,
                             data_dir=data_dir, **kw) for p in range(process_count)]
  return [np.concatenate([next(it)['tokens'] for it in its]) for _ in range(steps)]


def test_python_source_batches(data_dir):
  config = lm.default_data_config()
  it = lm.make_lm_iterator(config, split='train', global_batch_size=4, seq_len=64, seed=0,
                           process_index=1, process_count=2, data_dir=data_dir)
  tokens = next(it)['tokens']
  assert tokens.shape == (2, 65) and tokens.dtype == np.int32
  assert 0 <= tokens.min() and tokens.max() < lm.vocab_size(config) == 257
  assert lm.bytes_per_token_factor(config) == 1.0


def test_global_batches_do_not_depend_on_process_count(data_dir, small_markov):
  steps = 10  # past the end of the first epoch
  one = _global_batches(small_markov, data_dir, 1, steps, split='train')
  for process_count in (2, 4):
    many = _global_batches(small_markov, data_dir, process_count, steps, split='train')
    np.testing.assert_array_equal(np.stack(one), np.stack(many))


def test_windows_are_a_shuffled_epoch_of_the_stream(data_dir, small_markov):
  stream = np.asarray(lm.token_stream(small_markov, 'train', data_dir)[0:2048], np.int32)
  windows = [stream[w * 32:w * 32 + 33] for w in range(63)]
  rows = np.concatenate(_global_batches(small_markov, data_dir, 1, 16, split='train'))
  for epoch in (rows[:63], rows[63:126]):
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, windows))
  assert not np.array_equal(rows[:63], rows[63:126])  # reshuffled per epoch
  assert not np.array_equal(rows[:63], np.stack(windows))
  other_seed = lm.make_lm_iterator(small_markov, split='train', global_batch_size=8,
                                   seq_len=32, seed=1, data_dir=data_dir)
  assert not np.array_equal(next(other_seed)['tokens'], rows[:8])


def test_resume_from_state_is_exact(data_dir, small_markov):
  kw = dict(split='train', global_batch_size=8, seq_len=32, seed=0, process_index=1,
            process_count=2, data_dir=data_dir)
  it = lm.make_lm_iterator(small_markov, **kw)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)['tokens'] for _ in range(6)]
  resumed = lm.make_lm_iterator(small_markov, **kw)
  resumed.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(resumed)['tokens'], e)


def test_eval_pass_is_ordered_and_finite(data_dir, small_markov):
  # Validation: 512 tokens -> 15 windows of 33 -> one global batch of 8 (rest dropped).
  stream = np.asarray(lm.token_stream(small_markov, 'validation', data_dir)[0:512], np.int32)
  kw = dict(split='validation', global_batch_size=8, seq_len=32, seed=0, repeat=False,
            data_dir=data_dir)
  passes = [list(lm.make_lm_iterator(small_markov, **kw)) for _ in range(2)]
  assert len(passes[0]) == 1
  np.testing.assert_array_equal(passes[0][0]['tokens'], passes[1][0]['tokens'])
  for r, row in enumerate(passes[0][0]['tokens']):
    np.testing.assert_array_equal(row, stream[r * 32:r * 32 + 33])
  halves = [list(lm.make_lm_iterator(small_markov, process_index=p, process_count=2, **kw))
            for p in range(2)]
  assert [len(h) for h in halves] == [1, 1]
  np.testing.assert_array_equal(
      np.concatenate([h[0]['tokens'] for h in halves]), passes[0][0]['tokens'])


def test_package_exports_the_loader():
  assert data_lib.make_lm_iterator is lm.make_lm_iterator
  assert data_lib.default_data_config('markov').markov.vocab_size == 128


def test_bad_settings_raise_clear_errors(data_dir, small_markov):
  bad = lm.default_data_config('wikitext')
  with pytest.raises(ValueError, match=r"config\.data\.name='wikitext'.*python_source"):
    lm.make_lm_iterator(bad, split='train', global_batch_size=8, seq_len=8, seed=0)
  with pytest.raises(ValueError, match='config.data.name'):
    lm.vocab_size(bad)
  with pytest.raises(ValueError, match='process_count=3'):
    lm.make_lm_iterator(small_markov, split='train', global_batch_size=8, seq_len=8, seed=0,
                        process_count=3, data_dir=data_dir)
  with pytest.raises(ValueError, match='less than one global batch'):
    lm.make_lm_iterator(small_markov, split='validation', global_batch_size=64, seq_len=32,
                        seed=0, data_dir=data_dir)
  tok = lm.default_data_config()
  tok.tokenizer = 'words'
  with pytest.raises(ValueError, match='config.data.tokenizer'):
    lm.vocab_size(tok)
  tok.tokenizer = 'sentencepiece'
  with pytest.raises(ValueError, match='config.data.spm_model'):
    lm.vocab_size(tok)


def test_any_tfds_text_dataset_by_name(data_dir, tmp_path):
  # python_source is registered with TFDS once imported, so it can stand in for any
  # TFDS text dataset prepared in array_record format.
  config = lm.default_data_config('tfds:python_source')
  config.cache_dir = str(tmp_path)  # tokenize afresh through tfds.data_source
  via_tfds = lm.token_stream(config, 'validation', data_dir)
  direct = lm.token_stream(lm.default_data_config(), 'validation', data_dir)
  assert len(via_tfds) == len(direct) > 0
  np.testing.assert_array_equal(via_tfds[0:len(via_tfds)], direct[0:len(direct)])
