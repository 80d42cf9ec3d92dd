"""Errors raised for bad input anywhere in the project.

Every user-facing failure is an :class:`AnomalyError` whose message follows the Keras style
"expected X. Received: Y" and, where there is one, says how to fix it. The CLI turns it into one
line on stderr and a non-zero exit; the service turns it into a 4xx JSON error.
"""

from __future__ import annotations


class AnomalyError(ValueError):
    """A problem with the caller's input (flag, file, config, request body or artifact)."""

    #: Suggested HTTP status when the error reaches the service.
    status_code: int = 422

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message.rstrip('.')}. {hint}" if hint else message)


class DataError(AnomalyError):
    """Images, labels or data files that cannot be used."""


class ConfigError(AnomalyError):
    """A configuration value, flag or YAML file that is not valid."""


class ArtifactError(AnomalyError):
    """A model artifact that is missing, incomplete, tampered with or of an unknown format."""

    status_code = 500


class NotInstalledError(AnomalyError):
    """A package of an extra that is not installed (see :mod:`anomaly.extras`)."""

    status_code = 500


class NotFoundError(AnomalyError):
    """A named thing (model, version, data set, operating point) that does not exist."""

    status_code = 404


def expected(what: str, received: object, hint: str | None = None, cls: type = AnomalyError):
    """Build an error in the project's one message style.

    >>> str(expected("a class in 0..9", 10))
    'Expected a class in 0..9. Received: 10'
    """
    return cls(f"Expected {what}. Received: {received}", hint=hint)
