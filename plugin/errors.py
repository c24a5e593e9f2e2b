"""Errors main.py reports as one line, without a traceback: bad input, a run that diverged, a run stopped on request."""


class ConfigError(ValueError):
    """A parameter, file or dataset the user gave cannot be used; the message names it and says what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops before it can overwrite the last good adapter."""


class TrainingStopped(RuntimeError):
    """A stop was requested (SIGTERM, SIGINT); a checkpoint and the adapter were written, the run can resume."""
