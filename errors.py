"""The errors a user can cause, each said in one line with its exit code (stopping.launch prints them):
2 bad input, 1 a run that cannot go on, 3 divergence, 0 nothing left to do."""
import sys


class UsageError(Exception):
    """A user-facing, one-line error: bad flag values, a wrong checkpoint, missing data (exit code 2)."""


class RunFailure(Exception):
    """A run that cannot go on, said in one line: a full or read-only disk (exit code 1), or
    training that diverged (exit code 3, so that a job scheduler can tell it apart)."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class RunComplete(Exception):
    """--resume auto found a run that has already trained every epoch: nothing to do (exit code 0).
    `checkpoint`: the complete run's last.pt, from which a missing results.json is written."""

    def __init__(self, message, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint


def fail(message, code=2):
    """Print `error: message` on one line to stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
