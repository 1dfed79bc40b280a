"""Tasks: what a model family needs from the trainer (model, loss, data, FLOPs).

A task is data, not a framework: the trainer calls `make_model`, `loss_fn` and the iterators.
`loss_fn(model, batch) -> (mean loss, aux)` where batch is a dict of arrays whose leading
axis is the batch; `eval_fn(model, batch) -> {'loss_sum', 'count', ...}` returns sums so
eval batches add up exactly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax.numpy as jnp
import optax
from flax import nnx

import data as data_lib
from data import images as images_lib
from data import mlm as mlm_lib
from models import bert
from models import flops as flops_lib
from models import resnet
from models import transformer
from sharding import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  make_model: Callable[[nnx.Rngs], nnx.Module]
  loss_fn: Callable[[nnx.Module, dict], tuple[Any, dict]]
  eval_fn: Callable[[nnx.Module, dict], dict]
  # (micro_batch, process_index, process_count, seed=config.seed) -> iter; the loop passes
  # its trial's seed (the data order), so trials of one program share the Task.
  train_iterator: Callable[..., Any]
  eval_iterator: Callable[..., Any]  # (batch, process_index, process_count) -> iter
  batch_axes: dict  # batch key -> logical axis names
  flops_per_example: float  # training FLOPs
  tokens_per_example: int
  bits_per_byte_factor: float  # eval loss (nats/token) * this = bits per byte


def _split_tokens(batch):
  tokens = batch["tokens"]
  return tokens[:, :-1], tokens[:, 1:]


def lm_task(config, mesh=None) -> Task:
  """Decoder LM on a token stream: next-token cross entropy in nats per token."""
  del mesh  # the LM's batches and model do not depend on the mesh
  vocab = data_lib.vocab_size(config.data)
  cfg = transformer.TransformerConfig.from_config(config.model, vocab)
  if config.seq_len > cfg.max_seq_len:
    raise ValueError(f"config.seq_len={config.seq_len} is longer than the model allows "
                     f"(config.model.max_seq_len={cfg.max_seq_len}).")

  def loss_fn(model, batch):
    inputs, targets = _split_tokens(batch)
    logits = model(inputs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, {}

  def eval_fn(model, batch):
    inputs, targets = _split_tokens(batch)
    losses = optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets)
    return {"loss_sum": losses.sum(), "count": jnp.asarray(losses.size, jnp.float32)}

  def iterator(split, batch, process_index, process_count, seed):
    return data_lib.make_lm_iterator(
        config.data, split=split, global_batch_size=batch, seq_len=config.seq_len, seed=seed,
        process_index=process_index, process_count=process_count,
        repeat=split == "train")

  return Task(
      name="lm",
      make_model=lambda rngs: transformer.Transformer(cfg, rngs=rngs),
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_iterator=lambda b, p, n, seed=None: iterator("train", b, p, n, _seed(config, seed)),
      eval_iterator=lambda b, p, n: iterator("validation", b, p, n, config.seed),
      batch_axes={"tokens": ("batch", None)},
      flops_per_example=config.seq_len * flops_lib.decoder_train_flops_per_token(
          cfg, config.seq_len),
      tokens_per_example=config.seq_len,
      bits_per_byte_factor=data_lib.bytes_per_token_factor(config.data) / math.log(2),
  )


def _weighted_sums(logits, targets, weights):
  """Cross entropy and accuracy summed with per-position weights (1 = scored)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (losses * weights).sum(), (correct * weights).sum(), weights.sum()


def mlm_task(config, mesh=None) -> Task:
  """BERT masked LM (Devlin et al. 2019): cross entropy at the masked positions only.

  Batches come from `data.mlm` (15% of positions, 80/10/10). `config.phase` 2 is
  the long-sequence phase of You et al. 2020's recipe and must start from phase 1's workdir
  (`config.init_from`), which carries over params, optimizer state and step.
  """
  del mesh  # as for lm_task
  cfg = transformer.TransformerConfig.from_config(config.model,
                                                  mlm_lib.mlm_vocab_size(config.data))
  if config.seq_len > cfg.max_seq_len:
    raise ValueError(f"config.seq_len={config.seq_len} is longer than the model allows "
                     f"(config.model.max_seq_len={cfg.max_seq_len}).")
  if config.get("phase", 1) > 1 and not config.init_from:
    raise ValueError(f"config.init_from is empty: phase {config.phase} of the two-phase BERT "
                     "recipe starts from the previous phase's workdir.")

  def loss_fn(model, batch):
    loss_sum, correct, count = _weighted_sums(model(batch["tokens"]), batch["targets"],
                                              batch["weights"])
    count = jnp.maximum(count, 1.0)
    return loss_sum / count, {"accuracy": correct / count}

  def eval_fn(model, batch):
    loss_sum, correct, count = _weighted_sums(model(batch["tokens"]), batch["targets"],
                                              batch["weights"])
    return {"loss_sum": loss_sum, "count": count, "accuracy_sum": correct}

  def iterator(split, batch, process_index, process_count, seed):
    return mlm_lib.make_mlm_iterator(
        config.data, split=split, global_batch_size=batch, seq_len=config.seq_len, seed=seed,
        process_index=process_index, process_count=process_count,
        repeat=split == train_split)

  train_split = config.data.get("train_split", "train")
  eval_split = config.data.get("eval_split", "validation")
  axes = ("batch", None)
  return Task(
      name="mlm",
      make_model=lambda rngs: bert.Bert(cfg, rngs=rngs),
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_iterator=lambda b, p, n, seed=None: iterator(train_split, b, p, n, _seed(config, seed)),
      eval_iterator=lambda b, p, n: iterator(eval_split, b, p, n, config.seed),
      batch_axes={"tokens": axes, "targets": axes, "weights": axes},
      flops_per_example=config.seq_len * flops_lib.encoder_train_flops_per_token(
          cfg, config.seq_len),
      tokens_per_example=config.seq_len,
      bits_per_byte_factor=data_lib.bytes_per_token_factor(config.data) / math.log(2),
  )


