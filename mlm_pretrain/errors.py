class InputError(Exception):
    """Bad input from the user: the message names the file, line or key at fault.

    The CLI prints it without a traceback and exits with status 2.
    """


class DiskFullError(InputError):
    """A write ran out of disk space: the message names the path, the space free there and about how
    much is needed. Nothing that was complete before the write was changed."""
