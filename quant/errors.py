"""User-facing errors.

Anything a user can cause (a bad model, input, file or option) raises `BitsearchError` with a message that
says what is wrong and what to do; the CLI prints it without a traceback and the service maps it to a 4xx.
"""


class BitsearchError(Exception):
    """An error caused by the user's input, with a message meant for them."""
