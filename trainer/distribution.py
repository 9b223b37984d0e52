"""Distribution: strategy choice, TF_CONFIG (including from Kubernetes Indexed Jobs), worker roles,
mixed precision, and where each worker may write.

The only module that knows about TF_CONFIG and worker roles; the rest asks `Runtime.is_chief`.
"""

import dataclasses
import json
import os
import select
import signal

import keras
import tensorflow as tf

from camvid_common import errors

DEFAULT_WORKER_PORT = 2222


@dataclasses.dataclass
class Runtime:
  """The strategy a run uses and this process's place in the cluster."""
  strategy: tf.distribute.Strategy
  kind: str  # default | mirrored | multi_worker
  is_chief: bool
  worker_index: int
  num_workers: int
  precision: str  # float32 | mixed_float16 | mixed_bfloat16

  @property
  def num_replicas(self) -> int:
    return self.strategy.num_replicas_in_sync

  def describe(self) -> str:
    return (f'strategy={self.kind} replicas={self.num_replicas} workers={self.num_workers} '
            f'worker_index={self.worker_index} chief={self.is_chief} precision={self.precision}')


def tf_config_from_env(env=os.environ) -> dict | None:
  """Returns the cluster spec from TF_CONFIG, or built from a Kubernetes Indexed Job's env.

  Indexed Jobs set JOB_COMPLETION_INDEX but not TF_CONFIG; with CAMVID_NUM_WORKERS > 1 the worker
  addresses are the pods' stable names behind the headless Service:
  `<CAMVID_JOB_NAME>-<i>.<CAMVID_SERVICE_NAME>:<CAMVID_WORKER_PORT>`; worker 0 is the chief.
  """
  if env.get('TF_CONFIG'):
    try:
      spec = json.loads(env['TF_CONFIG'])
    except json.JSONDecodeError as e:
      raise errors.ConfigError(f'TF_CONFIG: not valid JSON ({e})') from None
    _validate_tf_config(spec)
    return spec
  if 'JOB_COMPLETION_INDEX' in env and int(env.get('CAMVID_NUM_WORKERS', '1') or 1) > 1:
    try:
      index, num_workers = int(env['JOB_COMPLETION_INDEX']), int(env['CAMVID_NUM_WORKERS'])
    except ValueError:
      raise errors.ConfigError(
          'JOB_COMPLETION_INDEX and CAMVID_NUM_WORKERS must be integers') from None
    missing = [k for k in ('CAMVID_JOB_NAME', 'CAMVID_SERVICE_NAME') if not env.get(k)]
    if missing:
      raise errors.ConfigError(f'{", ".join(missing)}: required to address the other workers of an '
                               'Indexed Job (see docs/distributed.md, "Kubernetes Indexed Jobs")')
    port = int(env.get('CAMVID_WORKER_PORT', DEFAULT_WORKER_PORT))
    hosts = [f'{env["CAMVID_JOB_NAME"]}-{i}.{env["CAMVID_SERVICE_NAME"]}:{port}'
             for i in range(num_workers)]
    spec = {'cluster': {'worker': hosts}, 'task': {'type': 'worker', 'index': index}}
    _validate_tf_config(spec)
    return spec
  return None


def _validate_tf_config(spec) -> None:
  if not isinstance(spec, dict) or not isinstance(spec.get('cluster'), dict):
    raise errors.ConfigError('TF_CONFIG: needs a "cluster" object')
  cluster, task = spec['cluster'], spec.get('task')
  if not cluster.get('worker') and not cluster.get('chief'):
    raise errors.ConfigError('TF_CONFIG: cluster has neither "chief" nor "worker" tasks')
  for role, hosts in cluster.items():
    if not isinstance(hosts, list) or not all(isinstance(h, str) and ':' in h for h in hosts):
      raise errors.ConfigError(f'TF_CONFIG: cluster "{role}" must be a list of "host:port" strings')
  if not isinstance(task, dict) or task.get('type') not in cluster:
    raise errors.ConfigError(f'TF_CONFIG: task type {task and task.get("type")!r} is not in the '
                             f'cluster ({", ".join(cluster)})')
  index = task.get('index')
  if not isinstance(index, int) or not 0 <= index < len(cluster[task['type']]):
    raise errors.ConfigError(f'TF_CONFIG: task index {index!r} is out of range for '
                             f'{len(cluster[task["type"]])} "{task["type"]}" tasks')


def _num_tasks(spec: dict | None) -> int:
  return 0 if spec is None else sum(len(h) for h in spec['cluster'].values()
                                    if isinstance(h, list))


def configure_logical_cpus(count: int) -> None:
  """Splits the CPU into `count` logical devices (exercises multi-replica paths on CPU)."""
  if count > 1:
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def choose_precision(mode: str) -> str:
  """auto: bf16 on GPUs with fast bf16 (compute capability >= 8.0), fp16 on older, fp32 on CPU."""
  if mode != 'auto':
    return mode
  gpus = tf.config.list_physical_devices('GPU')
  if not gpus:
    return 'float32'
  capability = tf.config.experimental.get_device_details(gpus[0]).get('compute_capability',
                                                                      (0, 0))
  return 'mixed_bfloat16' if capability >= (8, 0) else 'mixed_float16'


