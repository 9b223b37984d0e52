"""Deployment (Dockerfile, .dockerignore, k8s/, cloudbuild.yaml), proven without a cluster.

- `kubectl kustomize` (the real one) renders k8s/ and its variants; every object validates against
  the Kubernetes OpenAPI schema in strict mode (kubernetes-validate's bundled schemas, offline).
- Consistency of the rendered objects: Service selectors, pod DNS names, worker counts, GPUs,
  exit-code policy, non-root pods, no secrets, one image and one bucket everywhere, flags the
  modules define, and the image that cloudbuild.yaml pushes.
- Images pinned to one build (a commit's tag or a digest, never `latest`); TensorBoard over runs
  and tuning studies with the profiler plugin in the image; Kueue's queue-name label on every Job
  exactly when QUEUE_NAME is set.
- cloudbuild.yaml's steps and substitutions, and its deploy script run against a stand-in kubectl.
- The rendered train Job run for real: its container command and env, resolved the way the Job
  controller and kubelet do, in one network namespace per pod (each with its own IP, binding port
  2222 like in a cluster) that form a MultiWorkerMirroredStrategy cluster and finish a smoke run.
"""

import copy
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from camvid_common import errors
from conftest import REPO
from trainer import distribution

K8S = REPO / 'k8s'
KUBECTL = shutil.which('kubectl')
WORKLOAD_KINDS = ('Job', 'Deployment')
# What each variant is checked against: k8s/settings.yaml (local-config: kustomize reads it, its
# output drops it), merged with the variant's own camvid-settings literals.
BASE_SETTINGS = yaml.safe_load((K8S / 'settings.yaml').read_text())['data']


def _literals(component):
  (generator,) = yaml.safe_load((component / 'kustomization.yaml').read_text())[
      'configMapGenerator']
  assert generator['name'] == 'camvid-settings' and generator['behavior'] == 'merge'
  return dict(literal.split('=', 1) for literal in generator['literals'])


def _require_kubectl():
  if KUBECTL is None:
    if os.environ.get('CI'):
      pytest.fail('kubectl is required (it renders k8s/ with its built-in kustomize)')
    pytest.skip('kubectl not installed (it renders k8s/ with its built-in kustomize)')


# ---------------------------------------------------------------------------------------------
# Rendering the variants.

