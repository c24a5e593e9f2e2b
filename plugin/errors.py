"""The one exception type for bad user input: caught by main.py and printed without a traceback."""


class ConfigError(ValueError):
    """A parameter, file or dataset the user gave cannot be used; the message names it and says what was expected."""
