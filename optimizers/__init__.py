"""Optimizers (LAMB, LARS, AdaGrad, AdaGradNorm), lr schedules and the config factory."""
from optimizers.adagrad import adagrad, adagrad_norm
from optimizers.factory import (default_optimizer_config, default_schedule_config,
                                learning_rate_fn, make_optimizer)
from optimizers.lamb import default_mask, lamb, resolve_mask
from optimizers.lars import lars
from optimizers import schedules

__all__ = [
    "adagrad", "adagrad_norm", "default_mask", "default_optimizer_config",
    "default_schedule_config", "lamb", "lars", "learning_rate_fn", "make_optimizer",
    "resolve_mask", "schedules",
]
