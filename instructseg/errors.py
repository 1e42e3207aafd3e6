"""The one error type users see: a single line naming the file or argument and what is wrong."""


class InputError(Exception):
    """Bad user input (a file, an argument, a dataset layout). The CLI prints it as one line and exits 2."""


class FrameLimitError(InputError):
    """A video with more frames than the caller accepts, found while counting them (before decoding the rest)."""
