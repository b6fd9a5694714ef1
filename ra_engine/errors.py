"""Errors the engine raises for problems a user can fix; their messages say what was wrong and what to do."""


class RAError(Exception):
    """Base class of the engine's user-facing errors."""


class DataError(RAError, ValueError):
    """An input image, mask or data source cannot be used as given."""


class ModelError(RAError):
    """A model directory or checkpoint is missing, corrupt, tampered with, or does not fit the request."""


class Cancelled(RAError):
    """A long job stopped because its progress callback asked it to; nothing half-made was left behind."""
