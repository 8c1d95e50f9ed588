"""The one exception tokenpak raises for problems a user can fix, and its exit codes.

Everything the CLI cannot do for a reason the user controls (a bad config value, a port
in use, a missing file) is a TokenpakError: `main()` prints it as a single line,
`tokenpak: error: ...`, with a hint, never as a traceback.
"""

import enum


class ExitStatus(enum.IntEnum):
    """Process exit codes, documented in the man page's EXIT STATUS section."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_RUNNING = 3  # `tokenpak status`, as LSB init scripts define it


class TokenpakError(Exception):
    """A failure the user can act on; `hint` says how."""

    def __init__(self, message, hint=None, status=ExitStatus.ERROR):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status

    def __str__(self):
        return self.message
