"""Errors main.py reports as one line, without a traceback: bad input, and a run that diverged."""


class ConfigError(ValueError):
    """A parameter, file or dataset the user gave cannot be used; the message names it and says what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops before it can overwrite the last good adapter."""
