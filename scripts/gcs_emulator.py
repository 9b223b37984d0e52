"""A local Google Cloud Storage on 127.0.0.1 for TensorFlow, google-cloud-storage and the tests.

    python scripts/gcs_emulator.py [--bucket NAME ...] [--port N] [--fault_rate 0.1 --seed 0]
        [--fault_only REGEX] [--deny_bucket NAME ...] [--no_proxy HOST,...] [--log_requests]

Starts the `gcp-storage-emulator` package's server (in memory) and, in front of it, a small
loopback proxy; prints one `export NAME=VALUE` line per environment variable the tools need, then
`READY`, and serves until SIGTERM/SIGINT (or, with --stop_on_stdin_eof, until its stdin closes,
so a test fixture's emulator never outlives the tests).

    python scripts/gcs_emulator.py --bucket my-bucket > /tmp/gcs-emulator.env &
    until grep -qx READY /tmp/gcs-emulator.env; do sleep 0.2; done
    source <(grep '^export ' /tmp/gcs-emulator.env)   # then any tool, with gs://my-bucket/...

Why a proxy: TensorFlow's own GCS filesystem has no endpoint setting; it always talks HTTPS to
www.googleapis.com and storage.googleapis.com. libcurl honours HTTPS_PROXY and CURL_CA_BUNDLE,
so the proxy accepts CONNECT for those hosts, terminates TLS with a leaf certificate signed by a
throwaway CA generated at start (its PEM is CURL_CA_BUNDLE), and forwards plain HTTP to the
emulator. GOOGLE_AUTH_TOKEN_FOR_TESTING makes TF skip OAuth. `google-cloud-storage` talks plain
HTTP to the same port through STORAGE_EMULATOR_HOST, so both clients see the same shims and faults.

What the proxy and the in-process patches fix in the emulator (all harness-side, none in product
code):
  - an upload with an empty body (TF's `makedirs` writes `dir/` markers that way) crashed it;
  - generation/metageneration preconditions (`ifGenerationMatch=0` = create only if absent) were
    ignored; they are now enforced atomically (the emulator serves one request at a time);
  - `GET /b/{bucket}/storageLayout` (asked by TF before a directory rename) was 404;
  - `moveTo` was 501;
  - upload `Location` and `mediaLink` came back as http:// URLs, which would make TF bypass the
    proxy (HTTPS_PROXY covers https only); they keep the scheme the client used;
  - after a failed upload attempt, its status answer claimed one byte received ("Range:
    bytes=0-0") when it held none, so TF resumed at byte 1 and failed;
  - soft delete (on by default) kept a copy of every deleted object in memory; buckets made here
    delete for good, and the unused on-disk metadata file is not rewritten on every request.
The emulator runs in memory because only that mode keeps `dir/` marker objects.

Faults (--fault_rate F): that fraction of object/bucket requests gets a 503 or a dropped
connection before it reaches the emulator, chosen by a hash of (seed, request, occurrence), so a
run is reproducible, and never on the same request twice in a row, so a client's retry succeeds.
--fault_only REGEX limits the faults to requests whose "METHOD host path?query" matches (with
--fault_rate 1, every first attempt of those fails: a deterministic fault in one kind of step).
--deny_bucket NAME answers 403 to every request on that bucket (permission-denied tests).

HTTPS_PROXY also catches gRPC (tf.distribute) and any other HTTPS client: NO_PROXY/no_proxy list
loopback names (add worker host names with --no_proxy), and CONNECT to any host other than the
Google storage hosts is refused, so nothing leaves this machine.
"""

import datetime
import functools
import hashlib
import http
import http.client
import http.server
import ipaddress
import json
import logging
import os
import pathlib
import re
import signal
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from gcp_storage_emulator import server as emu_server
from gcp_storage_emulator import storage as emu_storage
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets as emu_buckets
from gcp_storage_emulator.handlers import objects as emu_objects

# Run as `python scripts/gcs_emulator.py`: the repository root holds camvid_common.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from camvid_common import errors  # pylint: disable=g-import-not-at-top
from camvid_common import quiet  # pylint: disable=g-import-not-at-top

