"""The one exception type users see.

Anything raised as `QwenError` is a problem with the user's input or environment (a missing file, a bad
flag, an unsupported checkpoint). The CLI prints its message as one line on stderr and exits non-zero;
every other exception is a bug and keeps its traceback.
"""


class QwenError(Exception):
    """A user-facing error: its message is printed as is, without a traceback."""
