"""The one exception type for user mistakes: bad files, bad models, bad samples.

Front ends (the CLI, the grid) turn it into a one-line message; anything else is a bug and keeps
its traceback.
"""


class BadInputError(ValueError):
    """Input that cannot be used, with a message naming the file, field or value at fault."""