# The hosts TF's GCS filesystem and Google auth libraries talk to.
TLS_HOSTS = ('storage.googleapis.com', 'www.googleapis.com', 'oauth2.googleapis.com')
FAKE_TOKEN = 'emulator-fake-token'
LOOPBACK_NAMES = ('127.0.0.1', 'localhost', '::1')
# Connections idle longer than this are closed, so threads of pooled keep-alive connections end.
IDLE_TIMEOUT_SECONDS = 120
HOP_BY_HOP = {'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'te',
              'trailer', 'transfer-encoding', 'upgrade', 'expect', 'content-length',
              'proxy-connection'}
STATS_PATH = '/_harness/stats'
PRECONDITIONS = ('ifGenerationMatch', 'ifGenerationNotMatch', 'ifMetagenerationMatch',
                 'ifMetagenerationNotMatch')


# --- Certificates -------------------------------------------------------------------------------

def make_certificates(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """Writes a throwaway CA and a leaf for the Google storage hosts; returns (ca, cert, key) paths.

  EC P-256 keys: generated in milliseconds, and accepted by libcurl's OpenSSL and Python's ssl.
  """
  now = datetime.datetime.now(datetime.timezone.utc)
  start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'camvid-seg GCS emulator CA')])
  ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
  ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
             .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                          crl_sign=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
             .add_extension(ca_ski, critical=False)
             .sign(ca_key, hashes.SHA256()))
  key = ec.generate_private_key(ec.SECP256R1())
  names = [x509.DNSName(h) for h in (*TLS_HOSTS, 'localhost')]
  names.append(x509.IPAddress(ipaddress.ip_address('127.0.0.1')))
  cert = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_HOSTS[0])]))
          .issuer_name(ca_name).public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.SubjectAlternativeName(names), critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                         critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
  ca_path, cert_path, key_path = (directory / 'ca.pem', directory / 'cert.pem',
                                  directory / 'key.pem')
  ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
  cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
  return ca_path, cert_path, key_path


# --- Emulator patches ---------------------------------------------------------------------------

def _error(response, status: int, reason: str, message: str) -> None:
  response.status = http.HTTPStatus(status)
  response.json({'error': {'code': status, 'message': message,
                           'errors': [{'domain': 'global', 'reason': reason,
                                       'message': message}]}})


def _current(storage, bucket: str, name: str | None) -> dict | None:
  if name is None:
    return None
  return storage.objects.get(bucket, {}).get(name)


def _failed_condition(query: dict, obj: dict | None, prefix: str = '') -> str | None:
  """The first GCS precondition parameter (`if...`, or `ifSource...`) that `obj` fails, or None."""
  generation = int(obj['generation']) if obj else 0  # 0 means "does not exist" to GCS.
  metageneration = obj.get('metageneration') if obj else None
  for name in PRECONDITIONS:
    key = f'if{prefix}{name[2:]}'
    if key not in query:
      continue
    value = query[key][0]
    if name == 'ifGenerationMatch':
      failed = int(value) != generation
    elif name == 'ifGenerationNotMatch':
      failed = int(value) == generation
    elif name == 'ifMetagenerationMatch':
      failed = obj is None or str(value) != str(metageneration)
    else:
      failed = obj is not None and str(value) == str(metageneration)
    if failed:
      return key
  return None


