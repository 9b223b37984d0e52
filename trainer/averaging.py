"""An exponential moving average of a model's weights, for validation, best/ and the export.

Keras' own (`optimizer(use_ema=True)` with `keras.callbacks.SwapEMAWeights`) averages only the
trainable variables, so a BatchNorm network is evaluated with averaged kernels but the moving
statistics of the raw ones, a mismatch that costs `small` most of its val mIoU
(docs/experiments.md). Like
TF Model Garden's ExponentialMovingAverage optimizer, this average covers `model.weights`
(kernels and BatchNorm statistics alike) and uses its warm-up of the decay, min(momentum,
(1 + step) / (10 + step)), so early steps do not drag the initial weights along.

Shadow variables are mirrored like the model's and updated per device outside the replica
function (no collective: every replica already holds the same weights), so the same code runs
under every strategy; the train loop updates the average after each optimizer step.
"""

import contextlib

import tensorflow as tf


def _tf_variable(variable):
  # Keras 3 variables wrap a tf.Variable (a distributed one under a strategy) in `.value`.
  return getattr(variable, 'value', variable)


class WeightAverage:
  """Shadow copies of `model.weights` kept as their exponential moving average.

  Create it in the strategy's scope. `variables` go into the training checkpoint so a resumed
  run keeps its average.
  """

  def __init__(self, model, momentum: float):
    if not 0 < momentum < 1:
      raise ValueError(f'momentum must be in (0, 1), got {momentum}')
    self.momentum = momentum
    self._weights = [_tf_variable(w) for w in model.weights]
    self.variables = [
        tf.Variable(w.read_value(), trainable=False, name=f'average_{i}',
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        for i, w in enumerate(self._weights)]
    self._strategy = tf.distribute.get_strategy()

  def decay(self, step) -> tf.Tensor:
    step = tf.cast(step, tf.float32)
    return tf.minimum(self.momentum, (1.0 + step) / (10.0 + step))

  def update(self, step) -> None:
    """Mixes the current weights in after optimizer step `step`; cross-replica context."""
    keep = self.decay(step)

    def mix(average, weight):
      average.assign_sub(tf.cast(1.0 - keep, average.dtype) * (average - weight))

    for average, weight in zip(self.variables, self._weights):
      self._strategy.extended.update(average, mix, args=(weight,))

  def _swap(self) -> None:
    def swap(weight, average):
      raw = tf.identity(weight)
      weight.assign(average)
      average.assign(raw)

    for average, weight in zip(self.variables, self._weights):
      self._strategy.extended.update(weight, swap, args=(average,))

  @contextlib.contextmanager
  def swapped(self, enabled: bool = True):
    """Holds the average in the model's weights for the block (and the raw ones in `variables`)."""
    if not enabled:
      yield
      return
    self._swap()
    try:
      yield
    finally:
      self._swap()
