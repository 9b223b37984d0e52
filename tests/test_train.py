"""Tests of the trainer's distributed step functions (trainer/train.py make_steps) on one device."""

import numpy as np
import pytest
import tensorflow as tf

from trainer import configs, losses, train
from trainer import model as model_lib

NUM_CLASSES = 4


@pytest.mark.parametrize('strength', [0.0, 1.0])
def test_evaluation_scores_the_logit_adjusted_argmax(strength):
  """Val metrics count argmax(logits - strength * log(w)), the prediction the export serves."""
  config = configs.get_config('smoke').replace(image_size=(16, 16), logit_adjustment=strength)
  tf.keras.utils.set_random_seed(1)
  model = train.build_model(config, NUM_CLASSES)
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((2, 16, 16, 3), dtype=np.float32),
           'mask': rng.integers(0, NUM_CLASSES, (2, 16, 16)).astype(np.int32),
           'valid': np.ones([2], bool)}
  weights = np.array([8.0, 1.0, 0.5, 2.0], np.float32)
  steps = train.make_steps(model, None, tf.distribute.get_strategy(), config, NUM_CLASSES,
                           weights)
  _, _, cm, count = steps.evaluate(iter(tf.data.Dataset.from_tensors(batch)), tf.constant(1))
  assert int(count) == 2

  logits = model(batch['image'], training=False).numpy()
  bias = losses.logit_adjustment_bias(weights, strength)
  predicted = np.argmax(logits + (0 if bias is None else bias), -1)
  expected = np.zeros([NUM_CLASSES] * 2, np.int64)
  np.add.at(expected, (batch['mask'].reshape(-1), predicted.reshape(-1)), 1)
  np.testing.assert_array_equal(cm.numpy(), expected)
  # Test of the test: with the adjustment on, the weighting's shift must have mattered.
  if strength:
    assert np.any(predicted != np.argmax(logits, -1))


def test_training_model_fuses_batchnorm_on_one_replica(tmp_path):
  """Training builds use the fused kernel (same variables), evaluation and export Keras BN."""
  config = configs.get_config('smoke').replace(sync_batchnorm=True)
  tf.keras.utils.set_random_seed(1)
  training = train.build_model(config, NUM_CLASSES, training=True)
  plain = train.build_model(config, NUM_CLASSES)
  fused = [l for l in training.layers if isinstance(l, model_lib.FusedBatchNormalization)]
  assert fused and not any(isinstance(l, model_lib.FusedBatchNormalization)
                           for l in plain.layers)
  assert not all(np.array_equal(a, b) for a, b in zip(training.get_weights(), plain.get_weights()))
  # A checkpoint of the training model restores into the plain one.
  path = tf.train.Checkpoint(model=training).write(str(tmp_path / 'ckpt'))
  tf.train.Checkpoint(model=plain).read(path).assert_existing_objects_matched()
  for a, b in zip(training.weights, plain.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