class EmulatorShims:
  """Wraps the emulator's route handlers; one instance per process (it patches module state)."""

  def __init__(self):
    # upload_id -> query of the request that opened a resumable upload: its preconditions hold
    # for the whole upload, which the emulator only sees by upload_id afterwards.
    self._sessions = {}

  def install(self) -> None:
    # In memory, the JSON metadata snapshot rewritten after every change is never read back.
    # pylint: disable-next=protected-access
    emu_storage.Storage._write_config_to_file = lambda self: None
    api = r'^/storage/v1/b/(?P<bucket_name>[-.\w]+)'
    extra = (
        (api + r'/storageLayout$', {'GET': self._storage_layout}),
        (api + r'/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$',
         {'POST': self._move}),
    )
    emu_server.HANDLERS = extra + tuple(
        (regex, {method: self.wrap(fn) for method, fn in handlers.items()})
        for regex, handlers in emu_server.HANDLERS)
    # Router.handle falls back to objects.insert by name for uploads posted without /upload.
    emu_objects.insert = self.wrap(emu_objects.insert)

  def wrap(self, fn):
    @functools.wraps(fn)
    def handler(request, response, storage):
      if request.get_header('X-Forwarded-Proto') == 'https':
        # Upload Locations and mediaLinks are built from this; http:// would bypass the proxy.
        # pylint: disable=protected-access
        request._base_url = 'https://' + request._base_url.split('://', 1)[1]
        request._full_url = 'https://' + request._full_url.split('://', 1)[1]
      data = request.data  # Read (and cache) the body before anything answers early.
      if request.query.get('uploadType') == ['media'] and not data:
        request._data = b''  # pylint: disable=protected-access
      if not self._preconditions_hold(fn.__name__, request, response, storage):
        return None
      result = fn(request, response, storage)
      if fn.__name__ == 'upload_partial':
        upload_id = request.query['upload_id'][0]
        if response.status == 308 and storage.get_resumable_byte_count(upload_id) == 0:
          # GCS sends no Range header while it holds no byte of the upload; the emulator's
          # "bytes=0-0" would make a client resume at byte 1 after a failed first attempt.
          response._headers.pop('Range', None)  # pylint: disable=protected-access
        elif response.status == 200:
          self._sessions.pop(upload_id, None)
      if fn.__name__ == 'insert' and request.query.get('uploadType') == ['resumable']:
        location = response._headers.get('Location', '')  # pylint: disable=protected-access
        upload_id = urllib.parse.parse_qs(urllib.parse.urlparse(location).query).get('upload_id')
        if upload_id:
          self._sessions[upload_id[0]] = request.query
      return result
    return handler

  def _preconditions_hold(self, name, request, response, storage) -> bool:
    query = request.query
    params = request.params or {}
    bucket = params.get('bucket_name')
    checks = []  # (query, object or None, '' or 'Source')
    if name == 'insert':
      data = request.data if isinstance(request.data, dict) else {}
      target = (query.get('name', [None])[0] or (data.get('meta') or {}).get('name')
                or data.get('name'))
      checks.append((query, _current(storage, bucket, target), ''))
    elif name == 'upload_partial':
      upload_id = query.get('upload_id', [None])[0]
      session = storage.resumable.get(upload_id)
      if session is not None and upload_id in self._sessions:
        checks.append((self._sessions[upload_id],
                       _current(storage, session['bucket'], session['name']), ''))
    elif name in ('copy', 'rewrite'):
      checks.append((query, _current(storage, params['dest_bucket_name'],
                                     params['dest_object_id']), ''))
      checks.append((query, _current(storage, bucket, params['object_id']), 'Source'))
    elif name == 'compose':
      checks.append((query, _current(storage, bucket, params['object_id']), ''))
    elif name in ('get', 'download', 'delete', 'patch') and 'object_id' in params:
      checks.append((query, _current(storage, bucket, params['object_id']), ''))
    for check_query, obj, prefix in checks:
      failed = _failed_condition(check_query, obj, prefix)
      if failed is None:
        continue
      if name in ('get', 'download', 'delete', 'patch') and obj is None:
        return True  # The handler answers 404, as GCS does for a missing object.
      if name in ('get', 'download') and 'NotMatch' in failed:
        response.status = http.HTTPStatus.NOT_MODIFIED
      else:
        _error(response, 412, 'conditionNotMet',
               'At least one of the pre-conditions you specified did not hold.')
      return False
    return True

  def _storage_layout(self, request, response, storage):
    bucket = request.params['bucket_name']
    if storage.get_bucket(bucket) is None:
      _error(response, 404, 'notFound', 'The specified bucket does not exist.')
      return
    # A flat (non-hierarchical) bucket: TF then renames a directory object by object.
    response.json({'kind': 'storage#storageLayout', 'bucket': bucket, 'location': 'US',
                   'locationType': 'multi-region',
                   'hierarchicalNamespace': {'enabled': False}})

  def _move(self, request, response, storage):
    params, query = request.params, request.query
    bucket, source, dest = params['bucket_name'], params['object_id'], params['dest_object_id']
    if (_failed_condition(query, _current(storage, bucket, dest)) or
        _failed_condition(query, _current(storage, bucket, source), 'Source')):
      _error(response, 412, 'conditionNotMet',
             'At least one of the pre-conditions you specified did not hold.')
      return
    try:
      # pylint: disable=protected-access
      moved = emu_objects._copy(request.base_url, storage, bucket, source, bucket, dest)
      storage._hard_delete_file(bucket, source)
    except NotFound:
      _error(response, 404, 'notFound', f'No such object: {bucket}/{source}')
      return
    response.json(moved)


