"""Errors the engine raises for problems a user can fix; their messages say what was wrong and what to do."""


class RAError(Exception):
    """Base class of the engine's user-facing errors."""


class DataError(RAError, ValueError):
    """An input image, mask or data source cannot be used as given."""


class ModelError(RAError):
    """A model directory or checkpoint is missing, corrupt, tampered with, or does not fit the request."""


class Cancelled(RAError):
    """A long job stopped because its progress callback asked it to; nothing half-made was left behind."""


def error_text(error: BaseException) -> str:
    """The last non-empty line of an exception's message (ITK's are long traces), or its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
