"""Helpers every camvid-seg entry point and package shares: the user-error type and CLI runner,
atomic file writes and gs:// checks, the HxW size parser, the quiet TensorFlow start-up.

errors.py: InputError (and its ConfigError), the exit codes, and `run_app`, which runs an absl
main so that a user's mistake is one `error: <flag or file>: <problem>` line and exit 2.
fileio.py: writes that readers never see half done, and the up-front gs:// bucket check.
sizes.py: `parse_hxw`, the one parser of HxW size flags.
quiet.py: `start()`, the first call of every entry point: hides TensorFlow's C++ start-up
log unless `--verbose`, the flag it defines for absl and argparse programs alike.

Nothing here imports TensorFlow at package import time (fileio.py does, when imported), so the
TensorFlow-free synthetic-scene generator can use errors.py and sizes.py.
"""
