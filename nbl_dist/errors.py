"""Typed errors whose messages name the problem and the fix. Every error nbl-dist raises on purpose is here."""


class NBLError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback by the CLI."""


class UnsupportedArchitectureError(NBLError):
    pass


class CheckpointError(NBLError):
    """The model folder, the output folder or a statistics snapshot cannot be used as it is."""


class DataError(NBLError):
    pass


class PlanError(NBLError):
    pass


class ConfigError(NBLError):
    pass


class NonFiniteActivationError(NBLError):
    pass


class FactorizationError(NBLError, RuntimeError):
    """A covariance could not be factored even with the largest ridge of the ladder (docs/method.md §7)."""


class RayStartError(NBLError):
    """No Ray cluster could be reached or started, or it cannot place the actors."""


class MissingExtraError(NBLError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class WorkerLostError(NBLError):
    """Actors died more often than --max-restarts allows."""


def one_line(message: str) -> str:
    """A message on one line (a log reader greps for the 'nbl-dist: error:' line)."""
    return " ".join(line.strip() for line in message.splitlines())
