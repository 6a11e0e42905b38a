"""The one exception type users see: its message is a single line saying what is wrong and what to do."""


class MpkError(Exception):
    """A user-facing error. The CLI prints `mpk: error: <message>` and exits non-zero, no traceback."""
