"""The builder, trainer, evaluator, predictor and tuner on gs:// paths, against a real GCS emulator.

Everything goes through scripts/gcs_emulator.py (gcp-storage-emulator behind a TLS-terminating
loopback proxy, see tests/gcs_harness.py): TensorFlow's own GCS filesystem, Keras and
google-cloud-storage talk to it as they would to Google.

The end-to-end pipeline runs against an emulator whose proxy fails 10% of requests (a 503 or a
dropped connection; CAMVID_GCS_FAULT_RATE=0 to rerun it without): raw scenes on gs:// are built
into gs:// TFRecords by forked workers, the smoke preset trains from them into a gs:// model_dir,
is killed -9 after a mid-epoch backup and resumed from the bucket, then evaluated, used by the
predictor and its export read back; the results must equal a fault-free run's where they are
deterministic (shards byte for byte) and be complete everywhere (no temporary or partial object
left as complete). An export also runs against faults aimed at every is-directory check and
nested copy. The tuner's state and the errors for a missing or forbidden bucket use the
session's fault-free emulator.
"""

import base64
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import gcs_harness
from conftest import REPO, event_tags, run_module
from gcs_harness import BUCKET, DENIED_BUCKET, gcs, gcs_process_env  # pylint: disable=unused-import

pytestmark = pytest.mark.emulator

SMOKE = ('--config', 'smoke')
ROOT = f'gs://{BUCKET}/e2e'
RAW, DATA, MODEL = f'{ROOT}/raw', f'{ROOT}/tfrecords', f'{ROOT}/model'
NUM_SHARDS = {'train': 3, 'val': 2}
SHARDS = ('--num_shards', 'train=3,val=2')
STEPS_PER_EPOCH = 6  # smoke: 24 train frames, global batch 4.
FAULT_RATE = float(os.environ.get('CAMVID_GCS_FAULT_RATE', '0.1'))
NO_BUCKET = 'gs://no-such-bucket-camvid'


def _run(emulator, module, *args, timeout=300):
  proc = run_module(module, *args, env=emulator.env, timeout=timeout)
  proc.emulator_log = emulator.log()
  return proc


def _output(proc) -> str:
  """A failed tool's output and the emulator's errors, for the assertion message."""
  return (f'--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-3000:]}\n'
          f'--- emulator\n{proc.emulator_log[-1500:]}')


def _history_epochs(emulator, model_dir):
  text = emulator.read(f'{model_dir}/history.csv').decode()
  return [row['epoch'] for row in csv.DictReader(io.StringIO(text))]


def _md5(data: bytes) -> str:
  return base64.b64encode(hashlib.md5(data).digest()).decode()


def _temporaries(emulator, prefix):
  return [n for n in emulator.names(prefix) if '.tmp-' in n or '_temp' in n]


@pytest.fixture(scope='module')
def raw_scenes(tmp_path_factory):
  """The smoke_data scenes (24 train / 6 val, 64x48, SegNet layout) on local disk."""
  from tfrecords_builder import synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('gcs_raw') / 'raw'
  synthetic.generate(str(root), 'segnet', {'train': 24, 'val': 6}, (64, 48), seed=5)
  return root


@pytest.fixture(scope='module')
def local_data(raw_scenes):
  """The same scenes built locally, in-process: the reference for the gs:// build."""
  from tfrecords_builder import writer  # pylint: disable=g-import-not-at-top
  output = raw_scenes.parent / 'tfrecords'
  writer.build(str(raw_scenes), str(output), num_shards=NUM_SHARDS, num_workers=1,
               log=lambda *_: None)
  return output


@pytest.fixture(scope='module')
def faulty_gcs():
  """An emulator of its own whose proxy fails FAULT_RATE of the requests."""
  emulator = gcs_harness.start('--bucket', BUCKET, '--fault_rate', str(FAULT_RATE), '--seed', '5')
  # TF backs off 0.1 s doubling, plus up to 1 s of jitter, per failed request: at 10% that would
  # be most of the run's time. Immediate retries go through the same retry paths.
  emulator.set_env('GCS_RETRY_CONFIG_INIT_DELAY_TIME_US', '0')
  yield emulator
  emulator.stop()


@pytest.fixture(scope='module')
def gcs_data(faulty_gcs, raw_scenes):
  """The scenes uploaded to gs://, built into gs:// TFRecords by 2 forked workers."""
  faulty_gcs.upload_tree(raw_scenes, RAW)
  proc = _run(faulty_gcs, 'tfrecords_builder', '--input_dir', RAW, '--output_dir', DATA, *SHARDS,
              '--num_workers', 2)
  assert proc.returncode == 0, _output(proc)
  return proc


