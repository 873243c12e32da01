"""Errors the CLI reports as one message, no traceback: the user's input (exit code 2), and workers that lost each
other (exit code 75)."""


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and how to fix it."""


class RecipeError(UserError):
    """A recipe or an override is wrong."""


class DataError(UserError):
    """Input data is missing, unreadable or not what the recipe says."""


class CheckpointError(UserError):
    """No usable checkpoint or model file (missing, corrupt or incompatible)."""


class TrainingError(UserError):
    """Training cannot go on as configured (e.g. the loss became NaN)."""


class ClusterError(Exception):
    """Workers lost each other: a worker, its host or the network between hosts failed. Every surviving worker
    says so, and the CLI exits with code 75 (EX_TEMPFAIL: go on with --resume once the hosts are back)."""

    exit_code = 75
