"""Exceptions raised by backend selection."""


class BackendError(RuntimeError):
    """No backend could run the call; the message lists every candidate and why."""


class UnknownBackendError(BackendError, KeyError):
    """A backend name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(BackendError):
    """A backend named explicitly cannot run here (missing package, no device, ...)."""


class UnsupportedInputError(BackendError, ValueError):
    """A backend named explicitly does not support these inputs; the message says why."""
