"""The one exception type for mistakes a user can make (bad file, unknown task, bad flag)."""


class UserError(ValueError):
    """A problem with the user's input: the CLI prints its message as one sentence and exits with 2; in
    Python, a `ValueError`, as the Trainer's own checks raise."""


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite (exit code 1: not bad input, a bad run)."""