def create_runtime(kind: str = 'auto', precision: str = 'auto', timeout_seconds: int = 300,
                   formation_timeout_seconds: int | None = None) -> Runtime:
  """Chooses and creates the strategy (call once, before building any model).

  Collectives fail after `timeout_seconds`; forming a multi-worker cluster after
  `formation_timeout_seconds` (default: the same).
  """
  formation = formation_timeout_seconds or timeout_seconds
  spec = tf_config_from_env()
  if kind == 'auto':
    if _num_tasks(spec) > 1:
      kind = 'multi_worker'
    elif len(tf.config.list_logical_devices('GPU')) > 1:
      kind = 'mirrored'
    else:
      kind = 'default'
  precision = choose_precision(precision)
  keras.mixed_precision.set_global_policy(precision)
  if kind == 'multi_worker':
    if spec is None:
      raise errors.ConfigError(
          '--strategy multi_worker: needs TF_CONFIG or an Indexed Job environment')
    os.environ['TF_CONFIG'] = json.dumps(spec)
    # Collectives (every all-reduce) fail after the timeout instead of waiting for a dead peer.
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
    peers = ', '.join(h for hosts in spec['cluster'].values() for h in hosts)
    strategy = _bounded(
        formation,
        f'worker {spec["task"]["type"]}:{spec["task"]["index"]} could not form the cluster with '
        f'{peers} within {formation} s (peers down, wrong host names or a firewall); '
        'exiting so the Job can restart the worker',
        lambda: tf.distribute.MultiWorkerMirroredStrategy(communication_options=options))
    resolver = strategy.cluster_resolver
    task_type, index = resolver.task_type, resolver.task_id
    is_chief = _is_chief(spec, task_type, index)
    num_workers = _num_tasks(spec)
  else:
    if kind == 'mirrored':
      devices = (tf.config.list_logical_devices('GPU') or
                 tf.config.list_logical_devices('CPU'))
      strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    elif kind == 'default':
      strategy = tf.distribute.get_strategy()
    else:
      raise errors.ConfigError(f'--strategy {kind}: unknown')
    is_chief, index, num_workers = True, 0, 1
  runtime = Runtime(strategy=strategy, kind=kind, is_chief=is_chief, worker_index=index,
                    num_workers=num_workers, precision=precision)
  return runtime


def _is_chief(spec: dict, task_type: str, index: int) -> bool:
  return task_type == 'chief' or (task_type == 'worker' and index == 0 and
                                  'chief' not in spec['cluster'])


def role_from_env(kind: str = 'auto') -> tuple[bool, str]:
  """(is this process the chief, its name) from TF_CONFIG or the Indexed Job env alone.

  What create_runtime would decide, without creating a strategy or contacting any peer: a
  process whose run is already trained must not wait for peers that have finished and gone.
  """
  spec = tf_config_from_env()
  if spec is None or kind not in ('auto', 'multi_worker') or _num_tasks(spec) < 2:
    return True, 'worker 0'
  task_type, index = spec['task']['type'], spec['task']['index']
  return _is_chief(spec, task_type, index), f'worker {task_type}:{index}'


def _bounded(seconds: int, message: str, fn):
  """Runs fn(); if it has not returned after `seconds`, prints `message` and kills the process.

  Creating MultiWorkerMirroredStrategy blocks in C++ until every peer has registered, with no
  deadline a caller can set, and it holds the GIL, so no Python thread or signal handler can
  interrupt it. A forked watchdog process (it runs no TensorFlow) is the one reliable bound.
  """
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], seconds)
    if not ready:
      os.write(2, f'error: {message}\n'.encode())
      os.kill(os.getppid(), signal.SIGKILL)
    os._exit(0)  # pylint: disable=protected-access
  os.close(read_end)
  try:
    return fn()
  finally:
    os.close(write_end)  # Wakes the watchdog, which exits quietly.
    os.waitpid(pid, 0)


def write_dir(path: str, runtime: Runtime) -> str:
  """Where this worker writes a copy of `path`: the chief writes the real one; other workers must
  still take part in checkpoint saves (they run collectives), so they write to a private
  directory that `cleanup_write_dir` removes afterwards."""
  if runtime.is_chief:
    return path
  return f'{path.rstrip("/")}/.worker-{runtime.worker_index}'


def cleanup_write_dir(path: str, runtime: Runtime) -> None:
  if not runtime.is_chief and tf.io.gfile.exists(path):
    tf.io.gfile.rmtree(path)


def vertex_ai_dirs(env=os.environ) -> dict:
  """Vertex AI style overrides for output locations, when set."""
  return {key: env[name] for key, name in (('model_dir', 'AIP_MODEL_DIR'),
                                           ('checkpoint_dir', 'AIP_CHECKPOINT_DIR'),
                                           ('log_dir', 'AIP_TENSORBOARD_LOG_DIR'))
          if env.get(name)}
