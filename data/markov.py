"""`markov`: token streams from a seeded random Markov chain, with exactly known entropy.

Each row of the V x V transition matrix is drawn from a symmetric Dirichlet(alpha): small
`concentration` alpha gives peaked rows, so the entropy rate sits well below ln V. A model
that learned P exactly reaches the entropy rate, which is the irreducible loss E of a
scaling law L(N, D) = E + A / N^alpha + B / D^beta.

Each split is ONE continuous chain cut into records of `sequence_length` tokens, so the
loader can concatenate records and cut windows anywhere without a boundary where a token
does not depend on its predecessor (no end-of-document token either).
"""
import bisect
import dataclasses

import numpy as np
from etils import epath
import tensorflow_datasets as tfds


def transition_matrix(vocab_size: int, concentration: float, seed: int) -> np.ndarray:
  """P_VxV, P[i, j] = p(x_{t+1} = j | x_t = i); rows ~ Dirichlet(concentration * 1)."""
  rng = np.random.default_rng([seed, 0])
  P_VxV = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
  # Keep every transition possible so the chain is irreducible and aperiodic.
  P_VxV = np.maximum(P_VxV, 1e-12)
  return P_VxV / P_VxV.sum(1, keepdims=True)


def stationary_distribution(P_VxV: np.ndarray) -> np.ndarray:
  """pi with pi P = pi, sum(pi) = 1 (solved as a linear system)."""
  V = P_VxV.shape[0]
  A = P_VxV.T - np.eye(V)
  A[-1] = 1.0  # replace one (redundant) balance equation by the normalisation
  b = np.zeros(V)
  b[-1] = 1.0
  return np.linalg.solve(A, b)


def entropy_rate(P_VxV: np.ndarray) -> float:
  """H = -sum_i pi_i sum_j P_ij ln P_ij in nats (Cover & Thomas, Thm 4.2.4)."""
  pi = stationary_distribution(P_VxV)
  return float(-(pi[:, None] * P_VxV * np.log(P_VxV)).sum())


def sample_chain(P_VxV: np.ndarray, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
  """num_tokens steps of the chain started from pi, as uint16 (~0.4 s per million)."""
  cdf = np.cumsum(P_VxV, axis=1)
  cdf[:, -1] = 1.0
  rows = cdf.tolist()
  u = rng.random(num_tokens).tolist()
  s = int(rng.choice(len(rows), p=stationary_distribution(P_VxV)))
  out = [0] * num_tokens
  for t in range(num_tokens):  # bisect on Python lists beats a numpy call per step
    s = out[t] = bisect.bisect_right(rows[s], u[t])
  return np.asarray(out, np.uint16)


@dataclasses.dataclass(eq=False, kw_only=True)
class MarkovConfig(tfds.core.BuilderConfig):
  vocab_size: int = 128
  concentration: float = 0.1
  num_sequences: int = 2048  # train records; the train chain has num_sequences * length
  num_validation_sequences: int = 128
  sequence_length: int = 512
  seed: int = 0


def markov_config(vocab_size=128, concentration=0.1, num_sequences=2048,
                  num_validation_sequences=128, sequence_length=512, seed=0) -> MarkovConfig:
  """A MarkovConfig named after its values, so each setting gets its own data folder."""
  if not 2 <= vocab_size <= 65536:
    raise ValueError(f'config.data.markov.vocab_size={vocab_size}: must be in [2, 65536]')
  if not concentration > 0:
    raise ValueError(f'config.data.markov.concentration={concentration}: must be > 0')
  name = (f'v{vocab_size}_a{concentration:g}_n{num_sequences}_nv{num_validation_sequences}'
          f'_l{sequence_length}_s{seed}')
  return MarkovConfig(name=name, vocab_size=vocab_size, concentration=concentration,
                      num_sequences=num_sequences, sequence_length=sequence_length,
                      num_validation_sequences=num_validation_sequences, seed=seed)


class Markov(tfds.core.GeneratorBasedBuilder):
  """Records {'tokens': uint16[sequence_length]} of one chain per split, in order."""

  VERSION = tfds.core.Version('1.0.0')
  # tfds finds this itself only with the optional `importlib_resources` package.
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [markov_config()]

  def _info(self):
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'tokens': tfds.features.Tensor(shape=(c.sequence_length,), dtype=np.uint16)}),
        disable_shuffling=True,  # keep records in key order: the chain must stay in order
        metadata=tfds.core.MetadataDict(entropy_rate=entropy_rate(self.transition_matrix())))

  def transition_matrix(self) -> np.ndarray:
    c = self.builder_config
    return transition_matrix(c.vocab_size, c.concentration, c.seed)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {'train': self._generate_examples(c.num_sequences, 1),
            'validation': self._generate_examples(c.num_validation_sequences, 2)}

  def _generate_examples(self, num_sequences, stream):
    c = self.builder_config
    rng = np.random.default_rng([c.seed, stream])
    x = sample_chain(self.transition_matrix(), num_sequences * c.sequence_length, rng)
    for i, tokens in enumerate(x.reshape(num_sequences, c.sequence_length)):
      yield i, {'tokens': tokens}


def builder(config: MarkovConfig | None = None, data_dir: str | None = None) -> Markov:
  config = config or markov_config()
  if config.name in Markov.builder_configs:  # tfds wants the registered object, by name
    config = config.name
  return Markov(config=config, data_dir=data_dir, file_format='array_record')
