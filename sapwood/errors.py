"""The one error type users see. A leaf module: it imports nothing from sapwood."""


class SapwoodError(Exception):
    """A user-facing error: one line naming the bad value and what is allowed.

    The CLI prints it without a traceback and exits with code 2; the server maps it to a 4xx.
    """


class ConfigError(SapwoodError):
    """An invalid configuration value, file or preset name."""


class SapwoodWarning(UserWarning):
    """A warning meant for the user (shown by the CLI; third-party warnings are shown only with --verbose)."""