def _ghost_batch_size(config, mesh) -> int:
  """config.model.ghost_batch_size, with -1 meaning the per-device batch (local BN stats)."""
  g = config.model.ghost_batch_size
  if g != -1:
    return g
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
  return (config.micro_batch_size or config.global_batch_size) // mesh_lib.data_parallel_size(mesh)


def image_task(config, mesh=None) -> Task:
  """Image classification with a ResNet: cross entropy; eval also reports `eval_accuracy`.

  An image counts as one "token" in the throughput metrics (tokens_per_example = 1). `mesh`
  (the program's) sets the per-device batch of ghost batch norm's -1.
  """
  info = images_lib.image_info(config.data)
  model_config = config.model.to_dict()
  model_config["ghost_batch_size"] = g = _ghost_batch_size(config, mesh)
  mb = config.micro_batch_size or config.global_batch_size
  if g < 0 or (g and mb % g) or (g == 0 and config.model.ghost_batch_size):
    raise ValueError(f"config.model.ghost_batch_size={config.model.ghost_batch_size} must "
                     f"divide the (micro-)batch of {mb} (0 = plain BN, -1 = per device).")
  cfg = resnet.ResNetConfig.from_config(model_config, num_classes=info["num_classes"],
                                        in_channels=info["channels"])

  def loss_fn(model, batch):
    logits = model(batch["image"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    accuracy = (jnp.argmax(logits, -1) == batch["label"]).mean()
    return losses.mean(), {"accuracy": accuracy}

  def eval_fn(model, batch):
    ones = jnp.ones(batch["label"].shape, jnp.float32)
    loss_sum, correct, count = _weighted_sums(model(batch["image"]), batch["label"], ones)
    return {"loss_sum": loss_sum, "count": count, "accuracy_sum": correct}

  def iterator(split, batch, process_index, process_count, seed):
    return images_lib.make_image_iterator(
        config.data, split=split, global_batch_size=batch, seed=seed,
        process_index=process_index, process_count=process_count,
        repeat=split == config.data.train_split)

  return Task(
      name="image",
      make_model=lambda rngs: resnet.ResNet(cfg, rngs=rngs),
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_iterator=lambda b, p, n, seed=None: iterator(config.data.train_split, b, p, n,
                                                         _seed(config, seed)),
      eval_iterator=lambda b, p, n: iterator(config.data.eval_split, b, p, n, config.seed),
      batch_axes={"image": ("batch", None, None, None), "label": ("batch",)},
      flops_per_example=flops_lib.resnet_train_flops_per_example(cfg, info["height"],
                                                                  info["width"]),
      tokens_per_example=1,
      bits_per_byte_factor=1 / math.log(2),  # eval loss in bits per image
  )



def _seed(config, seed):
  return config.seed if seed is None else seed


TASKS = {"lm": lm_task, "mlm": mlm_task, "image": image_task}


def check_eval_split(config, task: Task) -> None:
  """When evals are on, the validation split must hold one eval batch (before any step).

  Called by the training loops, not by make_task: building the split (a Markov corpus of a
  large vocabulary, say) is work that launch/preflight's compile-only runs must not do.

  Builds the eval iterator without reading from it: the split's size comes from the cached
  token stream (or image arrays), so this costs no pass over the data.
  """
  if not (config.get("eval_every", 0) > 0 or config.get("eval_steps")):
    return
  try:
    it = task.eval_iterator(config.eval_batch_size, 0, 1)
  except ValueError as e:
    if not str(e).startswith("split "):
      raise
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size}: more than the eval split "
                     f"holds ({e}); lower it, or set config.eval_every=0.") from None
  del it


def make_task(config, mesh=None) -> Task:
  """The config's task; `mesh` is the program's (default: config.mesh over all devices)."""
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not valid; choose one of {sorted(TASKS)}.")
  return TASKS[config.task](config, mesh)
