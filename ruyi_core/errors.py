"""User-facing errors: the CLI prints them as one line (no traceback) and exits non-zero."""


class RuyiError(Exception):
    """A problem the user can fix; the message names it and the fix."""


class SpecError(RuyiError):
    """The run spec is invalid."""
