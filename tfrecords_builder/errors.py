"""The one exception type for a user's bad input to the builder.

Entry points catch it and print its message as a single line with a non-zero exit, so a user's
mistake never shows a Python traceback.
"""


class InputError(ValueError):
  """Bad input data or flags; the message names the file or flag and what is wrong."""
