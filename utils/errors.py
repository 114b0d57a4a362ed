"""The exceptions that entry points turn into an exit code instead of a traceback.

`UserError` is the base of every error caused by what the user gave us (a config
value, a dataset on disk, a checkpoint, the machine's devices) rather than by a
bug: its message names the file, key or value and says what to do, so the
scripts print it as one `error: ...` line and exit 1. Each concern keeps its own
subclass next to its code (ConfigError, DatasetError, CheckpointError, ...).

`UserInputWarning` is the base of warnings about what the user gave that is valid
but probably not what was meant: like a UserError's, its message names the key or
value, so it is logged without the line of code that raised it.

`StopRequested` is not an error: SIGTERM or SIGINT asked a training run to stop,
and it saved a resumable state first. The scripts exit with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed by
that signal, so a scheduler records the run as interrupted, not completed.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input whose message already says what to fix; no traceback is needed."""


class UserInputWarning(UserWarning):
    """A valid input that probably does not do what was meant; the message says why."""


class StopRequested(Exception):
    """A stop signal arrived; the trainer saved last.pth and stops."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
