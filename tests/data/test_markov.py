"""Tests for data/markov.py."""
import numpy as np
import pytest

from data import lm
from data import markov


def test_entropy_rate_of_a_two_state_chain():
  a, b = 0.1, 0.3  # p(0 -> 1), p(1 -> 0)
  P = np.array([[1 - a, a], [b, 1 - b]])
  pi = np.array([b, a]) / (a + b)
  np.testing.assert_allclose(markov.stationary_distribution(P), pi)
  h = lambda p: -p * np.log(p) - (1 - p) * np.log(1 - p)
  assert markov.entropy_rate(P) == pytest.approx(pi[0] * h(a) + pi[1] * h(b))


def test_random_chain_is_stochastic_and_well_below_uniform():
  P = markov.transition_matrix(64, 0.1, seed=0)
  np.testing.assert_allclose(P.sum(1), 1.0)
  pi = markov.stationary_distribution(P)
  np.testing.assert_allclose(pi @ P, pi, atol=1e-12)
  assert 0.3 * np.log(64) < markov.entropy_rate(P) < 0.8 * np.log(64)
  np.testing.assert_array_equal(P, markov.transition_matrix(64, 0.1, seed=0))
  assert not np.allclose(P, markov.transition_matrix(64, 0.1, seed=1))


def test_entropy_rate_matches_samples():
  P = markov.transition_matrix(16, 0.2, seed=3)
  x = markov.sample_chain(P, 200_000, np.random.default_rng(0))
  # The plug-in estimate is low by about V^2 / 2n = 6e-4 nats.
  assert lm.bigram_conditional_entropy(x) == pytest.approx(markov.entropy_rate(P), abs=0.02)


def test_built_splits_are_the_chain_in_order(tmp_path):
  config = lm.default_data_config('markov')
  config.markov.update(vocab_size=16, concentration=0.2, num_sequences=64,
                       num_validation_sequences=8, sequence_length=128, seed=3)
  stream = lm.token_stream(config, 'train', data_dir=str(tmp_path))
  assert len(stream) == 64 * 128
  P = markov.transition_matrix(16, 0.2, seed=3)
  expected = markov.sample_chain(P, 64 * 128, np.random.default_rng([3, 1]))
  np.testing.assert_array_equal(stream[0:len(stream)], expected)
  np.testing.assert_array_equal(stream[100:300], expected[100:300])  # spans records
  assert len(lm.token_stream(config, 'validation', data_dir=str(tmp_path))) == 8 * 128
  assert lm.known_entropy_rate(config) == pytest.approx(markov.entropy_rate(P))
  assert lm.vocab_size(config) == 16


def test_bad_vocab_size_names_the_field():
  with pytest.raises(ValueError, match='config.data.markov.vocab_size'):
    markov.markov_config(vocab_size=1)
