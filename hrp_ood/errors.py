"""The one exception type the CLI turns into a one-line message (exit code 2)."""


class UserError(Exception):
    """A problem with what the user gave us (a path, a spec, a config value, a checkpoint).

    The message must say what is wrong and how to fix it, in one line.
    """
