"""Errors main.py reports as one line, without a traceback, each with its exit code: bad input, a run that
diverged, evaluation images that could not be rendered, an output that could not be written, a run stopped
on request."""


class ConfigError(ValueError):
    """A parameter, file or dataset the user gave cannot be used; the message names it and says what was expected."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops before it can overwrite the last good adapter."""

    exit_code = 1


class EvaluationFailed(RuntimeError):
    """The evaluation images could not be rendered; the adapter of that step was saved first."""

    exit_code = 1


class OutputError(RuntimeError):
    """A result could not be written (a full disk); the message names the folder, the space needed and free, and
    what was kept."""

    exit_code = 74  # EX_IOERR from sysexits.h


class TrainingStopped(RuntimeError):
    """A stop was requested (SIGTERM, SIGINT); a checkpoint and the adapter were written, the run can resume."""


ONE_LINE_ERRORS = (ConfigError, TrainingDiverged, EvaluationFailed, OutputError)
