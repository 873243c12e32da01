"""Errors caused by the user's input. The CLI prints their message (no traceback) and exits with code 2."""


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
