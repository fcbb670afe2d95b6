"""Errors that carry a message a person can act on.

The CLI turns every :class:`TansuoError` into its message on stderr and exit code 2 (a usage error: the
input was wrong, not the program). Anything else is a bug and keeps its traceback.
"""


class TansuoError(Exception):
    """Base class: bad input that the user can fix. The message says what is wrong and how to fix it."""


class RecipeError(TansuoError):
    """A recipe field is invalid; the message names the field path, the bad value and what is allowed."""


class DataError(TansuoError):
    """Input data is missing or malformed; the message names the file (and line) and how to fix it."""


class BundleError(TansuoError):
    """A bundle folder is missing, incomplete or from an incompatible version."""


class TrainingDiverged(TansuoError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CompressionError(TansuoError):
    """A compression step cannot run as asked (unsupported model, impossible ratio, missing backend)."""
