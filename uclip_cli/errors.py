"""Every error a user can fix derives from UclipError; the CLI prints its message as one line."""


class UclipError(Exception):
    """An error with a one-line message that names the file or argument and what to do."""
