"""The one exception type a user sees: the CLI prints its message as one line and exits non-zero."""


class FlexDraftError(Exception):
    """A user-facing error: bad input, a missing or corrupt model or drafter, a missing asset."""
