"""The exception types the tool raises for problems with its inputs.

The CLI turns a `TwaError` into a single line on stderr and exit code 1; anything else is a bug and keeps its
traceback.
"""


class TwaError(Exception):
    """A problem with the user's input (a file, a folder, a flag), explained in one line."""


class Diverged(TwaError):
    """Training produced a NaN or Inf loss, weight or statistic."""