@pytest.fixture(scope='module')
def gcs_model(faulty_gcs, gcs_data, tmp_path_factory):
  """A 2-epoch smoke run on gs://, killed -9 after its backup inside epoch 2, then resumed."""
  del gcs_data
  log = tmp_path_factory.mktemp('gcs_model') / 'first_run.log'
  with open(log, 'w') as out:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'trainer.task', *SMOKE, '--data_dir', DATA, '--model_dir', MODEL],
        cwd=REPO, env=faulty_gcs.env, stdout=out, stderr=subprocess.STDOUT)
    # Global step 8: the backup_every_steps=4 backup in the middle of epoch 2 (6 steps each).
    backup = f'{MODEL}/checkpoints/ckpt-8.index'
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not faulty_gcs.exists(backup):
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  first = log.read_text()
  assert proc.returncode == -signal.SIGKILL, f'not killed mid-run:\n{first[-3000:]}'
  epochs_at_kill = _history_epochs(faulty_gcs, MODEL)
  resumed = _run(faulty_gcs, 'trainer.task', *SMOKE, '--data_dir', DATA, '--model_dir', MODEL)
  assert resumed.returncode == 0, _output(resumed)
  return {'first': first, 'epochs_at_kill': epochs_at_kill, 'resumed': resumed}


def test_harness_shims_emulator_gaps(gcs):
  """What TF and create-if-absent writes rely on, checked directly against the emulator."""
  import requests  # pylint: disable=g-import-not-at-top
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  bucket = gcs.client.bucket(BUCKET)
  # Create-if-absent: the second writer of a name loses, and the first one's bytes stay.
  bucket.blob('shims/claim.json').upload_from_string(b'first', if_generation_match=0)
  with pytest.raises(exceptions.PreconditionFailed):
    bucket.blob('shims/claim.json').upload_from_string(b'second', if_generation_match=0)
  assert gcs.read(f'gs://{BUCKET}/shims/claim.json') == b'first'
  generation = bucket.get_blob('shims/claim.json').generation
  bucket.blob('shims/claim.json').upload_from_string(b'third', if_generation_match=generation)
  assert gcs.read(f'gs://{BUCKET}/shims/claim.json') == b'third'
  # Empty media uploads (TF's directory markers) and storageLayout (TF's directory rename).
  base = gcs.exports['STORAGE_EMULATOR_HOST']
  response = requests.post(f'{base}/upload/storage/v1/b/{BUCKET}/o',
                           params={'uploadType': 'media', 'name': 'shims/dir/'}, data=b'',
                           timeout=10)
  assert response.status_code == 200 and response.json()['size'] == '0'
  layout = requests.get(f'{base}/storage/v1/b/{BUCKET}/storageLayout', timeout=10).json()
  assert layout['hierarchicalNamespace'] == {'enabled': False}
  # moveTo (google-cloud-storage's move_blob).
  moved = bucket.move_blob(bucket.blob('shims/claim.json'), 'shims/moved.json')
  assert moved.name == 'shims/moved.json' and not gcs.exists(f'gs://{BUCKET}/shims/claim.json')
  # Only Google's storage hosts are served: nothing is tunnelled anywhere else.
  with pytest.raises(requests.exceptions.ProxyError, match='403'):
    requests.get('https://pypi.org/simple/', proxies={'https': base}, timeout=10)


def test_builder_writes_shards_and_manifest_to_gcs(faulty_gcs, gcs_data, local_data):
  assert '2 worker(s)' in gcs_data.stdout  # Forked workers read and write gs:// too.
  manifest = faulty_gcs.read_json(f'{DATA}/manifest.json')
  assert manifest == json.loads((local_data / 'manifest.json').read_text())
  shards = {b.name.rsplit('/', 1)[-1]: b.md5_hash for b in faulty_gcs.blobs(f'{DATA}/')
            if b.name.endswith('.tfrecord')}
  # Byte-identical to the local build (which tests/test_builder.py verifies in depth): no shard
  # cut short, duplicated or mixed up by a retried request.
  assert shards == {p.name: _md5(p.read_bytes()) for p in local_data.glob('*.tfrecord')}
  names = {n.rsplit('/', 1)[-1] for n in faulty_gcs.names(f'{DATA}/') if not n.endswith('/')}
  assert names == {'manifest.json', *shards}  # No .build/ state or temporaries left behind.


def test_training_resumes_from_the_gcs_backup(faulty_gcs, gcs_model):
  assert gcs_model['epochs_at_kill'] == ['0'], gcs_model['first'][-3000:]
  resumed = gcs_model['resumed'].stdout
  assert f'resumed from {MODEL}/checkpoints/ckpt-' in resumed and 'epoch 1/2' not in resumed
  assert 'epoch 2/2' in resumed
  assert _history_epochs(faulty_gcs, MODEL) == ['0', '1']  # Each epoch exactly once.
  state = faulty_gcs.read(f'{MODEL}/checkpoints/checkpoint').decode()
  # 2 epochs x 6 steps: the span interrupted by the kill was not trained twice.
  assert f'model_checkpoint_path: "ckpt-{2 * STEPS_PER_EPOCH}"' in state