def start_emulator(buckets: list[str]):
  """Starts the patched emulator on a free loopback port; returns (server, port)."""
  EmulatorShims().install()
  # Headers and body go out in separate writes: with Nagle's algorithm each response would wait
  # for a delayed ACK (40 ms on Linux).
  emu_server.RequestHandler.disable_nagle_algorithm = True
  server = emu_server.create_server('127.0.0.1', 0, in_memory=True)
  server.start()
  for name in buckets:
    emu_buckets.create_bucket(name, server._storage)  # pylint: disable=protected-access
    # Hard deletes: soft-deleted copies of every replaced checkpoint would only fill memory.
    server._storage.buckets[name]['softDeletePolicy'] = {  # pylint: disable=protected-access
        'retentionDurationSeconds': '0'}
  port = server._api._httpd.server_address[1]  # pylint: disable=protected-access
  return server, port


# --- The proxy ----------------------------------------------------------------------------------

class Faults:
  """Decides which requests fail: a deterministic hash of (seed, request, occurrence)."""

  def __init__(self, rate: float, seed: int, only: re.Pattern | None = None):
    self.rate, self.seed = rate, seed
    self._only = only  # Requests it may fail; None = all.
    self._lock = threading.Lock()
    self._seen = {}  # request key -> occurrences so far
    self._failed_last = set()  # keys whose previous occurrence failed
    self.counts = {'requests': 0, '503': 0, 'drop': 0}

  def snapshot(self) -> dict:
    with self._lock:
      return dict(self.counts)

  def decide(self, key: str) -> str | None:
    """Returns None (pass), '503' or 'drop'."""
    with self._lock:
      self.counts['requests'] += 1
      if self.rate <= 0 or (self._only and not self._only.search(key)):
        return None
      if len(self._seen) > 200_000:  # Bounded memory on a long-lived server.
        self._seen.clear()
      occurrence = self._seen.get(key, 0)
      self._seen[key] = occurrence + 1
      if key in self._failed_last:
        self._failed_last.discard(key)  # The retry of a failed request always passes.
        return None
      digest = hashlib.sha256(f'{self.seed}|{key}|{occurrence}'.encode()).digest()
      if int.from_bytes(digest[:8], 'big') / 2**64 >= self.rate:  # Never, at rate 1.
        return None
      self._failed_last.add(key)
      kind = '503' if digest[8] % 2 else 'drop'
      self.counts[kind] += 1
      return kind


def _bucket_of(path: str) -> str | None:
  """The bucket a JSON API, upload, download or path-style XML request names."""
  parts = [p for p in path.split('?', 1)[0].split('/') if p]
  for i, part in enumerate(parts[:-1]):
    if part == 'b' and (i == 0 or parts[i - 1] == 'v1'):
      return urllib.parse.unquote(parts[i + 1])
  if parts and parts[0] not in ('storage', 'upload', 'download', 'batch', 'b', '_harness'):
    return urllib.parse.unquote(parts[0])  # storage.googleapis.com/BUCKET/OBJECT
  return None


class ProxyServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True  # Never waits for idle keep-alive connections on shutdown.
  allow_reuse_address = True

  def __init__(self, address, emulator_port: int, ssl_context: ssl.SSLContext, faults: Faults,
               denied: set[str], log_requests: bool):
    if ':' in address[0]:
      self.address_family = socket.AF_INET6  # --host ::1
    super().__init__(address, ProxyHandler)
    self.emulator_port, self.ssl_context = emulator_port, ssl_context
    self.faults, self.denied, self.log_requests = faults, denied, log_requests


