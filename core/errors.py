"""The one exception type the command line turns into a clean message (no traceback).

Raise `MedtuneError` for problems with user input (files, flags, data): the message must say
what is wrong, where (file:line, field, value) and how to fix it.
"""


class MedtuneError(Exception):
    """A user-facing error: its message is printed as-is and the command exits non-zero."""
