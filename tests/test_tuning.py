"""Tests of `python -m tuning.tune`: a smoke search on generated data, its outputs and TensorBoard
HParams data, the trainer consuming best_hparams.json, resume after a kill, KerasTuner's
distributed mode (a chief and 2 workers on 127.0.0.1), and the oracles, space and errors in-process.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import keras_tuner
import pytest
import tensorflow as tf

from camvid_common import errors
from conftest import REPO, event_tags, run_module
from tuning import results
from tuning import space
from tuning import tuner as tuner_lib

SMOKE = ('--config', 'smoke')
TUNED = {'dropout', 'learning_rate'}


def _tune_args(data_dir, output_dir, *extra):
  return ['-m', 'tuning.tune', *SMOKE, '--data_dir', str(data_dir), '--output_dir',
          str(output_dir), *map(str, extra)]


def _json(path):
  return json.loads(pathlib.Path(path).read_text())


def _hparams_events(path):
  """The hparams plugin's protos in the event files of one TensorBoard run dir."""
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  found = []
  for event_file in sorted(pathlib.Path(path).glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'hparams':
          found.append(plugin_data_pb2.HParamsPluginData.FromString(
              value.metadata.plugin_data.content))
  return found


@pytest.fixture(scope='module')
def search(smoke_data, tmp_path_factory):
  """A 2-trial Hyperband search (1 epoch each), killed (-9) inside trial 1, then rerun to the end.

  Returns the output dir and the stdout of both runs.
  """
  output_dir = tmp_path_factory.mktemp('tuning') / 'search'
  args = _tune_args(smoke_data, output_dir, '--max_trials', 2, '--epochs', 1)
  proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  # The smoke preset backs up every 4 steps (6 steps per epoch): kill -9 after that backup.
  # It counts once the checkpoint state file names it (written after the data and index files);
  # killing between the index and that file would leave nothing to resume from.
  backup = output_dir / 'keras_tuner' / 'trial_1' / 'checkpoints' / 'ckpt-4.index'
  state = backup.parent / 'checkpoint'

  def backed_up():
    return state.exists() and 'model_checkpoint_path: "ckpt-4"' in state.read_text()

  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not backed_up():
    time.sleep(0.05)
  proc.kill()
  first_out, first_err = proc.communicate()
  assert backup.exists(), f'the search ended before it could be interrupted: {first_err[-2000:]}'
  resumed = run_module(*args[1:])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return output_dir, first_out, resumed.stdout


def test_smoke_search_writes_results_and_tensorboard(search):
  output_dir, _, stdout = search
  trials = _json(output_dir / 'trials.json')
  assert [t['trial_id'] for t in trials] == ['0', '1']
  for trial in trials:
    assert set(trial) >= {'trial_id', 'hyperparameters', 'objective', 'status'}
    assert trial['status'] == 'COMPLETED' and trial['epochs'] == 1
    assert set(trial['hyperparameters']) == TUNED
    assert 0.0 <= trial['hyperparameters']['dropout'] <= 0.5
    assert 1e-4 <= trial['hyperparameters']['learning_rate'] <= 1e-2
    # The objective is the val mIoU of the trial's best checkpoint, as the trainer reported it.
    trial_dir = output_dir / 'keras_tuner' / f'trial_{trial["trial_id"]}'
    assert trial['objective'] == pytest.approx(_json(trial_dir / 'metrics.json')['mean_iou'])
    config = _json(trial_dir / 'config.json')
    assert config['model']['dropout'] == trial['hyperparameters']['dropout']
    assert config['optimizer']['learning_rate'] == trial['hyperparameters']['learning_rate']
    assert config['trainer']['epochs'] == 1 and config['strategy_used'] == 'default'

  best = _json(output_dir / 'best_hparams.json')
  assert set(best) == TUNED and all(isinstance(v, float) for v in best.values())
  winner = max(trials, key=lambda t: t['objective'])
  assert best == winner['hyperparameters']
  assert f'best trial:   {winner["trial_id"]}' in stdout
  assert not list((output_dir / 'keras_tuner').rglob('export'))  # Trials skip the export.

  # HParams dashboard: the experiment's domains, then one run per trial with its values.
  board = output_dir / 'tensorboard'
  experiment = [e.experiment for e in _hparams_events(board) if e.HasField('experiment')]
  assert len(experiment) == 1
  assert {h.name for h in experiment[0].hparam_infos} == TUNED | {'epochs'}
  assert 'val_mean_iou' in {m.name.tag for m in experiment[0].metric_infos}
  for trial in trials:
    run = board / f'trial_{trial["trial_id"]}'
    starts = [e.session_start_info for e in _hparams_events(run)
              if e.HasField('session_start_info')]
    assert len(starts) == 1  # Also for the resumed trial.
    assert starts[0].hparams['learning_rate'].number_value == pytest.approx(
        trial['hyperparameters']['learning_rate'])
    assert 'val_mean_iou' in event_tags(run)
    assert 'epoch_mean_iou' in event_tags(run / 'val')


@pytest.mark.multiprocess
def test_killed_search_resumes_without_rerunning_finished_trials(search):
  output_dir, first, second = search
  assert 'trial 0: best checkpoint' in first and 'trial 1: epoch 1/1' not in first
  # Rerunning the command: trial 0 finished and is not run again; the killed trial 1 continues
  # from its own backup, so the interrupted steps are not trained twice (6 steps in all).
  assert 'trial 0:' not in second
  assert 'trial 1: resumed from' in second and 'ckpt-4' in second
  assert tf.train.latest_checkpoint(
      str(output_dir / 'keras_tuner' / 'trial_1' / 'checkpoints')).endswith('ckpt-6')
  assert [t['status'] for t in _json(output_dir / 'trials.json')] == ['COMPLETED'] * 2


def test_trainer_trains_with_best_hparams(search, smoke_data, tmp_path):
  output_dir, _, _ = search
  best = _json(output_dir / 'best_hparams.json')
  model_dir = tmp_path / 'model'
  proc = run_module('trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir', model_dir,
                    '--epochs', 1, '--hparams_file', output_dir / 'best_hparams.json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = _json(model_dir / 'config.json')
  assert config['model']['dropout'] == best['dropout']
  assert config['optimizer']['learning_rate'] == best['learning_rate']


def test_resuming_with_other_flags_is_one_error_line(search, smoke_data):
  output_dir, _, _ = search
  before = {p.name: p.read_text() for p in output_dir.glob('*.json')}
  proc = run_module(*_tune_args(smoke_data, output_dir, '--max_trials', 2, '--epochs', 1,
                                '--lr_max', 0.1)[1:])
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert 'started with other settings (--lr_max 0.01 -> 0.1)' in errors[0]
  assert '--overwrite' in errors[0] and 'Traceback' not in proc.stderr
  assert {p.name: p.read_text() for p in output_dir.glob('*.json')} == before


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_distributed_search_with_a_chief_and_two_workers(smoke_data, tmp_path):
  output_dir = tmp_path / 'search'
  port = _free_port()
  env = {**os.environ, 'KERASTUNER_ORACLE_IP': '127.0.0.1', 'KERASTUNER_ORACLE_PORT': str(port),
         # gRPC honours proxy variables; the oracle's traffic must never go to a proxy.
         'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost'}
  args = _tune_args(smoke_data, output_dir, '--tuner', 'random', '--max_trials', 2,
                    '--epochs', 1)
  procs = [subprocess.Popen([sys.executable, *args], cwd=REPO,
                            env={**env, 'KERASTUNER_TUNER_ID': tuner_id},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for tuner_id in ('chief', 'tuner0', 'tuner1')]
  outs = []
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=420))
  finally:
    for proc in procs:
      proc.kill()
  for proc, (_, err) in zip(procs, outs):
    assert proc.returncode == 0, err[-3000:]
  (chief_out, _), (out0, _), (out1, _) = outs
  assert f'serving the oracle on 127.0.0.1:{port}' in chief_out
  assert 'epoch 1/1' not in chief_out  # The chief trains nothing.
  # The workers ran the two trials between them (usually one each), each trial once.
  ran = [line.split(':')[0] for out in (out0, out1) for line in out.splitlines()
         if 'epoch 1/1' in line]
  assert sorted(ran) == ['trial 0', 'trial 1']
  assert 'the chief has no more trials' in out0 and 'the chief has no more trials' in out1
  trials = _json(output_dir / 'trials.json')
  assert [(t['trial_id'], t['status']) for t in trials] == [('0', 'COMPLETED'), ('1', 'COMPLETED')]
  assert all(t['objective'] is not None for t in trials)
  assert set(_json(output_dir / 'best_hparams.json')) == TUNED


def _smoke_config():
  from trainer import configs  # pylint: disable=g-import-not-at-top
  return configs.get_config('smoke')


class _QuickTuner(keras_tuner.engine.base_tuner.BaseTuner):
  """Scores a trial without training: exercises the oracles as tune.py configures them."""

  def run_trial(self, trial, *args, **kwargs):
    values = trial.hyperparameters.values
    return {tuner_lib.OBJECTIVE: -abs(values['learning_rate'] - 1e-3) - values['dropout']}


@pytest.mark.parametrize('kind, max_trials', [('hyperband', 7), ('bayesian', 8), ('random', 3)])
def test_oracles_stop_at_max_trials_within_the_bounds(kind, max_trials, tmp_path):
  if kind == 'bayesian':
    pytest.importorskip('sklearn')
  bounds = space.Bounds(dropout_min=0.1, dropout_max=0.3, lr_min=1e-5, lr_max=1e-1)
  (tmp_path / 'out').mkdir()
  oracle = tuner_lib.make_oracle(kind, bounds, max_trials, epochs=3, seed=7,
                                 output_dir=str(tmp_path / 'out'))
  tuner = _QuickTuner(oracle, directory=str(tmp_path), project_name='p')
  tuner.search()
  trials = list(oracle.trials.values())
  assert len(trials) == max_trials and all(t.status == 'COMPLETED' for t in trials)
  for trial in trials:
    values = trial.hyperparameters.values
    assert 0.1 <= values['dropout'] <= 0.3 and 1e-5 <= values['learning_rate'] <= 1e-1
    assert space.trial_epochs(values, 3) in (1, 3)
  assert tuner_lib.finished(oracle)
  records = results.trial_records(trials, 3)
  assert [r['trial_id'] for r in records] == [t.trial_id for t in
                                              sorted(trials, key=lambda t: int(t.trial_id))]
  assert results.best_trial(trials).score == max(t.score for t in trials)
  # The oracle kept trials.json and best_hparams.json current as it saved its state.
  assert _json(tmp_path / 'out' / 'trials.json') == records
  assert _json(tmp_path / 'out' / 'best_hparams.json') == space.tuned_values(
      results.best_trial(trials).hyperparameters.values)


def test_hyperband_iteration_size_matches_keras_tuner(tmp_path):
  for max_epochs in (1, 2, 3, 9, 20):
    oracle = keras_tuner.oracles.HyperbandOracle(
        objective=keras_tuner.Objective(tuner_lib.OBJECTIVE, 'max'), max_epochs=max_epochs,
        factor=3, hyperband_iterations=1, hyperparameters=space.hyperparameters(space.Bounds()),
        seed=3)
    _QuickTuner(oracle, directory=str(tmp_path), project_name=f'p{max_epochs}').search()
    assert len(oracle.trials) == space.hyperband_trials_per_iteration(max_epochs, 3)
  # A promoted trial carries its parent's values and a larger budget; the trial is built from
  # the preset with that budget (trained from scratch, see tuning/tuner.py).
  promoted = [t for t in oracle.trials.values() if 'tuner/trial_id' in t.hyperparameters.values]
  assert promoted
  values = promoted[0].hyperparameters.values
  config = space.trial_config(_smoke_config(), values, space.trial_epochs(values, 20))
  assert config.trainer.epochs == values['tuner/epochs'] > values['tuner/initial_epoch']
  assert config.optimizer.learning_rate == values['learning_rate']
  assert config.model.dropout == values['dropout']




@pytest.mark.parametrize('env, expected', [
    ({}, 'single'),
    ({'KERASTUNER_TUNER_ID': 'chief', 'KERASTUNER_ORACLE_IP': '0.0.0.0',
      'KERASTUNER_ORACLE_PORT': '8000'}, 'chief'),
    ({'KERASTUNER_TUNER_ID': 'tuner3', 'KERASTUNER_ORACLE_IP': 'tune-chief',
      'KERASTUNER_ORACLE_PORT': '8000'}, 'worker'),
])
def test_role_from_the_environment(env, expected):
  assert tuner_lib.role(env) == expected


@pytest.mark.parametrize('env, message', [
    ({'KERASTUNER_ORACLE_IP': 'x'}, 'KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_PORT: not set'),
    ({'KERASTUNER_TUNER_ID': 'tuner0', 'KERASTUNER_ORACLE_IP': '',
      'KERASTUNER_ORACLE_PORT': '8000'}, 'KERASTUNER_ORACLE_IP: not set'),
    ({'KERASTUNER_TUNER_ID': 'chief', 'KERASTUNER_ORACLE_IP': 'x',
      'KERASTUNER_ORACLE_PORT': 'http'}, 'not a port number'),
])
def test_incomplete_distributed_environment_is_an_error(env, message):
  with pytest.raises(ValueError, match=message):
    tuner_lib.role(env)


@pytest.mark.parametrize('bounds, message', [
    (space.Bounds(dropout_max=1.0), '--dropout_max 1: need 0 <= min < max < 1'),
    (space.Bounds(dropout_min=0.4, dropout_max=0.2), '--dropout_min 0.4'),
    (space.Bounds(lr_min=0.0), '--lr_min 0'),
    (space.Bounds(lr_min=1e-2, lr_max=1e-3), 'need 0 < min < max'),
])
def test_bad_bounds(bounds, message):
  with pytest.raises(errors.ConfigError, match=message):
    bounds.validate()


def test_resume_with_other_settings_is_refused(tmp_path):
  settings = {'tuner': 'random', 'config': 'smoke', 'epochs': 2, 'dropout_min': 0.0,
              'dropout_max': 0.5, 'lr_min': 1e-4, 'lr_max': 1e-2,
              'early_stopping_patience': None, 'seed': 1, 'max_trials': 2, 'data_dir': 'd'}
  results.check_and_record_settings(str(tmp_path), settings)
  # More trials (extending a search) or moved data are fine; another space or budget is not.
  results.check_and_record_settings(str(tmp_path), {**settings, 'max_trials': 5, 'data_dir': 'e'})
  with pytest.raises(errors.ConfigError, match=r'--lr_max 0.01 -> 0.1.*--overwrite'):
    results.check_and_record_settings(str(tmp_path), {**settings, 'lr_max': 0.1})
  with pytest.raises(errors.ConfigError, match="worker's flags differ"):
    results.check_settings_if_recorded(str(tmp_path), {**settings, 'epochs': 3})
  results.check_settings_if_recorded(str(tmp_path / 'elsewhere'), settings)


@pytest.mark.parametrize('configured, gpus, cpus, expected', [
    ('auto', 0, 1, 'default'), ('auto', 0, 2, 'mirrored'), ('auto', 1, 1, 'default'),
    ('auto', 4, 1, 'mirrored'), ('default', 4, 1, 'default'), ('mirrored', 1, 1, 'mirrored'),
])
def test_strategy_per_trial(configured, gpus, cpus, expected):
  assert tuner_lib.strategy_kind(configured, gpus, cpus) == expected


def test_multi_worker_inside_a_trial_is_refused():
  with pytest.raises(errors.ConfigError, match='cannot run inside a tuning trial'):
    tuner_lib.strategy_kind('multi_worker', 0, 1)
