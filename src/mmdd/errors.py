"""User-facing errors.

Anything a user can fix (a missing file, a malformed annotation, a bad override) raises
`MmddError` with a message that says which file/field is wrong and what to do. The CLI prints
these without a traceback; everything else is a bug and keeps its traceback.
"""


class MmddError(Exception):
    """An error caused by input or configuration that the user can fix."""


class DataError(MmddError):
    """A dataset file (annotation, image, caption) is missing or malformed."""


class ArtifactError(MmddError):
    """An artifact on disk (trajectory store, synthetic set, cache) is missing or incompatible."""


class Stopped(MmddError):
    """A run stopped by a signal after saving what it had: not a failure of the input, but not a finished run
    either. The CLI prints the message and exits with the shell's code for the signal (128 + its number: 143 for
    SIGTERM, what SLURM sends at a time limit or preemption; 130 for SIGINT, Ctrl-C)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TrialFailed(Exception):
    """A trial of an Optuna search whose run failed with an MmddError (e.g. a set that diverged at the trial's outer
    learning rate): raised to the sweeper, which records the trial as failed and goes on with the search (the error
    itself is printed as any stage's is). Not an MmddError: a single run still exits with its clear message."""
