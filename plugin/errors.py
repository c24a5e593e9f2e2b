"""Errors main.py reports as one line, without a traceback: bad input, a run that diverged, an output that could
not be written, a run stopped on request."""


class ConfigError(ValueError):
    """A parameter, file or dataset the user gave cannot be used; the message names it and says what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops before it can overwrite the last good adapter."""


class OutputError(RuntimeError):
    """A result could not be written (a full disk); the message names the folder, the space needed and free, and
    what was kept."""


class TrainingStopped(RuntimeError):
    """A stop was requested (SIGTERM, SIGINT); a checkpoint and the adapter were written, the run can resume."""
