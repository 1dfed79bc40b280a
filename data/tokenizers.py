"""Tokenizers: raw bytes (the default) and SentencePiece.

Both expose `encode(text) -> int32[n]`, `decode(ids) -> str`, `vocab_size` and `eod_id`, the
end-of-document token the loader puts between documents.
"""
import hashlib
from typing import Iterable

import numpy as np
import sentencepiece as spm


class ByteTokenizer:
  """Token i < 256 is byte i; 256 is end-of-document."""

  vocab_size = 257
  eod_id = 256
  tag = 'bytes'  # names the token cache; changes when the mapping does

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, str):
      text = text.encode('utf-8')
    return np.frombuffer(text, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A trained SentencePiece model; its `</s>` (eos) id marks end-of-document."""

  def __init__(self, model_path: str):
    with open(model_path, 'rb') as f:
      proto = f.read()
    self.sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self.sp.get_piece_size()
    self.eod_id = self.sp.eos_id()
    if self.eod_id < 0:
      raise ValueError(f'SentencePiece model {model_path} has no eos piece for end-of-document')
    self.tag = 'spm-' + hashlib.sha1(proto).hexdigest()[:12]

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self.sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])


def train_sentencepiece(texts: Iterable[str | bytes], vocab_size: int, model_prefix: str,
                        *, max_lines: int = 200_000, **kwargs) -> str:
  """Trains a byte-fallback BPE model on `texts`; returns the `.model` path.

  Settings keep decode(encode(text)) == text for source code: no normalisation, whitespace
  kept as is (indentation pieces allowed), '\\n' a piece of its own, unknown characters
  spelled as bytes. SentencePiece reads lines, so documents are split at newlines.
  """
  def lines():
    for text in texts:
      if isinstance(text, bytes):
        text = text.decode('utf-8', errors='replace')
      yield from text.split('\n')

  options = dict(
      model_type='bpe', byte_fallback=True, normalization_rule_name='identity',
      remove_extra_whitespaces=False, add_dummy_prefix=False,
      allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=['\n'],
      unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, character_coverage=0.9995,
      input_sentence_size=max_lines, shuffle_input_sentence=True,
      max_sentence_length=16384, minloglevel=2)
  options.update(kwargs)
  spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_prefix=model_prefix,
                                 vocab_size=vocab_size, **options)
  return model_prefix + '.model'


def make_tokenizer(data_config):
  """The tokenizer named by `data_config.tokenizer` ('bytes' or 'sentencepiece')."""
  name = data_config.get('tokenizer', 'bytes')
  if name == 'bytes':
    return ByteTokenizer()
  if name == 'sentencepiece':
    if not data_config.get('spm_model'):
      raise ValueError("config.data.spm_model is empty: tokenizer='sentencepiece' needs the "
                       'path of a .model file (see tokenizers.train_sentencepiece)')
    return SentencePieceTokenizer(data_config.spm_model)
  raise ValueError(f"config.data.tokenizer={name!r}: valid are 'bytes', 'sentencepiece'")