def test_run_outputs_land_on_gcs(faulty_gcs, gcs_model):
  del gcs_model
  config = faulty_gcs.read_json(f'{MODEL}/config.json')
  assert config['data_dir'] == DATA and config['trainer']['epochs'] == 2
  metrics = faulty_gcs.read_json(f'{MODEL}/metrics.json')
  assert metrics['num_examples'] == 6 and metrics['checkpoint'].startswith(f'{MODEL}/best/ckpt-')
  assert faulty_gcs.read_json(f'{MODEL}/export/labels.json')['classes'][3]['name'] == 'Road'
  assert faulty_gcs.exists(f'{MODEL}/export/serving/saved_model.pb')
  assert not _temporaries(faulty_gcs, f'{MODEL}/'), _temporaries(faulty_gcs, f'{MODEL}/')
  # TensorBoard reads its event files straight from the bucket (TF's GCS filesystem).
  with gcs_harness.process_env(faulty_gcs):
    tags = event_tags(f'{MODEL}/logs/val')
  assert {'epoch_loss', 'epoch_mean_iou', 'confusion_matrix', 'iou/Road'} <= tags


def test_evaluate_predict_and_read_the_export_back(faulty_gcs, gcs_model):
  del gcs_model
  report = f'{ROOT}/eval/val.json'
  proc = _run(faulty_gcs, 'trainer.evaluate', '--model_dir', MODEL, '--data_dir', DATA,
              '--split', 'val', '--output', report)
  assert proc.returncode == 0, _output(proc)
  metrics = faulty_gcs.read_json(f'{MODEL}/metrics.json')
  assert faulty_gcs.read_json(report)['confusion_matrix'] == metrics['confusion_matrix']

  predictions = f'{ROOT}/predictions'
  proc = _run(faulty_gcs, 'trainer.predict', '--model_dir', MODEL, '--input', f'{RAW}/val',
              '--output_dir', predictions)
  assert proc.returncode == 0, _output(proc)
  frame = faulty_gcs.names(f'{RAW}/val/')[0].rsplit('/', 1)[-1]
  mask = np.asarray(Image.open(io.BytesIO(
      faulty_gcs.read(f'{predictions}/{frame.rsplit(".", 1)[0]}_mask.png'))))
  assert mask.shape == (48, 64, 3)

  # The export reads back from the bucket in this process too: SavedModel and Keras model.
  import keras  # pylint: disable=g-import-not-at-top
  labels = faulty_gcs.read_json(f'{MODEL}/export/labels.json')
  with gcs_harness.process_env(faulty_gcs):
    serving = tf.saved_model.load(f'{MODEL}/export/serving')
    model = keras.models.load_model(f'{MODEL}/export/model.keras')
  class_ids = serving.signatures['serving_default'](
      image_bytes=tf.constant([faulty_gcs.read(f'{RAW}/val/{frame}')]))['class_ids'][0].numpy()
  colors = np.array([c['color'] for c in labels['classes']], np.uint8)
  np.testing.assert_array_equal(colors[class_ids], mask)  # What predict wrote, pixel for pixel.
  assert model.output_shape[-1] == len(labels['classes'])


def test_faults_were_injected(faulty_gcs, gcs_model):
  del gcs_model
  if not FAULT_RATE:
    pytest.skip('CAMVID_GCS_FAULT_RATE=0')
  stats = faulty_gcs.stats()
  print(f'faults injected: {stats}')
  assert stats['503'] > 0 and stats['drop'] > 0, stats
  assert stats['503'] + stats['drop'] >= FAULT_RATE / 2 * stats['requests'], stats


@pytest.fixture(scope='module')
def clean_data(gcs, local_data):
  """The local build uploaded to the fault-free session emulator."""
  gcs.upload_tree(local_data, DATA)
  return DATA


def _needs_bucket_check():
  from camvid_common import fileio  # pylint: disable=g-import-not-at-top
  if not hasattr(fileio, 'check_bucket'):
    # Without it TF's makedirs on a missing bucket loops forever, and errors are raw HTTP text.
    pytest.skip('needs the up-front bucket check (fileio.check_bucket, issue #5 product change)')
  return fileio


def test_bucket_check_names_the_path_and_the_problem(gcs_process_env, clean_data):
  fileio = _needs_bucket_check()
  from camvid_common import errors  # pylint: disable=g-import-not-at-top
  fileio.check_bucket(clean_data, '--data_dir')  # Exists: no error.
  fileio.check_bucket('/tmp/anything', '--data_dir')  # Local paths are not checked.
  with pytest.raises(
      errors.InputError, match=f'^--model_dir {NO_BUCKET}/m: bucket {NO_BUCKET} does not exist'):
    fileio.check_bucket(f'{NO_BUCKET}/m', '--model_dir')
  with pytest.raises(
      errors.InputError, match=f'^--data_dir gs://{DENIED_BUCKET}/d: permission denied'):
    fileio.check_bucket(f'gs://{DENIED_BUCKET}/d', '--data_dir')


