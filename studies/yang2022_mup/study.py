r"""μP checks: the coordinate check and learning-rate transfer across width (Yang et al. 2022).

  nice -n 10 python -m studies.yang2022_mup.study \
      --config=studies/yang2022_mup/config.py:coord --workdir=/tmp/mup_coord
  nice -n 10 python -m sweep \
      --config=studies/yang2022_mup/config.py:transfer --workdir=/tmp/mup_transfer
  (`:tiny` for a smoke test of either)

The coordinate check (this module's entry point) runs the decoder directly, one jitted step
per width, no data pipeline, and writes to the workdir:
  coord_check.md, coord_check.png, coord_check.json   mean |x| of every layer's output
      (embedding, attention, MLP, residual stream, logits) after `coord.steps` optimizer
      steps, for widths 64..1024, standard against μP (the mup package's "coord check").

The lr transfer is a sweep study (sweep/runner.py): `points` gives one trial per
(parametrization, width, lr), the lr as the runtime `lr_scale`, so each width's lrs train as
one vectorised program of the trainer (the same μP optimizer a `train` run builds from
`config.model.parametrization='mup'`) with the sweep's workers, retries and resume; `analyse`
writes <workdir>/report/transfer.md and transfer.png: the final eval loss per width × lr
(×2 grid), standard against μP, with the argmin per width (Yang et al. 2022, Fig. 1).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from models import mup
from models import transformer
from optimizers import factory
from sweep import point as point_lib

PARAMETRIZATIONS = ("standard", "mup")


# ----------------------------------------------------------------------------------------------
# Coordinate check
# ----------------------------------------------------------------------------------------------

def text_tokens(num_tokens: int) -> np.ndarray:
  """Real text without a dataset: bytes of the interpreter's `os.py`, repeated if needed."""
  with open(os.__file__, "rb") as f:
    data = np.frombuffer(f.read(), np.uint8)
  reps = -(-num_tokens // data.size)
  return np.tile(data, reps)[:num_tokens].astype(np.int32)


def decoder_activations(model: transformer.Transformer, tokens_BxT) -> dict:
  """Mean |x| of each layer's output: the embedding, per block the attention and MLP outputs
  and the residual stream after the block, and the logits (the decoder's own forward)."""
  l1 = lambda x: jnp.mean(jnp.abs(x.astype(jnp.float32)))
  positions_T = jnp.arange(tokens_BxT.shape[1])
  x_BxTxD = jnp.take(model.embed[...], tokens_BxT, axis=0)
  out = {"embed": l1(x_BxTxD)}
  for i, block in enumerate(model.blocks):
    a_BxTxD = block.attn(block.attn_norm(x_BxTxD), positions_T)
    x_BxTxD = x_BxTxD + a_BxTxD
    m_BxTxD = block.mlp(block.mlp_norm(x_BxTxD))
    x_BxTxD = x_BxTxD + m_BxTxD
    out.update({f"block{i}.attn": l1(a_BxTxD), f"block{i}.mlp": l1(m_BxTxD),
                f"block{i}.out": l1(x_BxTxD)})
  out["logits"] = l1(model(tokens_BxT))
  return out


def coord_check(parametrization: str, widths, *, steps: int = 5, lr: float = 1e-2,
                optimizer: str = "adamw", rule: str | None = None, base_d_model: int = 64,
                num_layers: int = 2, num_heads: int = 4, mlp_ratio: int = 4,
                batch_size: int = 4, seq_len: int = 32, seed: int = 0,
                readout_zero_init: bool = True, optimizer_overrides=None) -> dict:
  """{width: {layer: [mean |x| at t = 0..steps]}}, t = number of optimizer steps taken.

  Every width trains on the same real-text batches (one per step) from the same seed, with
  weight decay 0. `rule`: None = the μP multipliers for `optimizer` (as the trainer builds
  them; none for 'standard'), 'none' = no multipliers, or a `models.mup` rule name
  ('adam' | 'sgd' | 'trust_ratio') to force one (for checking the trust-ratio choice).
  `readout_zero_init=False` (μP only): the readout starts from the base width's init std,
  not zero (TP5 Table 8), which LARS needs (see `models/mup.py`).
  """
  tokens = text_tokens(steps * batch_size * (seq_len + 1) + 1)
  batches = tokens[:-1].reshape(steps, batch_size, seq_len + 1)
  batches = np.concatenate([batches, batches[-1:]])  # t = steps: measured on the last batch
  opt_config = factory.default_optimizer_config()
  opt_config.name = optimizer
  opt_config.weight_decay = 0.0
  opt_config.update(optimizer_overrides or {})
  results = {}
  for width in widths:
    cfg = transformer.TransformerConfig(
        vocab_size=256, d_model=width, num_layers=num_layers, num_heads=num_heads,
        mlp_dim=mlp_ratio * width, max_seq_len=seq_len, parametrization=parametrization,
        base_d_model=base_d_model, readout_zero_init=readout_zero_init)
    model = transformer.Transformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    logical = mup.logical_axes(params)
    params = nnx.to_pure_dict(params)
    if rule == "none" or (rule is None and parametrization != "mup"):
      mults = None
    elif rule is None:
      mults = mup.optimizer_lr_multipliers(opt_config, logical, cfg.d_model / base_d_model)
    else:
      mults = mup.lr_multipliers(logical, cfg.d_model / base_d_model, rule)
    tx = factory.make_optimizer(opt_config, lr_multipliers=mults)

    @jax.jit
    def step(params, opt_state, batch_BxT1):
      """(activations at `params`, params and state after one step): one compile per width."""
      def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest)(batch_BxT1[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch_BxT1[:, 1:]).mean()
      acts = decoder_activations(nnx.merge(graphdef, params, rest), batch_BxT1[:, :-1])
      grads = jax.grad(loss_fn)(params)
      opt_state.hyperparams["learning_rate"] = jnp.float32(lr)
      updates, opt_state = tx.update(grads, opt_state, params)
      return acts, optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    history = []
    for t in range(steps + 1):  # the update after the last measurement is discarded
      acts, params, opt_state = step(params, opt_state, batches[t])
      history.append(jax.device_get(acts))
    results[width] = {k: [float(h[k]) for h in history] for k in history[0]}
  return results


def spread(results: dict, t: int = -1) -> dict:
  """{layer: max over widths / min over widths of mean |x|} at step t."""
  layers = next(iter(results.values())).keys()
  out = {}
  for layer in layers:
    values = [results[w][layer][t] for w in results]
    out[layer] = max(values) / min(values)
  return out


def coord_check_markdown(all_results: dict, t: int = -1) -> str:
  """One table per parametrization: layers × widths, plus the max/min ratio across widths."""
  lines = []
  for name, results in all_results.items():
    widths = list(results)
    ratios = spread(results, t)
    lines += [f"**{name}** (mean |x| after {len(next(iter(results.values()))['logits']) - 1} "
              "steps)", "",
              "| layer | " + " | ".join(f"d={w}" for w in widths) + " | max/min |",
              "|---" * (len(widths) + 2) + "|"]
    for layer in ratios:
      row = " | ".join(f"{results[w][layer][t]:.3g}" for w in widths)
      lines.append(f"| {layer} | {row} | {ratios[layer]:.2f} |")
    lines.append("")
  return "\n".join(lines)


def plot_coord_check(all_results: dict, path: str, steps_to_plot=(1, -1)) -> None:
  """Rows: parametrizations; columns: after 1 step and after the last; log-log width vs l1."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(all_results)
  fig, axes = plt.subplots(len(names), len(steps_to_plot), figsize=(5 * len(steps_to_plot),
                                                                    3.6 * len(names)),
                           squeeze=False, sharey="row")
  for r, name in enumerate(names):
    results = all_results[name]
    widths = sorted(results)
    num_t = len(next(iter(results.values()))["logits"])
    for c, t in enumerate(steps_to_plot):
      ax = axes[r][c]
      for layer in results[widths[0]]:
        ax.plot(widths, [results[w][layer][t] for w in widths], marker="o", label=layer)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_title(f"{name}: after {t % num_t} step(s)")
      ax.set_xlabel("d_model")
      ax.set_ylabel("mean |x|")
      ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Learning-rate transfer across width
# ----------------------------------------------------------------------------------------------

def lr_grid(transfer) -> list[float]:
  """The sweep's learning rates: transfer.lr_center * 2^k, k = lr_low..lr_high."""
  return [float(transfer.lr_center * 2.0 ** k)
          for k in range(transfer.lr_low, transfer.lr_high + 1)]


def cell_overrides(config, parametrization: str, width: int) -> dict:
  """The trainer-config overrides of one (parametrization, width) cell of the sweep."""
  return {"model.parametrization": parametrization, "model.d_model": int(width),
          "model.mlp_dim": int(config.transfer.mlp_ratio * width)}


def points(config) -> list[point_lib.Point]:
  """One sweep point per (parametrization, width, lr): cell = (parametrization, width), the
  lr the runtime lr_scale over the schedule's peak, so a width's lrs train vectorised on the
  same batches (Yang et al. 2022, Fig. 1: the loss-vs-lr curve per width)."""
  t = config.transfer
  if not t.enabled:
    raise ValueError(f"config.transfer.enabled=False (the :{config.variant} variant): the "
                     "coordinate check runs with `python -m studies.yang2022_mup.study`.")
  bad = sorted(set(t.parametrizations) - set(PARAMETRIZATIONS))
  if bad or not t.parametrizations:
    raise ValueError(f"config.transfer.parametrizations={tuple(t.parametrizations)}: choose "
                     f"from {list(PARAMETRIZATIONS)}.")
  if not t.widths or min(t.widths) < 1 or t.lr_high < t.lr_low:
    raise ValueError(f"config.transfer: widths={tuple(t.widths)} (positive) and "
                     f"lr_low={t.lr_low} <= lr_high={t.lr_high} needed.")
  peak = float(config.base.schedule.peak_lr)
  out = []
  for name in t.parametrizations:
    for width in t.widths:
      cell = f"{name}-d{width}"
      for lr in lr_grid(t):
        out.append(point_lib.Point(
            f"{cell}-lr{lr:.6g}", cell_overrides(config, name, width), lr_scale=lr / peak,
            cell=cell, row={"parametrization": name, "width": int(width), "lr": lr}))
  return out


def transfer_results(rows, config) -> dict:
  """{parametrization: {width: {lr: final eval loss}}} from the sweep's rows, in the config's
  order; a diverged, failed or missing point is NaN."""
  lrs = lr_grid(config.transfer)
  found = {(r["parametrization"], int(r["width"]), float(r["lr"])): r for r in rows}
  results = {}
  for name in config.transfer.parametrizations:
    results[name] = {}
    for width in config.transfer.widths:
      losses = {}
      for lr in lrs:
        r = found.get((name, int(width), lr), {})
        loss = float(r.get("loss", math.nan)) if r.get("status") == "ok" else math.nan
        losses[lr] = loss if math.isfinite(loss) else math.nan
      results[name][int(width)] = losses
  return results


def argmin_lr(losses: dict) -> float | None:
  finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
  return min(finite, key=finite.get) if finite else None


def transfer_markdown(results: dict, lrs) -> str:
  """Per parametrization: width × lr -> final eval loss, best per width in bold, and the shift
  of the argmin across widths in ×2 grid steps."""
  lines = []
  for name, per_width in results.items():
    lines += [f"**{name}**", "",
              "| d_model | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " | best lr |",
              "|---" * (len(lrs) + 2) + "|"]
    best = {}
    for width, losses in per_width.items():
      best[width] = argmin_lr(losses)
      cells = []
      for lr in lrs:
        v = losses.get(lr, float("nan"))
        text = "div" if not math.isfinite(v) else f"{v:.3f}"
        cells.append(f"**{text}**" if lr == best[width] else text)
      best_text = "-" if best[width] is None else f"{best[width]:.3g}"
      lines.append(f"| {width} | " + " | ".join(cells) + f" | {best_text} |")
    found = [b for b in best.values() if b is not None]
    if found:
      shift = round(math.log2(max(found) / min(found)))
      lines += ["", f"argmin moves by {shift} grid step(s) (×2) across widths "
                f"{min(per_width)}..{max(per_width)}."]
    lines.append("")
  return "\n".join(lines)


def plot_transfer(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(results)
  fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False,
                           sharey=True)
  for ax, name in zip(axes[0], names):
    widths = list(results[name])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
    for color, width in zip(colors, widths):
      losses = results[name][width]
      lrs = sorted(losses)
      ax.plot(lrs, [losses[lr] for lr in lrs], marker="o", color=color, label=f"d={width}")
      best = argmin_lr(losses)
      if best is not None:
        ax.plot([best], [losses[best]], marker="*", markersize=14, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate")
    ax.set_title(name)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("final eval loss (nats/byte)")
  axes[0][-1].legend()
  finite = [v for r in results.values() for l in r.values() for v in l.values()
            if math.isfinite(v)]
  if finite:  # diverged or barely trained runs would squash the interesting region
    lo = min(finite)
    axes[0][0].set_ylim(lo - 0.05, lo + 1.0)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def analyse(rows, config, out_dir: str) -> dict:
  """Writes transfer.md (width × lr tables, argmin per width) and transfer.png to out_dir;
  returns {parametrization: {width: best lr}} (Yang et al. 2022, Fig. 1)."""
  from train import files  # pylint: disable=g-import-not-at-top
  results = transfer_results(rows, config)
  text = transfer_markdown(results, lr_grid(config.transfer))
  os.makedirs(out_dir, exist_ok=True)
  files.atomic_write(os.path.join(out_dir, "transfer.md"), text)
  plot_transfer(results, os.path.join(out_dir, "transfer.png"))
  logging.info("lr transfer across width:\n%s", text)
  return {name: {w: argmin_lr(losses) for w, losses in per_width.items()}
          for name, per_width in results.items()}


def run(config, workdir: str) -> dict:
  """The coordinate check: coord_check.md, .json and .png in workdir."""
  if not config.coord.enabled:
    raise ValueError(f"config.coord.enabled=False (the :{config.variant} variant): the lr "
                     "transfer is a sweep: `python -m sweep --config=studies/yang2022_mup/"
                     f"config.py:{config.variant} --workdir=...`.")
  os.makedirs(workdir, exist_ok=True)
  cc = config.coord
  start = time.time()
  coord = {name: coord_check(name, cc.widths, steps=cc.steps, lr=cc.lr,
                             optimizer=cc.optimizer, base_d_model=cc.base_d_model,
                             num_layers=cc.num_layers, batch_size=cc.batch_size,
                             seq_len=cc.seq_len)
           for name in PARAMETRIZATIONS}
  with open(os.path.join(workdir, "coord_check.md"), "w") as f:
    f.write(coord_check_markdown(coord))
  with open(os.path.join(workdir, "coord_check.json"), "w") as f:
    json.dump({n: {str(w): v for w, v in r.items()} for n, r in coord.items()}, f, indent=1)
  plot_coord_check(coord, os.path.join(workdir, "coord_check.png"))
  logging.info("coordinate check: %.0f s\n%s", time.time() - start, coord_check_markdown(coord))
  return coord


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  start = time.time()
  run(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"done in {time.time() - start:.0f} s; outputs in {flags.FLAGS.workdir}")


if __name__ == "__main__":
  # Flags are defined here, not at import, so tests can import this module next to others.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from train import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "studies/yang2022_mup/config.py:variant",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the tables and plots go.")
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  sys.exit(cli.run(main))
