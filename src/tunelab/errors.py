"""One exception type for every problem a user can fix.

The CLI prints a `TunelabError` as one line and exits non-zero; anything else is a bug and keeps its
traceback. Messages name the file, line or record, what was found and what was expected.
"""


class TunelabError(Exception):
    """A problem with the user's input (config, data, model folder), reported without a traceback."""


class Interrupted(TunelabError):
    """The run stopped on a signal after saving a checkpoint; the CLI exits 130."""
