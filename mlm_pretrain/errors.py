class InputError(Exception):
    """Bad input from the user: the message names the file, line or key at fault.

    The CLI prints it without a traceback and exits with status 2.
    """
