"""The one exception type for mistakes a user can make (bad file, bad value).

The CLI prints its message as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: one line naming the file, tensor or value at fault."""
