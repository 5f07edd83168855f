"""The one exception type for mistakes a user can make (bad file, unknown task, bad flag)."""


class UserError(Exception):
    """A problem with the user's input: the CLI prints its message as one sentence and exits with 2."""
