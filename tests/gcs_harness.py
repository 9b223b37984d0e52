"""Google Cloud Storage for tests: the loopback emulator of scripts/gcs_emulator.py as fixtures.

`gcs` (session-scoped) starts `python scripts/gcs_emulator.py --bucket test-bucket` once, reads
its `export` lines until READY, and stops it at the end of the session. Tools under test run as
subprocesses with `gcs.env` (the current environment plus those exports); the test process itself
checks results with google-cloud-storage (no TF stat cache between a writer and the check), and
`gcs_process_env` puts the exports into this process's environment for tests that read gs:// with
TensorFlow or Keras in-process.

Import the fixtures into a test module by name (`from gcs_harness import gcs, gcs_process_env`);
`start(*flags)` starts another emulator (e.g. with `--fault_rate`), which the caller stops.
"""

import contextlib
import json
import os
import pathlib
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'gcs_emulator.py'
BUCKET = 'test-bucket'
DENIED_BUCKET = 'denied-bucket'  # Exists, but every request on it is answered 403.
START_TIMEOUT_SECONDS = 60


class Emulator:
  """A running scripts/gcs_emulator.py process and what clients need to reach it."""

  def __init__(self, *args: str):
    self._log = tempfile.NamedTemporaryFile(prefix='gcs-emulator-', suffix='.log', delete=False)
    # stdin stays open and unused: if this process dies, the emulator sees EOF and exits.
    self.process = subprocess.Popen(
        [sys.executable, str(SCRIPT), '--stop_on_stdin_eof', *args], cwd=REPO,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
    self.exports = self._read_exports()
    self.env = {**os.environ, **self.exports}
    self._client = None

  def _read_exports(self) -> dict[str, str]:
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout],
                     daemon=True).start()
    exports, deadline = {}, time.time() + START_TIMEOUT_SECONDS
    while time.time() < deadline:
      try:
        line = lines.get(timeout=0.5).rstrip('\n')
      except queue.Empty:
        if self.process.poll() is not None:
          break
        continue
      if line == 'READY':
        return exports
      if line.startswith('export '):
        name, value = line[len('export '):].split('=', 1)
        exports[name] = value
    self.stop()
    raise RuntimeError(f'{SCRIPT} did not print READY within {START_TIMEOUT_SECONDS} s:\n'
                       + self.log()[-3000:])

  def log(self) -> str:
    """What the emulator printed on stderr (its errors; every request with --log_requests)."""
    path = pathlib.Path(self._log.name)
    return path.read_text(errors='replace') if path.exists() else ''

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    for stream in (self.process.stdin, self.process.stdout):
      if stream:
        stream.close()
    self._log.close()
    pathlib.Path(self._log.name).unlink(missing_ok=True)

  @property
  def retry(self):
    """google-cloud-storage's default retry policy with short waits (the faults are injected)."""
    from google.cloud.storage.retry import DEFAULT_RETRY  # pylint: disable=import-outside-toplevel
    return DEFAULT_RETRY.with_delay(initial=0.05, maximum=0.5)

  def set_env(self, name: str, value: str) -> None:
    """Adds a variable to what the tools (and process_env) get."""
    self.exports[name] = value
    self.env[name] = value

  @property
  def client(self):
    """A google-cloud-storage client of this emulator (anonymous, as STORAGE_EMULATOR_HOST)."""
    if self._client is None:
      # pylint: disable=import-outside-toplevel
      from google.auth.credentials import AnonymousCredentials
      from google.cloud import storage
      self._client = storage.Client(
          project='test', credentials=AnonymousCredentials(),
          client_options={'api_endpoint': self.exports['STORAGE_EMULATOR_HOST']})
    return self._client

  def stats(self) -> dict:
    """Requests seen and faults injected so far (the proxy's harness-only endpoint)."""
    url = self.exports['STORAGE_EMULATOR_HOST'] + '/_harness/stats'
    with urllib.request.urlopen(url, timeout=10) as response:
      return json.load(response)

  # gs:// helpers; paths are 'gs://bucket/name'.

  @staticmethod
  def split(path: str) -> tuple[str, str]:
    assert path.startswith('gs://'), path
    bucket, _, name = path[len('gs://'):].partition('/')
    return bucket, name

  def names(self, prefix: str) -> list[str]:
    """Object names (without gs://bucket/) under a gs:// prefix, sorted."""
    bucket, name = self.split(prefix)
    return sorted(b.name for b in self.client.list_blobs(bucket, prefix=name, retry=self.retry))

  def blobs(self, prefix: str) -> list:
    """Object resources (name, size, md5_hash, ...) under a gs:// prefix."""
    bucket, name = self.split(prefix)
    return list(self.client.list_blobs(bucket, prefix=name, retry=self.retry))

  def exists(self, path: str) -> bool:
    bucket, name = self.split(path)
    return self.client.bucket(bucket).blob(name).exists(retry=self.retry)

  def read(self, path: str) -> bytes:
    bucket, name = self.split(path)
    return self.client.bucket(bucket).blob(name).download_as_bytes(retry=self.retry)

  def read_json(self, path: str):
    return json.loads(self.read(path))

  def upload_tree(self, local_dir: pathlib.Path, prefix: str) -> int:
    """Copies every file under local_dir to the gs:// prefix; returns the count."""
    bucket, name = self.split(prefix.rstrip('/') + '/')
    count = 0
    for path in sorted(pathlib.Path(local_dir).rglob('*')):
      if path.is_file():
        blob = self.client.bucket(bucket).blob(name + path.relative_to(local_dir).as_posix())
        # Create-if-absent makes a retried upload safe (the emulator enforces preconditions).
        blob.upload_from_filename(str(path), if_generation_match=0, retry=self.retry)
        count += 1
    return count


def _require_emulator_package() -> None:
  try:
    import gcp_storage_emulator  # pylint: disable=import-outside-toplevel,unused-import
    import cryptography  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    message = f'{e.name} is not installed: pip install -e ".[test]"'
    if os.environ.get('CI'):
      pytest.fail(message)  # CI installs the test extra; a missing package is a real failure.
    pytest.skip(message)


def start(*args: str) -> Emulator:
  _require_emulator_package()
  return Emulator(*args)


@pytest.fixture(scope='session')
def gcs():
  """The emulator with `test-bucket` (and `denied-bucket`, always answered 403)."""
  emulator = start('--bucket', BUCKET, '--bucket', DENIED_BUCKET, '--deny_bucket', DENIED_BUCKET)
  yield emulator
  emulator.stop()


@contextlib.contextmanager
def process_env(emulator: Emulator):
  """The emulator's exports in os.environ (TF and libcurl read them per request), then restored."""
  with pytest.MonkeyPatch.context() as patch:
    for name, value in emulator.exports.items():
      patch.setenv(name, value)
    yield


@pytest.fixture
def gcs_process_env(gcs):
  with process_env(gcs):
    yield gcs
