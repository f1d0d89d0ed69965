"""The one exception the stages' command line turns into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user (params, paths, data): reported as one line, exit code 2. The
    message names what is wrong (the file, the key, the valid values) and how to put it right."""
