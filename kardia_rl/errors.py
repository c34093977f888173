"""User-facing errors.

Anything a user can cause (a bad config key, a malformed data file, a missing path) raises `KardiaError`
with a message that names the file, line, key or value. The CLI catches it, prints the message and exits
with status 2, so users never see a bare traceback for their own mistakes; programming errors still
raise normally.
"""


class KardiaError(Exception):
    """An error caused by user input; `str(err)` is the complete message shown to the user."""


class ConfigError(KardiaError):
    """Invalid configuration (unknown key, wrong type, failed cross-field rule)."""


class DataError(KardiaError):
    """Invalid or unreadable data file."""
