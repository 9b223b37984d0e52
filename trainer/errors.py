"""Exit codes and the error type for a user's configuration or data mistakes.

A Kubernetes podFailurePolicy keys on the exit code: a configuration or data error fails the Job
at once (retrying cannot help), a preemption (SIGTERM) exits with a retryable code after saving.
"""

from tfrecords_builder.errors import InputError

EXIT_CONFIG_ERROR = 2  # Bad flags, config, TF_CONFIG or data: do not retry.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM received, checkpoint saved, rerun to continue.
# A worker that cannot form the cluster within peer_timeout_seconds is killed by its watchdog
# (SIGKILL, exit 137 in a container): counted as an ordinary, retryable failure.


class ConfigError(InputError):
  """A configuration mistake (flags, presets, hparams, cluster spec); message names the source."""

