"""Hyperparameter search over the trainer: dropout and learning rate, with KerasTuner's oracles.

`python -m tuning.tune` (tune.py) is the entry point. space.py defines the search space and maps a
trial's values onto the trainer's Config; tuner.py runs each trial with the trainer's own
`trainer.train.run`; results.py writes trials.json and best_hparams.json; board.py writes the
TensorBoard HParams data.
"""
