"""The one exception type the CLI turns into a one-line message (exit code 2)."""


class UserError(Exception):
    """A problem with what the user gave us (a path, a spec, a config value, a checkpoint).

    The message must say what is wrong and how to fix it, in one line.
    """


class Interrupted(Exception):
    """A run stopped on SIGINT/SIGTERM after saving its state; the message says how to resume."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