class ProxyHandler(http.server.BaseHTTPRequestHandler):
  """CONNECT + TLS termination for TF, plain HTTP for google-cloud-storage, both forwarded."""

  protocol_version = 'HTTP/1.1'  # Keep-alive for clients that reuse connections (requests).
  timeout = IDLE_TIMEOUT_SECONDS
  disable_nagle_algorithm = True  # See start_emulator: no 40 ms stalls per response.
  server: ProxyServer
  tls_host = None

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    if self.server.log_requests:
      sys.stderr.write(f'[gcs-proxy] {self.tls_host or "http"} {format % args}\n')

  def do_CONNECT(self):  # pylint: disable=invalid-name
    host = self.path.rsplit(':', 1)[0]
    if host not in TLS_HOSTS:
      # Only Google storage hosts are emulated; anything else would leave this machine.
      self.send_error(403, f'this proxy only serves {", ".join(TLS_HOSTS)}')
      return
    self.send_response(200, 'Connection Established')
    self.end_headers()
    try:
      tls = self.server.ssl_context.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError) as e:
      self.log_message('TLS handshake failed: %s', e)
      self.close_connection = True
      return
    self.connection, self.tls_host = tls, host
    self.rfile = tls.makefile('rb', self.rbufsize)
    self.wfile = socketserver._SocketWriter(tls)  # pylint: disable=protected-access
    self.close_connection = False
    try:
      while not self.close_connection:
        self.handle_one_request()
    finally:
      self.close_connection = True

  def _read_body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      body = bytearray()
      while True:
        size = int(self.rfile.readline().split(b';', 1)[0].strip() or b'0', 16)
        if size == 0:
          while self.rfile.readline().strip():  # Trailers, then the blank line.
            pass
          return bytes(body)
        body += self.rfile.read(size)
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get('Content-Length') or 0))

  def _send(self, status: int, body: bytes, headers=()) -> None:
    self.send_response(status)
    for name, value in headers:
      self.send_header(name, value)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _forward(self):
    body = self._read_body()
    target = self.path
    if '://' in target:  # Absolute form, from a client using us as a plain HTTP proxy.
      parsed = urllib.parse.urlsplit(target)
      target = parsed.path + (f'?{parsed.query}' if parsed.query else '')
    if target.split('?', 1)[0] == STATS_PATH and not self.tls_host:
      # Harness-only (plain HTTP, never faulted): what was injected so far, for tests to check.
      self._send(200, json.dumps(self.server.faults.snapshot()).encode(),
                 [('Content-Type', 'application/json')])
      return
    bucket = _bucket_of(target)
    if bucket is not None and bucket in self.server.denied:
      message = (f'caller does not have storage.objects.get access to the Google Cloud Storage '
                 f'bucket {bucket}. Permission denied on resource (or it may not exist).')
      self._send(403, json.dumps({'error': {'code': 403, 'message': message, 'errors': [
          {'domain': 'global', 'reason': 'forbidden', 'message': message}]}}).encode(),
                 [('Content-Type', 'application/json')])
      return
    if bucket is not None:
      fault = self.server.faults.decide(f'{self.command} {self.tls_host} {target}')
      if fault == 'drop':
        self.log_message('fault: dropped %s %s', self.command, target)
        self.close_connection = True
        try:
          self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass
        return
      if fault == '503':
        self.log_message('fault: 503 for %s %s', self.command, target)
        self._send(503, b'{"error": {"code": 503, "message": "Service Unavailable (injected)"}}',
                   [('Content-Type', 'application/json')])
        return
    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
    headers['X-Forwarded-Proto'] = 'https' if self.tls_host else 'http'
    connection = http.client.HTTPConnection('127.0.0.1', self.server.emulator_port, timeout=300)
    try:
      connection.connect()
      connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      connection.request(self.command, target, body=body, headers=headers)
      response = connection.getresponse()
      data = response.read()
    except (OSError, http.client.HTTPException) as e:
      # The emulator failed on this request (a gap not shimmed yet): a 500 names it, which
      # clients retry and tests report, instead of a hung connection.
      self.log_message('emulator failed on %s %s: %r', self.command, target, e)
      self._send(500, json.dumps({'error': {'code': 500, 'message': f'emulator: {e!r}'}}).encode(),
                 [('Content-Type', 'application/json')])
      return
    finally:
      connection.close()
    self._send(response.status, data,
               [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP])

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward


# --- Main ---------------------------------------------------------------------------------------

