"""Typed errors whose messages name the problem and the fix."""


class NBLError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback by the CLI."""


class UnsupportedArchitectureError(NBLError):
    pass


class CheckpointError(NBLError):
    pass


class DataError(NBLError):
    pass


class PlanError(NBLError):
    pass


class ConfigError(NBLError):
    pass


class NonFiniteActivationError(NBLError):
    pass
