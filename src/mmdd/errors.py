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
