"""Tests for data/tokenizers.py."""
import numpy as np

from data import lm
from data import python_source
from data import tokenizers


def test_bytes_round_trip():
  tok = tokenizers.ByteTokenizer()
  text = 'def f(x):\n    return "héllo ∑"\n'
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256 and tok.vocab_size == 257
  assert tok.decode(np.append(ids, tok.eod_id)) == text


def test_sentencepiece_trained_on_python_source_round_trips(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  builder = python_source.builder(data_dir=data_dir)
  builder.download_and_prepare()
  texts = [r['text'].decode('utf-8', 'replace') for r in builder.as_data_source(split='validation')]
  model = tokenizers.train_sentencepiece(texts[:40], 512, str(tmp_path / 'spm'))
  tok = tokenizers.SentencePieceTokenizer(model)
  assert tok.vocab_size == 512
  for text in texts[40:50]:  # held-out files
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 1.5  # compresses code

  config = lm.default_data_config()
  config.update(tokenizer='sentencepiece', spm_model=model, data_dir=data_dir)
  assert lm.vocab_size(config) == 512
  assert 0.2 < lm.bytes_per_token_factor(config) < 0.6  # tokens per byte
  it = lm.make_lm_iterator(config, split='validation', global_batch_size=4, seq_len=128,
                           seed=0, repeat=False)
  tokens = np.concatenate([b['tokens'] for b in it])
  assert tokens.max() < 512 and (tokens == tok.eod_id).any()
