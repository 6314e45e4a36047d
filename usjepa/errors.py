"""The one exception type for mistakes a user can fix.

The CLI prints these as a single line (what, where, how to fix) instead of a traceback.
"""


class UserError(Exception):
    """Bad input, configuration or environment that the user can correct."""
