"""The one exception type a user sees: a problem with their input, and how to fix it.

`rlhf-dist` prints a `UserError` as a single line (`error: ...`) and exits with status 2, before
any model is loaded and without touching the run directory. Everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input (config, data, paths). The message names the file/key/row and the fix."""


class ConfigError(UserError):
    """A recipe or command-line override that does not fit the typed config."""


class DataError(UserError):
    """A dataset that is missing, or a row that does not have the expected fields."""


class RunDirError(UserError):
    """An output directory that would be clobbered."""


class StageStopped(Exception):
    """A stage that ended early on purpose (a guardrail): the one-line message, its exit status, the files that
    explain it (for the run's exit note)."""

    def __init__(self, message: str, status: int, **files):
        super().__init__(message)
        self.status, self.files = status, files