def _parse_args(argv):
  parser = errors.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  parser.add_argument('--bucket', action='append', default=[], help='Create this bucket.')
  parser.add_argument('--host', default='127.0.0.1', help='Loopback address to listen on.')
  parser.add_argument('--port', type=int, default=0, help='Proxy port (default: a free one).')
  parser.add_argument('--fault_rate', type=float, default=0.0,
                      help='Fraction of requests answered by a 503 or a dropped connection.')
  parser.add_argument('--seed', type=int, default=0, help='Seed of the fault choice.')
  parser.add_argument('--fault_only', default=None,
                      help='Fault only requests matching this regex ("METHOD host path?query").')
  parser.add_argument('--deny_bucket', action='append', default=[],
                      help='Answer 403 to every request on this bucket.')
  parser.add_argument('--no_proxy', default='',
                      help='More comma-separated hosts to keep off the proxy (worker names).')
  parser.add_argument('--log_requests', action='store_true', help='Log each request to stderr.')
  parser.add_argument('--stop_on_stdin_eof', action='store_true',
                      help='Exit when stdin closes (a test fixture that dies takes us along).')
  quiet.add_argument(parser, "Keep the emulator library's warning per response.")
  args = parser.parse_args(argv)
  try:
    loopback = ipaddress.ip_address(args.host).is_loopback
  except ValueError:
    loopback = False
  if not loopback:
    parser.error(f'--host {args.host}: must be a loopback IP address')
  if not 0.0 <= args.fault_rate <= 1.0:
    parser.error(f'--fault_rate {args.fault_rate}: must be in [0, 1]')
  if args.fault_only:
    try:
      args.fault_only = re.compile(args.fault_only)
    except re.error as e:
      parser.error(f'--fault_only {args.fault_only!r}: not a regular expression ({e})')
  return args


def environment(host: str, port: int, ca_path: pathlib.Path,
                extra_no_proxy: str = '') -> dict[str, str]:
  """What every tool needs to reach this emulator instead of Google."""
  proxy = f'http://{f"[{host}]" if ":" in host else host}:{port}'
  # Loopback, the hosts asked for, and whatever the caller's NO_PROXY already kept direct.
  names = [*LOOPBACK_NAMES, *extra_no_proxy.split(','), *os.environ.get('NO_PROXY', '').split(',')]
  no_proxy = ','.join(dict.fromkeys(n.strip() for n in names if n.strip()))
  return {
      # google-cloud-storage: plain HTTP straight to the proxy's port (anonymous credentials).
      'STORAGE_EMULATOR_HOST': proxy,
      # TensorFlow's libcurl: CONNECT through us, trusting our CA, with a fake OAuth token.
      'HTTPS_PROXY': proxy, 'https_proxy': proxy,
      'CURL_CA_BUNDLE': str(ca_path),
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': FAKE_TOKEN,
      # gRPC (tf.distribute) honours https_proxy too: keep loopback and worker hosts direct.
      'NO_PROXY': no_proxy, 'no_proxy': no_proxy,
  }


def main(argv=None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  if not args.verbose:  # The emulator logs every response as a warning; errors still show.
    for name in ('gcp_storage_emulator', 'api.object', 'api.bucket'):
      logging.getLogger(name).setLevel(logging.ERROR)
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  signal.signal(signal.SIGINT, lambda *_: stop.set())
  with tempfile.TemporaryDirectory(prefix='gcs-emulator-') as tmp:
    ca_path, cert_path, key_path = make_certificates(pathlib.Path(tmp))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    emulator, emulator_port = start_emulator(args.bucket)
    proxy = ProxyServer((args.host, args.port), emulator_port, context,
                        Faults(args.fault_rate, args.seed, args.fault_only), set(args.deny_bucket),
                        args.log_requests)
    threading.Thread(target=proxy.serve_forever, name='gcs-proxy', daemon=True).start()
    for name, value in environment(args.host, proxy.server_address[1], ca_path,
                                   args.no_proxy).items():
      print(f'export {name}={value}')
    print('READY', flush=True)
    if args.stop_on_stdin_eof:
      def watch_stdin():
        # The raw descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader
        # aborts the interpreter's shutdown.
        while os.read(sys.stdin.fileno(), 4096):
          pass
        stop.set()
      threading.Thread(target=watch_stdin, daemon=True).start()
    stop.wait()
    proxy.shutdown()
    proxy.server_close()
    emulator.stop()
    counts = proxy.faults.counts
    print(f'gcs emulator: {counts["requests"]} requests, {counts["503"]} injected 503s, '
          f'{counts["drop"]} dropped connections', file=sys.stderr)
  return 0


if __name__ == '__main__':
  errors.run_script(main)