def _kustomize(path):
  _require_kubectl()
  proc = subprocess.run([KUBECTL, 'kustomize', str(path)], capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _overlay(root, name, text):
  """A kustomization outside k8s/ (kustomize refuses an overlay inside its base's folder)."""
  folder = root / name
  (folder / 'settings').mkdir(parents=True)
  rel = os.path.relpath(K8S, folder)
  (folder / 'kustomization.yaml').write_text(text.format(k8s=rel))
  return folder


def _settings_component(folder, literals):
  (folder / 'settings' / 'kustomization.yaml').write_text(yaml.safe_dump({
      'apiVersion': 'kustomize.config.k8s.io/v1alpha1', 'kind': 'Component',
      'configMapGenerator': [{'name': 'camvid-settings', 'behavior': 'merge',
                              'literals': [f'{k}={v}' for k, v in literals.items()]}]}))


LOCAL_CPU = _literals(K8S / 'components' / 'local-cpu' / 'values')
SCALED = {'NUM_WORKERS': '4', 'GPUS_PER_WORKER': '2', 'GPU_TYPE': 'nvidia-tesla-a100',
          'BUCKET': 'gs://other-bucket', 'RUN_NAME': 'big-07',
          'IMAGE': 'europe-west4-docker.pkg.dev/p/camvid/camvid-seg:abc1234'}
# The image pinned by digest instead of a tag, and the Jobs queued by Kueue.
DIGEST = {'IMAGE': 'us-central1-docker.pkg.dev/p/camvid/camvid-seg@sha256:' + '0123456789abcdef' * 4}
KUEUE = {'QUEUE_NAME': 'team-a'}
QUEUE_LABEL = 'kueue.x-k8s.io/queue-name'


@pytest.fixture(scope='module')
def variants(tmp_path_factory):
  """name -> (rendered objects, the settings they were rendered with)."""
  root = tmp_path_factory.mktemp('kustomize')
  out = {'base': (_kustomize(K8S), dict(BASE_SETTINGS))}
  # local-cpu as its header documents it: a kustomization of one's own outside k8s/ ...
  local = _overlay(root, 'local-cpu', 'resources: [{k8s}]\n'
                   'components: [{k8s}/components/local-cpu]\n')
  out['local-cpu'] = (_kustomize(local), {**BASE_SETTINGS, **LOCAL_CPU})
  # ... or listed last under components: in (a copy of) k8s/kustomization.yaml.
  copied = root / 'k8s-copy'
  shutil.copytree(K8S, copied)
  text = (copied / 'kustomization.yaml').read_text()
  assert '- components/settings\n' in text
  (copied / 'kustomization.yaml').write_text(
      text.replace('- components/settings\n', '- components/settings\n- components/local-cpu\n'))
  out['local-cpu-in-place'] = (_kustomize(copied), {**BASE_SETTINGS, **LOCAL_CPU})
  # Every setting changed once, in an overlay's settings component.
  scaled = _overlay(root, 'scaled', 'resources: [{k8s}]\n'
                    'components: [settings, {k8s}/components/settings]\n')
  _settings_component(scaled, SCALED)
  out['scaled'] = (_kustomize(scaled), {**BASE_SETTINGS, **SCALED})
  for name, values in (('digest', DIGEST), ('kueue', KUEUE)):
    folder = _overlay(root, name, 'resources: [{k8s}]\n'
                      'components: [settings, {k8s}/components/settings]\n')
    _settings_component(folder, values)
    out[name] = (_kustomize(folder), {**BASE_SETTINGS, **values})
  # Two experiments side by side: kustomize renames objects but not env values by itself.
  prefixed = _overlay(root, 'prefixed', 'resources: [{k8s}]\nnamePrefix: exp2-\n'
                      'nameSuffix: -b\n')
  out['prefixed'] = (_kustomize(prefixed), dict(BASE_SETTINGS))
  return out


ALL_VARIANTS = ['base', 'local-cpu', 'local-cpu-in-place', 'scaled', 'prefixed', 'digest', 'kueue']


def _find(objects, kind, name=None, component=None):
  found = [o for o in objects if o['kind'] == kind
           and (name is None or o['metadata']['name'] == name)
           and (component is None or
                o['metadata'].get('labels', {}).get('app.kubernetes.io/component') == component)]
  assert found, f'no {kind} {name or ""} {component or ""} rendered'
  return found


def _train(objects):
  """The train Job and the headless Service its pods' subdomain names."""
  job = _find(objects, 'Job', component='train')
  assert len(job) == 1
  job = job[0]
  subdomain = job['spec']['template']['spec'].get('subdomain')
  services = [s for s in _find(objects, 'Service') if s['metadata']['name'] == subdomain]
  assert len(services) == 1, (f'the train pods\' subdomain {subdomain!r} names no rendered Service '
                              f'({[s["metadata"]["name"] for s in _find(objects, "Service")]})')
  return job, services[0]


def _pod_specs(objects):
  return [(o, o['spec']['template']) for o in objects if o['kind'] in WORKLOAD_KINDS]


def _containers(pod_template):
  spec = pod_template['spec']
  return spec.get('initContainers', []) + spec['containers']


# ---------------------------------------------------------------------------------------------
# What the Job controller and the kubelet do to a pod's environment.

_EXPANSION = re.compile(r'\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)')


def expand(value, env):
  """Kubernetes $(VAR) expansion: only variables already defined expand; $$ is a literal $."""
  def repl(m):
    if m.group(0) == '$$':
      return '$'
    return env.get(m.group(1), m.group(0))
  return _EXPANSION.sub(repl, value)


def _field_ref(path, pod):
  m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
  if m:
    values = pod['metadata'][m.group(1)]
    assert m.group(2) in values, f'{path}: the pod has no such {m.group(1)[:-1]}'
    return values[m.group(2)]
  simple = {'metadata.name': pod['metadata']['name'], 'metadata.namespace': 'default',
            'spec.serviceAccountName': pod['spec'].get('serviceAccountName', 'default'),
            'status.podIP': pod['status']['podIP']}
  assert path in simple, f'fieldRef {path}: not simulated'
  return simple[path]


def job_pod(job, index, pod_ip='10.244.0.10'):
  """The pod the Job controller creates for completion `index` (the parts the env can see)."""
  name = job['metadata']['name']
  template = copy.deepcopy(job['spec']['template'])
  labels = dict(template['metadata'].get('labels', {}))
  labels.update({'batch.kubernetes.io/job-name': name, 'job-name': name,
                 'batch.kubernetes.io/controller-uid': 'sim', 'controller-uid': 'sim'})
  annotations = dict(template['metadata'].get('annotations', {}))
  indexed = job['spec'].get('completionMode') == 'Indexed'
  if indexed:
    labels['batch.kubernetes.io/job-completion-index'] = str(index)
    annotations['batch.kubernetes.io/job-completion-index'] = str(index)
    template['spec']['hostname'] = f'{name}-{index}'
    for container in _containers(template):
      env = container.setdefault('env', [])
      if not any(e['name'] == 'JOB_COMPLETION_INDEX' for e in env):
        # Appended last, as the Job controller does: earlier entries cannot expand it.
        env.append({'name': 'JOB_COMPLETION_INDEX', 'valueFrom': {'fieldRef': {
            'fieldPath': "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
  template['metadata'] = {'name': f'{name}-{index}-sim', 'labels': labels,
                          'annotations': annotations}
  template['status'] = {'podIP': pod_ip}
  return template


def pod_container(pod, name):
  (container,) = [c for c in _containers(pod) if c['name'] == name]
  return container


def container_env(pod, name, objects):
  """Container `name`'s environment as the kubelet builds it (envFrom, then env in order)."""
  container = pod_container(pod, name)
  env = {}
  for source in container.get('envFrom', []):
    assert 'secretRef' not in source, 'no Secrets: identities come from Workload Identity'
    ref = source['configMapRef']['name']
    env.update(_find(objects, 'ConfigMap', ref)[0]['data'])
  for entry in container.get('env', []):
    if 'value' in entry:
      env[entry['name']] = expand(entry['value'], env)
    else:
      source = entry['valueFrom']
      assert 'secretKeyRef' not in source, 'no Secrets: identities come from Workload Identity'
      if 'fieldRef' in source:
        env[entry['name']] = _field_ref(source['fieldRef']['fieldPath'], pod)
      else:
        ref = source['configMapKeyRef']
        env[entry['name']] = _find(objects, 'ConfigMap', ref['name'])[0]['data'][ref['key']]
  return env


def container_args(container, env):
  return [expand(arg, env) for arg in container.get('args', [])]


def grpc_bypasses_proxy(env, host):
  """gRPC core's rule: no_grpc_proxy, else no_proxy (lower case only); an entry matches a host
  that ends with it (a leading dot or not), or is '*'."""
  value = env.get('no_grpc_proxy', env.get('no_proxy'))
  if value is None:
    return False
  entries = [e.strip() for e in value.split(',') if e.strip()]
  return any(e == '*' or host.lower().endswith(e.lower()) for e in entries)


# ---------------------------------------------------------------------------------------------
# Dockerfile and cloudbuild.yaml as data.

def dockerfile():
  """{instruction: [arguments, ...]} with line continuations joined and ARG defaults applied."""
  text = re.sub(r'\\\n', ' ', (REPO / 'Dockerfile').read_text())
  instructions, args = {}, {}
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    keyword, _, rest = line.partition(' ')
    keyword = keyword.upper()
    if keyword == 'ARG' and '=' in rest:
      name, _, default = rest.partition('=')
      args[name.strip()] = default.strip()
    rest = re.sub(r'\$\{(\w+)\}', lambda m: args.get(m.group(1), m.group(0)), rest)
    instructions.setdefault(keyword, []).append(rest.strip())
  return instructions, args


def image_entrypoint():
  instructions, _ = dockerfile()
  return json.loads(instructions['ENTRYPOINT'][-1])


def image_user():
  instructions, _ = dockerfile()
  user = instructions['USER'][-1]
  uid, _, gid = user.partition(':')
  return int(uid), int(gid or uid)


CLOUDBUILD = REPO / 'cloudbuild.yaml'
BUILTIN_SUBSTITUTIONS = {'PROJECT_ID', 'BUILD_ID', 'PROJECT_NUMBER', 'LOCATION', 'COMMIT_SHA',
                         'SHORT_SHA', 'REVISION_ID', 'REPO_NAME', 'REPO_FULL_NAME', 'BRANCH_NAME',
                         'TAG_NAME', 'REF_NAME', 'TRIGGER_NAME', 'TRIGGER_BUILD_CONFIG_PATH',
                         'SERVICE_ACCOUNT_EMAIL', 'SERVICE_ACCOUNT'}
# Any $name or ${name} is a substitution to Cloud Build (a shell's $var must be written $$var).
_SUBSTITUTION = re.compile(r'\$\$|\$\{([A-Za-z0-9_]+)\}|\$([A-Za-z0-9_]+)')


def cloudbuild():
  return yaml.safe_load(CLOUDBUILD.read_text())


def substitute(text, values):
  """Cloud Build's substitution: $$ is a literal $, $NAME and ${NAME} must be known names."""
  def repl(m):
    if m.group(0) == '$$':
      return '$'
    name = m.group(1) or m.group(2)
    assert name in values, f'cloudbuild.yaml: ${name} is neither a built-in nor a substitution'
    return values[name]
  return _SUBSTITUTION.sub(repl, text)


def used_substitutions(value):
  if isinstance(value, dict):
    return set().union(*(used_substitutions(v) for v in value.values())) if value else set()
  if isinstance(value, list):
    return set().union(*(used_substitutions(v) for v in value)) if value else set()
  if isinstance(value, str):
    return {m.group(1) or m.group(2) for m in _SUBSTITUTION.finditer(value) if m.group(0) != '$$'}
  return set()


def pushed_repository(config, project='PROJECT_ID'):
  """The image repository cloudbuild.yaml pushes, with its default substitutions."""
  values = {**{k: k for k in BUILTIN_SUBSTITUTIONS}, **config.get('substitutions', {}),
            'PROJECT_ID': project}
  tags = [substitute(image, values) for image in config['images']]
  repos = {tag.rsplit(':', 1)[0] for tag in tags}
  assert len(repos) == 1, tags
  return repos.pop(), sorted(tag.rsplit(':', 1)[1] for tag in tags)


# ---------------------------------------------------------------------------------------------
# Rendering and schema.

def test_kustomize_renders_every_manifest(variants):
  objects, _ = variants['base']
  rendered = {(o['kind'], o['metadata']['name']) for o in objects}
  kustomization = yaml.safe_load((K8S / 'kustomization.yaml').read_text())
  files = sorted(p.name for p in K8S.glob('*.yaml') if p.name != 'kustomization.yaml')
  assert sorted(kustomization['resources']) == files, 'every k8s/*.yaml must be a resource'
  for name in files:
    for doc in yaml.safe_load_all((K8S / name).read_text()):
      local = doc['metadata'].get('annotations', {}).get('config.kubernetes.io/local-config')
      assert ((doc['kind'], doc['metadata']['name']) in rendered) != (local == 'true'), name
  assert rendered == {
      ('ServiceAccount', 'camvid-seg'),
      ('Job', 'camvid-build-tfrecords'),
      ('Service', 'camvid-train'), ('Job', 'camvid-train'),
      ('Deployment', 'camvid-tensorboard'), ('Service', 'camvid-tensorboard'),
      ('Job', 'camvid-evaluate'),
      ('Service', 'camvid-tune-oracle'), ('Job', 'camvid-tune-chief'),
      ('Job', 'camvid-tune-workers')}
  labels = {o['metadata']['labels']['app.kubernetes.io/component'] for o in objects}
  assert labels == {'common', 'build-tfrecords', 'train', 'tensorboard', 'evaluate', 'tune'}
  for obj in objects:  # `kubectl apply -k k8s/ -l app.kubernetes.io/component=X` selects by it.
    assert obj['metadata']['labels']['app.kubernetes.io/name'] == 'camvid-seg'


def test_each_file_applied_alone_is_what_kustomize_renders(tmp_path):
  """`kubectl apply -f k8s/train-job.yaml` creates what `kubectl apply -k` does when the
  settings hold the values written in the files: settings change their own fields, nothing else."""
  kustomization = yaml.safe_load((K8S / 'kustomization.yaml').read_text())
  plain = [doc for name in kustomization['resources'] if name != 'settings.yaml'
           for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
  job, _ = _train(plain)
  pod = job['spec']['template']['spec']
  (container,) = pod['containers']
  env = {e['name']: e.get('value') for e in container['env']}
  written = {'IMAGE': container['image'], 'BUCKET': env['CAMVID_BUCKET'],
             'RUN_NAME': env['CAMVID_RUN_NAME'], 'NUM_WORKERS': str(job['spec']['completions']),
             'GPUS_PER_WORKER': str(container['resources']['limits']['nvidia.com/gpu']),
             'GPU_TYPE': pod['nodeSelector']['cloud.google.com/gke-accelerator'],
             'QUEUE_NAME': job['metadata']['labels'].get(QUEUE_LABEL, ''),
             'PRESET': container['args'][1].partition('=')[2].split()[0]}
  assert written.keys() == BASE_SETTINGS.keys()
  overlay = _overlay(tmp_path, 'written', 'resources: [{k8s}]\n'
                     'components: [settings, {k8s}/components/settings]\n')
  _settings_component(overlay, written)
  key = lambda o: (o['kind'], o['metadata']['name'])
  assert sorted(_kustomize(overlay), key=key) == sorted(plain, key=key)


def test_local_cpu_renders_the_same_both_ways(variants):
  assert variants['local-cpu'][0] == variants['local-cpu-in-place'][0]


# 1.28 is the oldest Kubernetes the issue supports, 1.31 where podFailurePolicy went GA.
SCHEMA_VERSIONS = ['1.28.0', '1.31.0', 'latest']


@pytest.mark.parametrize('version', SCHEMA_VERSIONS)
@pytest.mark.parametrize('variant', ALL_VARIANTS)
def test_objects_validate_strictly_against_the_openapi_schema(variants, variant, version):
  import kubernetes_validate  # pylint: disable=g-import-not-at-top
  if version == 'latest':
    version = kubernetes_validate.utils.latest_version()
  errors = []
  for obj in variants[variant][0]:
    obj = copy.deepcopy(obj)
    if version.startswith('1.28.') and obj['kind'] == 'Job':
      # The 1.28 schema marks onPodConditions required in every podFailurePolicy rule
      # (kubernetes-client/python#2056; the 1.29 schema fixed it); the API server has always taken
      # a rule with onExitCodes alone. Fill it in as empty, so every other error still shows.
      for rule in obj['spec'].get('podFailurePolicy', {}).get('rules', []):
        rule.setdefault('onPodConditions', [])
    try:
      kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
      errors.append(f'{obj["kind"]}/{obj["metadata"]["name"]}: {".".join(map(str, e.path))}: '
                    f'{e.message}')
  assert not errors, f'{variant} against Kubernetes {version}:\n' + '\n'.join(errors)


# ---------------------------------------------------------------------------------------------
# Consistency of the rendered objects.

@pytest.mark.parametrize('variant', ALL_VARIANTS)
def test_train_service_selects_exactly_the_train_pods(variants, variant):
  objects, _ = variants[variant]
  job, service = _train(objects)
  pod_labels = job['spec']['template']['metadata']['labels']
  selector = service['spec']['selector']
  assert selector.items() <= pod_labels.items(), 'the Service does not select the train pods'
  for other, template in _pod_specs(objects):
    if other is not job:
      assert not selector.items() <= template['metadata'].get('labels', {}).items(), (
          f'the train Service also selects {other["metadata"]["name"]}\'s pods')
  assert service['spec']['clusterIP'] == 'None'  # Headless: one DNS record per pod.
  assert service['spec']['publishNotReadyAddresses'] is True  # Names resolve while starting.
  assert job['spec']['template']['spec']['subdomain'] == service['metadata']['name']


@pytest.mark.parametrize('variant', ALL_VARIANTS)
def test_train_env_names_the_pods_cluster_dns_serves(variants, variant):
  """TF_CONFIG built from each pod's env lists exactly the names the headless Service gives."""
  objects, settings = variants[variant]
  job, service = _train(objects)
  n = job['spec']['completions']
  assert job['spec']['completionMode'] == 'Indexed'
  assert n == job['spec']['parallelism'] == int(settings['NUM_WORKERS'])
  name, subdomain = job['metadata']['name'], service['metadata']['name']
  (container,) = job['spec']['template']['spec']['containers']
  for index in range(n):
    pod = job_pod(job, index)
    env = container_env(pod, container['name'], objects)
    assert env['CAMVID_JOB_NAME'] == name and env['CAMVID_SERVICE_NAME'] == subdomain
    assert int(env['CAMVID_NUM_WORKERS']) == n
    spec = distribution.tf_config_from_env(env)
    # DNS: <pod hostname>.<subdomain>, where an Indexed Job's pod hostname is <job>-<index>.
    served = [f'{job_pod(job, i)["spec"]["hostname"]}.{subdomain}' for i in range(n)]
    port = int(env['CAMVID_WORKER_PORT'])
    assert spec == {'cluster': {'worker': [f'{host}:{port}' for host in served]},
                    'task': {'type': 'worker', 'index': index}}
    assert {p['port'] for p in service['spec']['ports']} == {port}
    assert {p['containerPort'] for p in container['ports']} == {port}
    for host in served + ['metadata.google.internal', 'localhost']:
      assert grpc_bypasses_proxy(env, host), f'{host} would go through an http(s)_proxy'
    assert not grpc_bypasses_proxy(env, 'storage.googleapis.com')


@pytest.mark.parametrize('variant', ALL_VARIANTS)
def test_tuners_reach_the_oracle(variants, variant):
  objects, _ = variants[variant]
  (chief,) = [j for j in _find(objects, 'Job', component='tune')
              if j['spec'].get('completionMode') != 'Indexed']
  (workers,) = [j for j in _find(objects, 'Job', component='tune')
                if j['spec'].get('completionMode') == 'Indexed']
  (oracle,) = _find(objects, 'Service', component='tune')
  (chief_container,) = chief['spec']['template']['spec']['containers']
  (worker_container,) = workers['spec']['template']['spec']['containers']
  assert chief_container['args'] == worker_container['args']  # One search, one set of flags.
  assert chief_container['args'][0] == 'tuning.tune'
  chief_env = container_env(job_pod(chief, 0), chief_container['name'], objects)
  assert chief_env['KERASTUNER_TUNER_ID'] == 'chief'
  assert chief_env['KERASTUNER_ORACLE_IP'] == '0.0.0.0'  # The chief binds to it.
  port = int(chief_env['KERASTUNER_ORACLE_PORT'])
  assert [p['port'] for p in oracle['spec']['ports']] == [port]
  assert [p['containerPort'] for p in chief_container['ports']] == [port]
  selector = oracle['spec']['selector']
  assert selector.items() <= chief['spec']['template']['metadata']['labels'].items()
  assert not selector.items() <= workers['spec']['template']['metadata']['labels'].items()
  ids = []
  for index in range(workers['spec']['completions']):
    env = container_env(job_pod(workers, index), worker_container['name'], objects)
    ids.append(env['KERASTUNER_TUNER_ID'])
    assert env['KERASTUNER_ORACLE_IP'] == oracle['metadata']['name']
    assert int(env['KERASTUNER_ORACLE_PORT']) == port
    assert grpc_bypasses_proxy(env, oracle['metadata']['name'])
  assert ids == [f'tuner{i}' for i in range(workers['spec']['completions'])]
  assert workers['spec']['completions'] == workers['spec']['parallelism']


def _policy_action(job, container, exit_code, conditions=()):
  """The Job controller's podFailurePolicy: the first matching rule's action, else Count."""
  for rule in job['spec'].get('podFailurePolicy', {}).get('rules', []):
    if 'onExitCodes' in rule:
      req = rule['onExitCodes']
      if req.get('containerName') not in (None, container):
        continue
      hit = exit_code in req['values']
      if hit == (req['operator'] == 'In'):
        return rule['action']
    else:
      for pattern in rule['onPodConditions']:
        if (pattern['type'], pattern.get('status', 'True')) in conditions:
          return rule['action']
  return 'Count'


@pytest.mark.parametrize('variant', ['base', 'local-cpu'])
def test_failure_policy_follows_the_exit_codes(variants, variant):
  objects, _ = variants[variant]
  disrupted = [('DisruptionTarget', 'True')]
  for job in _find(objects, 'Job'):
    spec, pod = job['spec'], job['spec']['template']['spec']
    (container,) = [c['name'] for c in pod['containers']]
    name = job['metadata']['name']
    assert pod['restartPolicy'] == 'Never', name  # podFailurePolicy requires it.
    assert spec['backoffLimit'] >= 1 and spec['ttlSecondsAfterFinished'] > 0, name
    assert _policy_action(job, container, errors.EXIT_INPUT_ERROR) == 'FailJob', name
    assert _policy_action(job, container, 1) == 'Count', name
    assert _policy_action(job, container, 137, disrupted) == 'Ignore', name
    assert _policy_action(job, container, 143, disrupted) == 'Ignore', name
  train, _ = _train(objects)
  assert _policy_action(train, 'trainer', errors.EXIT_PREEMPTED) == 'Ignore'
  assert _policy_action(train, 'trainer', 137) == 'Count'  # Watchdog: cluster not formed.
  # Long enough to save a checkpoint after SIGTERM.
  assert train['spec']['template']['spec']['terminationGracePeriodSeconds'] >= 120
  for job in _find(objects, 'Job', component='tune'):
    (container,) = job['spec']['template']['spec']['containers']
    assert _policy_action(job, container['name'], errors.EXIT_PREEMPTED) == 'Ignore'


def _gpu_jobs(objects):
  train, _ = _train(objects)
  (tuners,) = [j for j in _find(objects, 'Job', component='tune')
               if j['spec'].get('completionMode') == 'Indexed']
  return [train, tuners]


@pytest.mark.parametrize('variant', ['base', 'scaled', 'prefixed'])
def test_gpu_workloads_ask_for_gpu_nodes(variants, variant):
  objects, settings = variants[variant]
  gpu_jobs = _gpu_jobs(objects)
  for job in gpu_jobs:
    pod = job['spec']['template']['spec']
    (container,) = pod['containers']
    assert container['resources']['limits']['nvidia.com/gpu'] == int(settings['GPUS_PER_WORKER'])
    assert pod['nodeSelector'] == {'cloud.google.com/gke-accelerator': settings['GPU_TYPE']}
    assert {'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'} in (
        pod['tolerations'])
    assert {'name': 'shm', 'mountPath': '/dev/shm'} in container['volumeMounts']
    (shm,) = [v for v in pod['volumes'] if v['name'] == 'shm']
    assert shm['emptyDir']['medium'] == 'Memory'
  for obj, template in _pod_specs(objects):
    if obj not in gpu_jobs:
      assert 'nodeSelector' not in template['spec'], obj['metadata']['name']
      for container in _containers(template):
        assert 'nvidia.com/gpu' not in json.dumps(container.get('resources', {}))
    for container in _containers(template):
      assert container['resources']['requests']['cpu'], obj['metadata']['name']
      assert container['resources']['requests']['memory'], obj['metadata']['name']


@pytest.mark.parametrize('variant', ['local-cpu', 'local-cpu-in-place'])
def test_local_cpu_has_no_gpu_and_one_data_volume(variants, variant):
  objects, _ = variants[variant]
  assert 'nvidia.com/gpu' not in json.dumps(objects)
  assert 'gke-accelerator' not in json.dumps(objects)
  (claim,) = _find(objects, 'PersistentVolumeClaim')
  for obj, template in _pod_specs(objects):
    pod = template['spec']
    assert 'tolerations' not in pod and 'nodeSelector' not in pod
    assert {'name': 'data', 'persistentVolumeClaim': {
        'claimName': claim['metadata']['name']}} in pod['volumes'], obj['metadata']['name']
    for container in pod['containers']:
      assert {'name': 'data', 'mountPath': '/data'} in container['volumeMounts']
      assert {'name': 'CAMVID_BUCKET', 'value': '/data'} in container['env']


@pytest.mark.parametrize('variant', ALL_VARIANTS)
def test_pods_run_as_the_image_user_without_secrets(variants, variant):
  objects, _ = variants[variant]
  uid, gid = image_user()
  assert uid != 0
  (account,) = _find(objects, 'ServiceAccount')
  assert not [o for o in objects if o['kind'] == 'Secret']
  assert 'secret' not in json.dumps(account).lower()
  for obj, template in _pod_specs(objects):
    pod, name = template['spec'], obj['metadata']['name']
    context = pod['securityContext']
    assert context['runAsNonRoot'] is True and context['runAsUser'] == uid, name
    assert context['runAsGroup'] == gid, name
    assert pod['serviceAccountName'] == account['metadata']['name'], name
    assert 'imagePullSecrets' not in pod, name
    for volume in pod.get('volumes', []):
      assert not {'secret', 'hostPath', 'projected'} & volume.keys(), (name, volume)
    for container in _containers(template):
      assert container['securityContext']['allowPrivilegeEscalation'] is False, name
      assert container['securityContext']['capabilities']['drop'] == ['ALL'], name
      assert not container['securityContext'].get('privileged'), name
      assert 'runAsUser' not in container['securityContext'], name
      text = json.dumps(container)
      for leak in ('secretKeyRef', 'secretRef', 'GOOGLE_APPLICATION_CREDENTIALS', 'PRIVATE KEY',
                   'key.json', 'credentials.json'):
        assert leak not in text, (name, leak)


@pytest.mark.parametrize('variant', ['base', 'local-cpu'])
def test_train_and_tune_jobs_run_the_settings_preset(variants, variant):
  """GPU node pools run the `gpu` recipe; the local-cpu variant keeps the CPU one, `small`."""
  objects, settings = variants[variant]
  assert settings['PRESET'] == {'base': 'gpu', 'local-cpu': 'small'}[variant]
  presets = {}
  for obj, template in _pod_specs(objects):
    for container in _containers(template):
      if container.get('args', [''])[0] in ('trainer.task', 'tuning.tune'):
        presets[obj['metadata']['name']] = container['args'][1]
  assert presets == {name: f'--config={settings["PRESET"]}' for name in (
      'camvid-train', 'camvid-tune-chief', 'camvid-tune-workers')}


def test_train_workers_wait_for_peers_that_start_minutes_apart(variants):
  """Cluster formation allows 30 min (node auto-provisioning, image pulls); the trainer's own
  override parser reads the value."""
  from trainer import configs  # pylint: disable=g-import-not-at-top
  job, _ = _train(variants['base'][0])
  (container,) = job['spec']['template']['spec']['containers']
  (arg,) = [a for a in container['args'] if a.startswith('--params_override=')]
  overrides = configs.parse_params_override(arg.partition('=')[2])
  config = configs.override(configs.get_config('gpu'), overrides, '--params_override')
  assert config.runtime.formation_timeout_seconds == 1800
  assert config.runtime.peer_timeout_seconds == 300  # Collectives still fail fast.


@pytest.mark.parametrize('variant', ['base', 'scaled', 'prefixed', 'local-cpu', 'digest'])
def test_one_image_and_one_bucket_layout_everywhere(variants, variant):
  objects, settings = variants[variant]
  bucket = settings['BUCKET']
  paths = {}
  for obj, template in _pod_specs(objects):
    for container in _containers(template):
      assert container['image'] == settings['IMAGE'], obj['metadata']['name']
      env = container_env(job_pod(obj, 0), container['name'], objects)
      assert env['CAMVID_BUCKET'] == bucket
      if 'command' in container:  # local-cpu's builder: a shell script, the same two paths.
        assert container['command'] == ['sh', '-c'], obj['metadata']['name']
        script = container['args'][0]
        assert '--input_dir "$raw"' in script and 'raw="$CAMVID_BUCKET/camvid/raw"' in script
        assert '--output_dir "$CAMVID_BUCKET/camvid/tfrecords"' in script
        continue
      for arg in container_args(container, env):
        flag, _, value = arg.partition('=')
        if '/' in value:
          assert (value + '/').startswith(f'{bucket}/camvid/'), (obj['metadata']['name'], arg)
          paths.setdefault(flag, set()).add(value)
  run = f'{bucket}/camvid/runs/{settings["RUN_NAME"]}'
  assert paths.get('--input_dir', {f'{bucket}/camvid/raw'}) == {f'{bucket}/camvid/raw'}
  # What the builder writes is what the trainer, evaluator and tuner read.
  assert paths['--data_dir'] == {f'{bucket}/camvid/tfrecords'}
  assert paths['--model_dir'] == {run}  # Trained, then evaluated.
  # TensorBoard: the parent of runs/ and tuning/ (test_tensorboard_shows_runs_studies_and_traces).
  assert paths['--logdir'] == {f'{bucket}/camvid'}
  assert paths['--output'] == {f'{run}/metrics-test.json'}
  if variant != 'local-cpu':  # local-cpu's builder is a shell script (it may generate scenes).
    assert paths['--output_dir'] >= {f'{bucket}/camvid/tfrecords'}


# A pinned image reference: a digest, or a tag other than `latest`. The tag follows the last ':'
# of the last path component (a registry's host:port is not a tag); without one, docker pulls
# `latest`.
_IMAGE_DIGEST = re.compile(r'@sha256:[0-9a-f]{64}$')
_IMAGE_TAG = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}')


def image_pin(image):
  """'@digest' or the tag of an image reference; None when it has neither."""
  if _IMAGE_DIGEST.search(image):
    return '@digest'
  last = image.rsplit('/', 1)[-1]
  if ':' not in last:
    return None
  tag = last.rpartition(':')[2]
  assert _IMAGE_TAG.fullmatch(tag), f'{image}: invalid tag'
  return tag


@pytest.mark.parametrize('variant', ALL_VARIANTS)
def test_every_pod_runs_one_pinned_image(variants, variant):
  """Every container runs IMAGE, one build's tag or digest: a pod that replaces a failed or
  preempted one resumes the run with the code its peers run, never whatever `latest` is by then."""
  objects, settings = variants[variant]
  assert image_pin(settings['IMAGE']) not in (None, 'latest'), settings['IMAGE']
  for obj, template in _pod_specs(objects):
    for container in _containers(template):
      image = container['image']
      assert image == settings['IMAGE'], (obj['metadata']['name'], image)
      assert image_pin(image) not in (None, 'latest'), (obj['metadata']['name'], image)


def test_image_pins_are_recognised():
  assert image_pin('r.example/p/camvid-seg:abc1234') == 'abc1234'
  assert image_pin('localhost:5000/camvid-seg') is None  # A port, not a tag: `latest`.
  assert image_pin('camvid-seg') is None
  assert image_pin('camvid-seg:latest') == 'latest'
  assert image_pin(DIGEST['IMAGE']) == '@digest'


def test_no_manifest_or_build_step_names_latest():
  """Not in any manifest, variant or settings file (comments aside), nor in cloudbuild.yaml: the
  `latest` tag is neither pushed nor pulled."""
  for path in sorted(K8S.rglob('*.yaml')) + [CLOUDBUILD]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split('#', 1)[0]
      assert not re.search(r':latest\b', code), f'{path.relative_to(REPO)}:{number}: {line}'


def _module_file(module):
  path = REPO / pathlib.Path(*module.split('.'))
  for candidate in (path.with_suffix('.py'), path / '__main__.py'):
    if candidate.is_file():
      return candidate
  return None


def test_container_args_name_modules_and_flags_that_exist(variants):
  """args[0] is a module for the image's `python3 -m` entrypoint; each --flag is defined by it."""
  assert image_entrypoint() == ['python3', '-m']
  objects, _ = variants['base']
  seen = set()
  for obj, template in _pod_specs(objects):
    for container in _containers(template):
      assert 'command' not in container, 'the image entrypoint runs the module'
      module, *flags = container['args']
      seen.add(module)
      source = _module_file(module)
      if source is None:  # Not ours: installed in the image by a dependency.
        assert module == 'tensorboard.main'
        continue
      defined = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source.read_text()))
      for flag in flags:
        name = flag.lstrip('-').partition('=')[0]
        assert flag.startswith('--') and (name in defined or (
            name.startswith('no') and name[2:] in defined)), f'{module}: unknown flag {flag}'
  assert seen == {'tfrecords_builder', 'trainer.task', 'trainer.evaluate', 'tuning.tune',
                  'tensorboard.main'}
  # The image build imports each of them, so a missing module fails the build, not a pod.
  instructions, _ = dockerfile()
  (checked,) = [re.search(r'for module in (.*?); do', r).group(1).split()
                for r in instructions['RUN'] if 'for module in' in r]
  for module in seen:
    assert module in checked or f'{module}.__main__' in checked, module


def test_tensorboard_service_reaches_its_deployment(variants):
  objects, _ = variants['base']
  (deployment,) = _find(objects, 'Deployment')
  (service,) = [s for s in _find(objects, 'Service', component='tensorboard')]
  labels = deployment['spec']['template']['metadata']['labels']
  assert deployment['spec']['selector']['matchLabels'].items() <= labels.items()
  assert service['spec']['selector'].items() <= labels.items()
  (container,) = deployment['spec']['template']['spec']['containers']
  port = {p['name']: p['containerPort'] for p in container['ports']}
  assert [p['targetPort'] for p in service['spec']['ports']] == ['http'] and 'http' in port
  assert f'--port={port["http"]}' in container['args'] and '--bind_all' in container['args']


@pytest.mark.parametrize('variant', ['base', 'local-cpu', 'prefixed'])
def test_tensorboard_shows_runs_studies_and_traces(variants, variant):
  """One --logdir above every training run's logs (with their --profile_steps traces) and every
  tuning study's HParams runs. Not --logdir_spec: the profiler plugin reads --logdir only and
  lists no trace under --logdir_spec. TensorBoard's own flag parser accepts the rendered args."""
  from tensorboard import default, program  # pylint: disable=g-import-not-at-top
  objects, settings = variants[variant]
  (deployment,) = _find(objects, 'Deployment', component='tensorboard')
  (container,) = deployment['spec']['template']['spec']['containers']
  env = container_env(job_pod(deployment, 0), container['name'], objects)
  module, *args = container_args(container, env)
  assert module == 'tensorboard.main'
  assert not [a for a in args if a.startswith('--logdir_spec')]
  (logdir,) = [a.partition('=')[2] for a in args if a.startswith('--logdir=')]
  assert '--load_fast=false' in args  # The Python reader: gs:// through tf.io.gfile.
  tensorboard = program.TensorBoard(plugins=default.get_plugins())
  tensorboard.configure(argv=['tensorboard', *args])
  assert tensorboard.flags.logdir == logdir and not tensorboard.flags.logdir_spec
  # Where the trainer and the tuner write their TensorBoard data (docs/training.md "Outputs", docs/tuning.md "Outputs").
  written = set()
  for job in _find(objects, 'Job'):
    for job_container in _containers(job['spec']['template']):
      job_env = container_env(job_pod(job, 0), job_container['name'], objects)
      job_module, *job_args = container_args(job_container, job_env)
      flags = dict(a.partition('=')[::2] for a in job_args if a.startswith('--'))
      if job_module == 'trainer.task':
        written.add(f'{flags["--model_dir"]}/logs')  # profile/ (the traces) is in there too.
      elif job_module == 'tuning.tune':
        written.add(f'{flags["--output_dir"]}/tensorboard')
  assert len(written) == 2, written  # The train run and the study.
  for path in written:
    assert path.startswith(f'{logdir}/'), (path, logdir)
  assert {p[len(logdir) + 1:].split('/')[0] for p in written} == {'runs', 'tuning'}
  assert logdir == f'{settings["BUCKET"]}/camvid'


# ---------------------------------------------------------------------------------------------
# Kueue: the queue-name label from QUEUE_NAME.

def _without_queue_label(objects):
  objects = copy.deepcopy(objects)
  for obj in objects:
    obj['metadata'].get('labels', {}).pop(QUEUE_LABEL, None)
  return objects


@pytest.mark.parametrize('variant', ['base', 'local-cpu', 'scaled', 'prefixed', 'digest'])
def test_no_queue_name_renders_no_kueue_label(variants, variant):
  """QUEUE_NAME empty (the default): no label at all, not an empty one (Kueue's webhook rejects a
  queue-name label that is present but not a valid name, "" included)."""
  objects, settings = variants[variant]
  assert settings['QUEUE_NAME'] == ''
  assert 'kueue.x-k8s.io' not in json.dumps(objects)


def test_queue_name_labels_every_job_for_kueue(variants):
  objects, settings = variants['kueue']
  queue = settings['QUEUE_NAME']
  # What Kueue accepts as a LocalQueue name (a DNS-1123 subdomain).
  assert re.fullmatch(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*', queue)
  assert {o['metadata']['name'] for o in _find(objects, 'Job')} == {
      'camvid-build-tfrecords', 'camvid-train', 'camvid-evaluate', 'camvid-tune-chief',
      'camvid-tune-workers'}
  for obj in objects:
    label = obj['metadata'].get('labels', {}).get(QUEUE_LABEL)
    # On the Jobs themselves (Kueue reads the Job's labels), not on the Deployment or Services.
    assert label == (queue if obj['kind'] == 'Job' else None), obj['metadata']['name']
    if obj['kind'] == 'Job':
      # Created unsuspended: Kueue's webhook suspends a Job that carries the label itself, and
      # the same Job runs at once on a cluster without Kueue.
      assert 'suspend' not in obj['spec'], obj['metadata']['name']
      assert QUEUE_LABEL not in obj['spec']['template']['metadata']['labels']
  # Nothing else changes.
  assert _without_queue_label(objects) == variants['base'][0]


def test_queue_name_set_in_settings_yaml_alone(tmp_path):
  """The one edit the issue promises: QUEUE_NAME in k8s/settings.yaml (here in a copy of k8s/),
  also with local-cpu listed in place; a variant that empties it again loses the label."""
  copied = tmp_path / 'k8s'
  shutil.copytree(K8S, copied)
  settings = (copied / 'settings.yaml').read_text()
  assert settings.count('\n  QUEUE_NAME: ""\n') == 1
  (copied / 'settings.yaml').write_text(settings.replace('QUEUE_NAME: ""', 'QUEUE_NAME: batch'))
  objects = _kustomize(copied)
  assert {o['metadata']['labels'].get(QUEUE_LABEL) for o in _find(objects, 'Job')} == {'batch'}
  assert _without_queue_label(objects) == _kustomize(K8S) != objects
  emptied = tmp_path / 'emptied'
  (emptied / 'settings').mkdir(parents=True)
  (emptied / 'kustomization.yaml').write_text(
      'resources: [../k8s]\ncomponents: [settings, ../k8s/components/settings]\n')
  _settings_component(emptied, {'QUEUE_NAME': ''})
  assert 'kueue.x-k8s.io' not in json.dumps(_kustomize(emptied))
  text = (copied / 'kustomization.yaml').read_text()
  (copied / 'kustomization.yaml').write_text(
      text.replace('- components/settings\n', '- components/settings\n- components/local-cpu\n'))
  objects = _kustomize(copied)
  assert {o['metadata']['labels'].get(QUEUE_LABEL) for o in _find(objects, 'Job')} == {'batch'}


# ---------------------------------------------------------------------------------------------
# The image.

def test_dockerfile_builds_the_package_on_the_tensorflow_gpu_image():
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  instructions, args = dockerfile()
  setup = (REPO / 'setup.py').read_text()
  (spec,) = [Requirement(r) for r in re.findall(r"'(tensorflow[<>=~!][^']*)'", setup)]
  version = args['TF_VERSION']
  assert spec.specifier.contains(version), f'Dockerfile TF {version} vs setup.py {spec}'
  assert instructions['FROM'] == [f'tensorflow/tensorflow:{version}-gpu']
  (install,) = [r for r in instructions['RUN'] if 'pip install' in r]
  assert f'"tensorflow=={version}"' in install.replace('${TF_VERSION}', version)
  assert not any(re.search(r'\btests?\b', c) for c in instructions['COPY'])
  uid, gid = image_user()
  assert uid >= 1000 and gid >= 1000
  assert instructions['USER'] == [f'{uid}:{gid}']
  assert json.loads(instructions['CMD'][-1]) == ['trainer.task']  # No args: the demo.


def test_image_has_the_tensorboard_profiler_plugin():
  """tensorboard-plugin-profile of the image's TensorFlow release, so that --profile_steps traces
  open in TensorBoard's Profile tab; the build fails unless TensorBoard finds and loads it."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  instructions, args = dockerfile()
  (install,) = [r for r in instructions['RUN'] if 'pip install' in r]
  (spec,) = [Requirement(r) for r in re.findall(r'"(tensorboard-plugin-profile[^"]*)"', install)]
  major, minor, _ = args['TF_VERSION'].split('.')
  assert spec.specifier.contains(f'{major}.{minor}.0'), spec
  assert not spec.specifier.contains(f'{major}.{int(minor) + 1}.0'), spec
  # The build-time check, after the pip install and the module imports, in the same RUN.
  check = install[install.index('pip install'):]
  assert re.search(r"default\.get_dynamic_plugins\(\).*assert 'ProfilePluginLoader' in", check)
  assert 'import xprof.profile_plugin' in check


def test_dockerignore_sends_only_the_package():
  from docker.utils.build import exclude_paths  # pylint: disable=g-import-not-at-top
  patterns = [line.strip() for line in (REPO / '.dockerignore').read_text().splitlines()
              if line.strip() and not line.startswith('#')]
  context = {p for p in exclude_paths(str(REPO), patterns)
             if (REPO / p).is_file()}
  # The packages are setup.py's find_packages(include=[...]) list; each one the shipped code
  # imports must be in it (a new top-level package, like camvid_common, needs both files).
  setup = (REPO / 'setup.py').read_text()
  (include,) = re.findall(r'find_packages\(\s*include=\[([^\]]*)\]', setup)
  names = sorted(n.rstrip('*') for n in re.findall(r"'([^']+)'", include))
  packages = tuple(f'{n}/' for n in names)
  local = {p.parent.name for p in REPO.glob('*/__init__.py')}
  for package in packages:
    for source in (REPO / package).rglob('*.py'):
      imported = re.findall(r'^\s*(?:from|import) (\w+)', source.read_text(), re.M)
      assert set(imported) & local <= set(names), (source, set(imported) & local)
  allowed = {'Dockerfile', '.dockerignore', 'setup.py', 'setup.cfg', 'pyproject.toml',
             'MANIFEST.in', 'README.md'}
  stray = sorted(p for p in context if p not in allowed and not p.startswith(packages))
  assert not stray, f'in the image build context: {stray[:10]}'
  assert not [p for p in context if '__pycache__' in p or p.endswith('.pyc')]
  assert 'setup.py' in context
  # Everything setup.py installs is there (find_packages: every package's .py files).
  for package in packages:
    for source in (REPO / package).rglob('*.py'):
      rel = source.relative_to(REPO).as_posix()
      if '__pycache__' not in rel:
        assert rel in context, rel


# ---------------------------------------------------------------------------------------------
# Cloud Build.

def test_cloudbuild_tests_then_builds_then_pushes():
  config = cloudbuild()
  steps = config['steps']
  ids = [s.get('id') for s in steps]
  assert ids == ['test', 'build', 'push', 'deploy-train']
  assert not any('waitFor' in s for s in steps)  # Each step waits for the one before.
  test, build, push, deploy = steps
  assert 'bash .ci/run' in test['args'][-1]  # The same suite as CI.
  assert 'kubectl' in test['args'][-1]  # tests/test_deploy.py renders with it.
  assert build['name'] == push['name'] == 'gcr.io/cloud-builders/docker'
  assert build['args'][0] == 'build' and build['args'][-1] == '.'
  repo, _ = pushed_repository(config)
  values = {**{k: k for k in BUILTIN_SUBSTITUTIONS}, **config['substitutions']}
  built = sorted(substitute(a.partition('=')[2], values) for a in build['args']
                 if a.startswith('--tag='))
  assert built == [f'{repo}:SHORT_SHA']  # The commit's tag only: no `latest`.
  assert push['args'][0] == 'push'
  assert [substitute(a, values) for a in push['args'][1:]] == built
  assert sorted(substitute(i, values) for i in config['images']) == built
  assert deploy['name'] == 'gcr.io/cloud-builders/kubectl'
  # Cloud Build rejects a build that uses an unknown substitution or leaves a defined one unused.
  defined = set(config['substitutions'])
  used = used_substitutions(config['steps']) | used_substitutions(config['images'])
  assert used <= defined | BUILTIN_SUBSTITUTIONS, used - defined - BUILTIN_SUBSTITUTIONS
  assert defined <= used, defined - used
  assert {'_REGION', '_BUCKET'} <= defined and 'PROJECT_ID' in used


def test_cloudbuild_pushes_the_image_the_manifests_run():
  repo, tags = pushed_repository(cloudbuild())
  assert tags == ['SHORT_SHA']
  image = BASE_SETTINGS['IMAGE']
  name, _, tag = image.rpartition(':')
  assert name == repo, f'k8s/settings.yaml IMAGE {image} vs {repo}'
  # The placeholder for the tag of the commit to run, `git rev-parse --short HEAD` (docs/kubernetes.md).
  assert tag == 'COMMIT'


def _run_deploy_step(tmp_path, **overrides):
  """deploy-train's script, substituted as Cloud Build would, in a copy of the checkout with
  `gcloud` and `kubectl apply/delete` recorded instead of run (kubectl kustomize is real)."""
  config = cloudbuild()
  (step,) = [s for s in config['steps'] if s['id'] == 'deploy-train']
  values = {**{k: '' for k in BUILTIN_SUBSTITUTIONS}, **config['substitutions'],
            'PROJECT_ID': 'test-project', 'SHORT_SHA': 'abc1234', **overrides}
  script = substitute(step['args'][-1], values)
  work = tmp_path / 'workspace'
  shutil.copytree(K8S, work / 'k8s')
  shims = tmp_path / 'bin'
  shims.mkdir()
  log = tmp_path / 'calls.log'
  (shims / 'gcloud').write_text(f'#!/bin/sh\necho "gcloud $*" >> {shlex.quote(str(log))}\n')
  (shims / 'kubectl').write_text(
      '#!/bin/sh\n'
      f'if [ "$1" = kustomize ]; then exec {shlex.quote(KUBECTL)} "$@"; fi\n'
      f'echo "kubectl $*" >> {shlex.quote(str(log))}\n')
  for shim in shims.iterdir():
    shim.chmod(0o755)
  proc = subprocess.run(['bash', '-c', script], cwd=work, capture_output=True, text=True,
                        env={**os.environ, 'PATH': f'{shims}:{os.environ["PATH"]}'}, timeout=60)
  calls = log.read_text().splitlines() if log.exists() else []
  return proc, work, calls


def test_cloudbuild_deploy_step_applies_the_train_job_with_the_new_image(tmp_path):
  _require_kubectl()
  proc, work, calls = _run_deploy_step(tmp_path, _DEPLOY='true', _BUCKET='gs://deploy-bucket')
  assert proc.returncode == 0, proc.stderr
  rendered = [d for d in yaml.safe_load_all((work / 'deploy' / 'rendered.yaml').read_text()) if d]
  image = 'us-central1-docker.pkg.dev/test-project/camvid/camvid-seg:abc1234'
  for obj, template in _pod_specs(rendered):
    for container in _containers(template):
      assert container['image'] == image
      assert {'name': 'CAMVID_BUCKET', 'value': 'gs://deploy-bucket'} in container['env']
  rendered_file = 'deploy/rendered.yaml'
  assert calls == [
      'gcloud container clusters get-credentials camvid --region=us-central1 '
      '--project=test-project',
      f'kubectl apply -f {rendered_file} -l app.kubernetes.io/component=common',
      f'kubectl delete -f {rendered_file} -l app.kubernetes.io/component=train '
      '--ignore-not-found --cascade=foreground --wait=true',
      f'kubectl apply -f {rendered_file} -l app.kubernetes.io/component=train']
  # Without _BUCKET the bucket stays k8s/settings.yaml's; without _DEPLOY nothing is applied.
  proc, work, _ = _run_deploy_step(tmp_path / 'b', _DEPLOY='true')
  assert proc.returncode == 0, proc.stderr
  assert f'value: {BASE_SETTINGS["BUCKET"]}' in (work / 'deploy' / 'rendered.yaml').read_text()
  proc, work, calls = _run_deploy_step(tmp_path / 'c')
  assert proc.returncode == 0 and 'skipped' in proc.stdout and not calls


# ---------------------------------------------------------------------------------------------
# The rendered train Job, run as pods.

def _netns_unavailable():
  if os.geteuid() != 0:
    return 'needs root (ip netns, unshare --mount)'
  for tool in ('ip', 'unshare', 'mount', 'hostname'):
    if not shutil.which(tool):
      return f'{tool} not installed (iproute2 / util-linux)'
  probe = f'cvprobe{os.getpid()}'
  made = subprocess.run(['ip', 'netns', 'add', probe], capture_output=True, text=True)
  if made.returncode != 0:
    return f'cannot create network namespaces here: {made.stderr.strip()}'
  try:
    unshared = subprocess.run(['ip', 'netns', 'exec', probe, 'unshare', '--mount', '--uts',
                               'true'], capture_output=True, text=True)
    if unshared.returncode != 0:
      return f'cannot create mount namespaces here: {unshared.stderr.strip()}'
  finally:
    subprocess.run(['ip', 'netns', 'del', probe], capture_output=True)
  return None


class PodNetwork:
  """One network namespace per simulated pod, joined by a bridge in a namespace of its own (the
  "node"): each pod has its own interface and IP and binds its ports on it, as in a cluster.
  Nothing is added to the host's own namespace, and no route leads out of these."""

  def __init__(self, count):
    tag = os.getpid() % 100000
    self.node = f'cv{tag}n'
    self.pods = [f'cv{tag}p{i}' for i in range(count)]
    self.ips = [f'10.244.0.{10 + i}' for i in range(count)]  # A pod CIDR, as on a node.

  def __enter__(self):
    self.__exit__()  # Leftovers of a killed run with the same pid.
    try:
      self._create()
    except BaseException:
      self.__exit__()
      raise
    return self

  def _create(self):
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)
    run('ip', 'netns', 'add', self.node)
    run('ip', '-n', self.node, 'link', 'add', 'br0', 'type', 'bridge')
    run('ip', '-n', self.node, 'link', 'set', 'br0', 'up')
    for i, (pod, ip) in enumerate(zip(self.pods, self.ips)):
      run('ip', 'netns', 'add', pod)
      run('ip', 'link', 'add', 'eth0', 'netns', pod, 'type', 'veth',
          'peer', 'name', f'veth{i}', 'netns', self.node)
      run('ip', '-n', self.node, 'link', 'set', f'veth{i}', 'master', 'br0', 'up')
      run('ip', '-n', pod, 'addr', 'add', f'{ip}/24', 'dev', 'eth0')
      run('ip', '-n', pod, 'link', 'set', 'eth0', 'up')
      run('ip', '-n', pod, 'link', 'set', 'lo', 'up')

  def __exit__(self, *exc):
    for ns in self.pods + [self.node]:
      subprocess.run(['ip', 'netns', 'del', ns], capture_output=True)

  def popen(self, index, hostname, hosts_file, resolv_file, command, **kwargs):
    """Runs `command` in pod `index`'s network namespace with its own /etc/hosts, /etc/resolv.conf
    and host name (bind mounts in a private mount namespace, as the kubelet provides them)."""
    setup = ('mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && '
             'hostname "$3" && shift 3 && exec "$@"')
    return subprocess.Popen(
        ['ip', 'netns', 'exec', self.pods[index], 'unshare', '--mount', '--uts',
         '--propagation', 'private', 'sh', '-c', setup, 'pod', str(hosts_file),
         str(resolv_file), hostname, *command], **kwargs)


def _wait_all(procs, timeout):
  """(returncode, stdout, stderr) of each process; any still running at the deadline is killed
  and reported with returncode None."""
  deadline, outputs = time.time() + timeout, []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=max(1, deadline - time.time()))
      outputs.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
      outputs.append((None, out, err + f'\n[killed after {timeout} s]'))
  return outputs


def _localize(args, settings, data_dir, model_dir):
  """The one change to the rendered args: gs:// paths -> local dirs, preset -> smoke."""
  bucket = settings['BUCKET']
  out = []
  for arg in args:
    flag, _, value = arg.partition('=')
    if flag == '--config':
      arg = '--config=smoke'
    elif flag == '--data_dir':
      assert value == f'{bucket}/camvid/tfrecords' and value.startswith('gs://'), arg
      arg = f'--data_dir={data_dir}'
    elif flag == '--model_dir':
      assert value == f'{bucket}/camvid/runs/{settings["RUN_NAME"]}', arg
      arg = f'--model_dir={model_dir}'
    assert 'gs://' not in arg, f'{arg}: unreplaced gs:// path'
    out.append(arg)
  return out


@pytest.mark.multiprocess
def test_rendered_train_job_forms_a_cluster_in_network_namespaces(smoke_data, tmp_path):
  reason = _netns_unavailable()
  if reason:
    pytest.skip(f'pod simulation in network namespaces: {reason}')
  # The manifests with the worker count set to 2, the way a user sets it (an overlay's settings).
  overlay = _overlay(tmp_path, 'two-workers', 'resources: [{k8s}]\n'
                     'components: [settings, {k8s}/components/settings]\n')
  _settings_component(overlay, {'NUM_WORKERS': '2'})
  objects = _kustomize(overlay)
  settings = {**BASE_SETTINGS, 'NUM_WORKERS': '2'}
  job, service = _train(objects)
  n, name = job['spec']['completions'], job['metadata']['name']
  assert n == 2
  (container,) = job['spec']['template']['spec']['containers']
  # The image: ENTRYPOINT ["python3", "-m"] + the container's args; this interpreter and this
  # checkout stand in for the image's python3 and its installed package.
  entrypoint = container.get('command') or image_entrypoint()
  assert entrypoint[0] == 'python3'
  model_dir = tmp_path / 'model'
  with PodNetwork(n) as network:
    # What cluster DNS answers for the headless Service: <hostname>.<subdomain>[.ns.svc...].
    hosts_lines = ['127.0.0.1 localhost']
    for i, ip in enumerate(network.ips):
      hostname = job_pod(job, i)['spec']['hostname']
      sub = job['spec']['template']['spec']['subdomain']
      hosts_lines.append(f'{ip} {hostname}.{sub}.default.svc.cluster.local {hostname}.{sub}')
    hosts = tmp_path / 'hosts'
    hosts.write_text('\n'.join(hosts_lines) + '\n')
    resolv = tmp_path / 'resolv.conf'
    resolv.write_text('search default.svc.cluster.local svc.cluster.local cluster.local\n')
    procs = []
    for i in range(n):
      pod = job_pod(job, i, pod_ip=network.ips[i])
      pod_env = container_env(pod, container['name'], objects)
      args = _localize(container_args(container, pod_env), settings, smoke_data, model_dir)
      env = {k: v for k, v in os.environ.items() if 'proxy' not in k.lower()}
      env.update(pod_env)
      # A proxy that refuses every connection, as a cluster may inject one: worker-to-worker
      # gRPC only works if the rendered no_proxy keeps it off the proxy.
      env['http_proxy'] = env['https_proxy'] = 'http://127.0.0.1:9'
      env['PYTHONPATH'] = str(REPO)
      procs.append(network.popen(
          i, pod['spec']['hostname'], hosts, resolv,
          [sys.executable, *entrypoint[1:], *args], cwd=tmp_path, env=env,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # A worker that cannot reach its peers is killed by its own watchdog after
    # peer_timeout_seconds (300 s): the deadline only guards against a hang beyond that.
    outputs = _wait_all(procs, timeout=480)
  for i, (rc, out, err) in enumerate(outputs):
    assert rc == 0, f'worker {i}: exit {rc}\n{err[-3000:]}'
    assert f'strategy=multi_worker replicas={n} workers={n} worker_index={i}' in out, out
  assert 'chief=True' in outputs[0][1] and 'chief=False' in outputs[1][1]
  config = json.loads((model_dir / 'config.json').read_text())
  assert config['strategy_used'] == 'multi_worker' and config['num_workers'] == n
  assert (model_dir / 'export' / 'serving' / 'saved_model.pb').exists()
  assert name == 'camvid-train' and service['metadata']['name'] == 'camvid-train'