# A missing bucket in each tool's first write: TF's makedirs there would never return. (The
# permission-denied message is checked in-process above, with the same helper every tool calls.)
@pytest.mark.parametrize('module, args, path', [
    ('tfrecords_builder', ('--input_dir', RAW, '--output_dir', f'{NO_BUCKET}/tfrecords'),
     f'{NO_BUCKET}/tfrecords'),
    ('trainer.task', (*SMOKE, '--data_dir', DATA, '--model_dir', f'{NO_BUCKET}/model'),
     f'{NO_BUCKET}/model'),
    ('tuning.tune', (*SMOKE, '--data_dir', DATA, '--output_dir', f'{NO_BUCKET}/tune'),
     f'{NO_BUCKET}/tune'),
])
def test_missing_bucket_is_one_error_line(gcs, clean_data, module, args, path):
  del clean_data
  _needs_bucket_check()
  proc = _run(gcs, module, *args, timeout=120)
  assert proc.returncode == 2, _output(proc)
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and path in errors[0], _output(proc)
  assert f'bucket {NO_BUCKET} does not exist' in errors[0], errors[0]
  assert 'Traceback' not in proc.stderr


def test_tuner_keeps_its_state_on_gcs(gcs, clean_data):
  if not (REPO / 'tuning' / 'tune.py').exists():
    pytest.skip('tuning/tune.py does not exist yet')
  output_dir = f'{ROOT}/tune'
  args = (*SMOKE, '--data_dir', clean_data, '--output_dir', output_dir, '--max_trials', 1,
          '--epochs', 1, '--tuner', 'random')
  proc = _run(gcs, 'tuning.tune', *args)
  assert proc.returncode == 0, _output(proc)
  trials = gcs.read_json(f'{output_dir}/trials.json')
  assert [t['status'] for t in trials] == ['COMPLETED']
  assert set(gcs.read_json(f'{output_dir}/best_hparams.json')) == {'dropout', 'learning_rate'}
  assert gcs.exists(f'{output_dir}/keras_tuner/oracle.json')
  assert gcs.names(f'{output_dir}/tensorboard/trial_')  # HParams runs for TensorBoard.
  # The rerun finds the finished search in the bucket and trains nothing.
  proc = _run(gcs, 'tuning.tune', *args)
  assert proc.returncode == 0, _output(proc)
  assert 'is finished' in proc.stdout and 'epoch 1/1' not in proc.stdout


_EXPORT_SCRIPT = '''
import sys
import keras
from trainer import export, inference, model
keras.utils.set_random_seed(0)
net = model.build_unet(num_classes=2, image_size=(32, 32), base_filters=4, depth=2, dropout=0.0)
for _ in range(int(sys.argv[2])):  # Each export after the first replaces the previous one.
  export.export_model(net, sys.argv[1], inference.Spec(
      class_names=('a', 'b'), class_colors=((0, 0, 0), (255, 255, 255)), image_size=(32, 32)))
'''


def test_export_survives_faults_in_directory_checks_and_nested_copies():
  """Export and re-export to gs:// while the first attempt of every is-directory check and of
  every copy of an object two levels down (serving/'s files) fails; the retries pass.

  Regression: the export used to publish serving/ by a directory rename, which TF (2.21) does
  object by object and, when the is-directory check of its retry hits a transient error, goes on
  to rename the directory as if it were one object and fails with a 404. The 10% random faults
  of faulty_gcs hit that in about one CI run of three; these faults hit it every time.
  """
  emulator = gcs_harness.start('--bucket', BUCKET, '--fault_rate', '1', '--fault_only',
                               r'maxResults=1\b|%2F[^/?]*%2F[^/?]*/rewriteTo/')
  emulator.set_env('GCS_RETRY_CONFIG_INIT_DELAY_TIME_US', '0')  # As in faulty_gcs.
  try:
    export_dir = f'gs://{BUCKET}/faulty-export'
    proc = subprocess.run([sys.executable, '-c', _EXPORT_SCRIPT, export_dir, '2'], cwd=REPO,
                          env=emulator.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = emulator.names(f'{export_dir}/')
    assert 'faulty-export/serving/saved_model.pb' in names, names
    assert emulator.read_json(f'{export_dir}/labels.json')['classes'][1]['name'] == 'b'
    assert not _temporaries(emulator, f'{export_dir}/'), names
    stats = emulator.stats()
    assert stats['503'] + stats['drop'] >= 10, stats
  finally:
    emulator.stop()
