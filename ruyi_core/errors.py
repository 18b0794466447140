"""User-facing errors: the CLI prints them as one line (no traceback) and exits non-zero."""


class RuyiError(Exception):
    """A problem the user can fix; the message names it and the fix."""


class SpecError(RuyiError):
    """The run spec is invalid."""


class CorruptDataError(RuyiError):
    """A stored input (a packed shard, a manifest, a config) is truncated or damaged: not a bug in the code. The
    message names the file and how to rebuild it."""
