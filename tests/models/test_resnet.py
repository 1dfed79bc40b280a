"""ResNets (He et al. 2016): shapes and FLOPs against the papers, digits data, training."""
import jax
import numpy as np
import pytest
from flax import nnx

from train import loop
from train import trainer
from configs import resnet as resnet_config
from data import digits
from data import images
from models import flops
from models import resnet
from sharding import mesh as mesh_lib
from tests import testlib


def _params(cfg):
  model = nnx.eval_shape(lambda: resnet.ResNet(cfg, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("style, depth, classes, params, size, gmacs", [
    # torchvision's counts for the ImageNet nets; He et al. 2016 §4.2 "0.27M", "0.85M" for
    # CIFAR (option A shortcuts; option B's 1x1 projections add a little).
    ("imagenet", 18, 1000, 11_689_512, 224, 1.82),
    ("imagenet", 50, 1000, 25_557_032, 224, 4.09),
    ("cifar", 20, 10, 0.27e6, 32, 0.041),
    ("cifar", 56, 10, 0.85e6, 32, 0.126),
])
def test_params_and_flops_match_the_papers(style, depth, classes, params, size, gmacs):
  cfg = resnet.ResNetConfig(depth=depth, style=style, num_classes=classes)
  np.testing.assert_allclose(_params(cfg), params, rtol=0.02)
  train_flops = flops.resnet_train_flops_per_example(cfg, size, size)
  np.testing.assert_allclose(train_flops / 6 / 1e9, gmacs, rtol=0.02)  # 6 FLOPs per MAC


@pytest.mark.parametrize("overrides, message", [
    (dict(depth=21), "config.model.depth=21 is invalid for style 'cifar'"),
    (dict(depth=19, style="imagenet"), "config.model.depth=19 is invalid for style 'imagenet'"),
    (dict(style="vgg"), "config.model.style='vgg'"),
])
def test_bad_config_is_one_line(overrides, message):
  with pytest.raises(ValueError, match=message):
    resnet.ResNet(resnet.ResNetConfig(**overrides), rngs=nnx.Rngs(0))


def test_digits_split_is_fixed():
  arrays = digits.load_arrays()
  (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
  assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
  assert x_train.dtype == np.uint8 and x_train.max() == 255
  assert np.bincount(y_test, minlength=10).min() >= 25  # every class is in the test split
  again = digits.load_arrays()["test"]
  np.testing.assert_array_equal(again[0], x_test)
  info = images.image_info(images.default_image_data_config())
  assert info == {"height": 8, "width": 8, "channels": 1, "num_classes": 10}


def _iterator(config, **kw):
  kw = dict(dict(split="train", global_batch_size=8, seed=0), **kw)
  return images.make_image_iterator(config, **kw)


def test_image_batches_shard_over_processes_and_resume():
  config = images.default_image_data_config()
  config.flip = True  # exercise both augmentations
  one = _iterator(config)
  two = [_iterator(config, process_index=p, process_count=2) for p in range(2)]
  for _ in range(200):  # past an epoch (180 batches)
    batch, halves = next(one), [next(it) for it in two]
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], np.concatenate([h[key] for h in halves]))
  state = one.get_state()
  expected = [next(one) for _ in range(3)]
  resumed = _iterator(config)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["image"], want["image"])


def test_augmentation_crops_with_padding_and_eval_is_plain():
  config = images.default_image_data_config()  # digits: crop padding 1, no flips
  assert config.crop_padding == 1 and not config.flip
  mean, std = images.channel_stats(config)
  x_test, y_test = digits.load_arrays()["test"]
  eval_batch = next(_iterator(config, split="test", repeat=False, global_batch_size=120))
  np.testing.assert_array_equal(eval_batch["label"], y_test[:120])  # in order
  np.testing.assert_allclose(eval_batch["image"], (x_test[:120] / 255.0 - mean) / std,
                             rtol=1e-5, atol=1e-6)
  raw = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6, 1) + 1
  hashes = images.row_hashes(0, np.arange(2))
  crops = images.random_crop_flip(raw, hashes, padding=1, flip=False)
  for crop, image in zip(crops, raw):
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
    assert any(np.array_equal(crop, padded[dy:dy + 6, dx:dx + 6])
               for dy in range(3) for dx in range(3))


def test_tiny_resnet_reaches_95_percent_on_digits(tmp_path):
  config = resnet_config.get_config("tiny")
  config.mesh.update(data=1)
  config.async_checkpointing = False
  one_device = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])  # fastest on CPU
  result = loop.train(config, str(tmp_path), setup_=trainer.setup(config, mesh=one_device))
  assert result["eval_accuracy"] >= 0.95, result
  assert result["mfu"] > 0  # FLOPs per image are known


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_lars_and_lamb_train_a_resnet(name):
  config = resnet_config.get_config("tiny,global_batch_size=32")
  config.mesh.update(data=1)
  config.optimizer.name = name
  config.optimizer.weight_decay = None  # each optimizer's own default
  # Adapted layers move ~lr x trust per step relative to their norm (LARS: 1 x 0.01; LAMB:
  # 0.05); the BN parameters, outside the trust ratio, take plain momentum / Adam steps.
  config.optimizer.trust_coefficient = 0.01
  config.schedule.update(peak_lr=1.0 if name == "lars" else 0.05, warmup_steps=0)
  losses, _, _ = testlib.run_steps(config, num_devices=1, steps=20)
  assert losses[-5:].mean() < losses[:3].mean() - 0.5, losses
