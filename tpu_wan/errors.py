"""The base of every error a user can cause (bad flags, files, model folders, meshes).

Scripts turn a UserError into one line on stderr and its exit status (2: bad input; 3: a compile-only run
whose programs do not fit the slice); anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input; the message says what was expected and what was found."""

    exit_status = 2


class AttentionError(UserError):
    """An attention setting, or a choice the platform or the shapes cannot serve."""


class UsageError(UserError):
    """A flag argparse refused, or a flag value out of range."""
