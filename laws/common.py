"""What every scaling-law fit shares: the `Fit` result, bootstrap intervals, log-space OLS.

Each law's module (lr_optimum, step_law, chinchilla, critical_batch, power_scheduler) is pure
functions of NumPy arrays, no I/O, and returns a frozen `Fit` subclass: params, intervals,
objective at the optimum, points used, bootstrap samples. `to_dict()` gives its laws.json
form; laws/serialize.py reads it back. Intervals are bootstrap percentile intervals at
`level` unless a fit says otherwise. Units are the caller's: N parameters, D tokens, B
whatever unit the rows use; each fit's docstring says which it needs. The papers are indexed
in docs/papers.md.
"""
import contextlib
import ctypes
import dataclasses
from typing import Any, ClassVar

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Fit:
  """A fitted law: point estimates, intervals, objective at the optimum, points used.

  `samples` maps each parameter to its bootstrap draws (draw j of every parameter comes from
  the same resample); laws/estimate.py propagates them into intervals.
  """
  params: dict[str, float]
  intervals: dict[str, tuple[float, float]]
  objective: float
  n: int
  samples: dict[str, np.ndarray] | None = None
  names: ClassVar[tuple[str, ...]] = ()  # the order of params (JSON sorts keys)

  def sample(self, name: str) -> np.ndarray:
    """Bootstrap draws of one parameter (the point estimate alone when there are none)."""
    if not self.samples or len(self.samples[name]) == 0:
      return np.array([self.params[name]])
    return self.samples[name]

  def values(self, samples: bool = False) -> dict:
    """params, or with samples=True every parameter's bootstrap draws."""
    return {k: self.sample(k) for k in self.params} if samples else self.params

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields plus 'type', the class name laws/serialize.py decodes by."""
    d = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
    d['type'] = type(self).__name__
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'Fit':
    """Inverse of `to_dict` into this class: lists back to tuples and arrays, None to NaN."""
    kw = {}
    for f in dataclasses.fields(cls):
      v = d.get(f.name)
      if f.name == 'samples':
        v = None if v is None else {k: np.array(x, dtype=float) for k, x in v.items()}
      elif f.name == 'intervals':
        v = {k: tuple(_num(x) for x in iv) for k, iv in v.items()}
      elif f.name == 'params':
        rank = {k: i for i, k in enumerate(cls.names)}
        v = {k: _num(v[k]) for k in sorted(v, key=lambda k: rank.get(k, len(rank)))}
      elif f.name == 'objective':
        v = _num(v)
      elif isinstance(v, list):
        v = tuple(v)
      kw[f.name] = v
    return cls(**kw)


def _num(x):
  return float('nan') if x is None else float(x)


def jsonable(x):
  """JSON-ready copy: arrays to lists, NaN/inf to None, nested fits to dicts."""
  if isinstance(x, Fit):
    return x.to_dict()
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  return x


# ----------------------------------------------------------------------------------------
# Bootstrap intervals.


def percentiles(samples: np.ndarray, level: float) -> np.ndarray:
  """[2, k] lower/upper percentile bounds of the columns of samples."""
  q = 100 * (1 - level) / 2
  return np.percentile(samples, [q, 100 - q], axis=0)


def columns(names, samples) -> dict[str, np.ndarray]:
  """{name: draws} from a [n_boot, len(names)] array."""
  samples = np.asarray(samples, float).reshape(-1, len(names))
  return {k: samples[:, i] for i, k in enumerate(names)}


def intervals(names, samples, level) -> dict[str, tuple[float, float]]:
  """{name: (lo, hi)} percentile intervals of the columns of samples (NaN: < 2 draws)."""
  if samples is None or len(samples) < 2:
    return {k: (float('nan'), float('nan')) for k in names}
  lo, hi = percentiles(samples, level)
  return {k: (float(l), float(h)) for k, l, h in zip(names, lo, hi)}


def positive_finite(*arrays) -> np.ndarray:
  """Mask of the positions where every array is finite and positive."""
  ok = np.ones(np.shape(arrays[0]), bool)
  for a in arrays:
    ok &= np.isfinite(a) & (np.asarray(a) > 0)
  return ok


def ols_bootstrap(designs, n_boot, seed):
  """OLS of y on X for each (X, y) in designs (the same rows), with a joint row bootstrap.

  The log-space fits of the Step Law (docs/papers.md §4.1) and the Power scheduler (§2.2).
  Returns [(coef, rss, draws [n_boot, k])] per design. Each draw resamples rows with
  replacement once for all designs; a draw that leaves some design rank-deficient is redrawn.
  """
  n_rows = len(designs[0][1])
  out = []
  for X, y in designs:
    k = X.shape[1]
    rank = np.linalg.matrix_rank(X) if n_rows else 0
    if n_rows <= k or rank < k:
      raise ValueError(f'{n_rows} rows of rank {rank}, need more than {k} rows of rank '
                       f'{k}: each variable needs two or more distinct values')
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    out.append((coef, float(np.sum((y - X @ coef) ** 2)), []))
  rng = np.random.default_rng(seed)
  for _ in range(10 * n_boot):
    if len(out[0][2]) == n_boot:
      break
    idx = rng.integers(0, n_rows, n_rows)
    if any(np.linalg.matrix_rank(X[idx]) < X.shape[1] for X, _ in designs):
      continue
    for (X, y), (_, _, draws) in zip(designs, out):
      draws.append(np.linalg.lstsq(X[idx], y[idx], rcond=None)[0])
  return [(c, rss, np.array(d).reshape(-1, X.shape[1]))
          for (c, rss, d), (X, _) in zip(out, designs)]


# ----------------------------------------------------------------------------------------
# BLAS threads.


@contextlib.contextmanager
def one_blas_thread():
  """Limits OpenBLAS to one thread inside the block (what threadpoolctl does).

  L-BFGS-B calls BLAS on 20x20 matrices; OpenBLAS's threads then wait on each other, and on
  a busy 2-core machine the 243-start Chinchilla fit took 86 s instead of 6 s. No-op where
  the libraries cannot be found (non-Linux, other BLAS).
  """
  restore = []
  try:
    with open('/proc/self/maps') as f:
      paths = sorted({line.split()[-1] for line in f if 'openblas' in line.split()[-1]})
  except OSError:
    paths = []
  for path in paths:
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for suffix in ('', '64_', '_64'):
      for prefix in ('openblas', 'scipy_openblas'):
        get = getattr(lib, f'{prefix}_get_num_threads{suffix}', None)
        put = getattr(lib, f'{prefix}_set_num_threads{suffix}', None)
        if get is not None and put is not None:
          restore.append((put, get()))
          put(1)
  try:
    yield
  finally:
    for put, n in reversed(restore):
      put(n)
