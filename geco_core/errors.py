"""Errors a user can cause: the CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations

__all__ = ["GecoError", "ConfigError", "DataError", "CheckpointError", "RunFolderError", "NonFiniteConstraintError"]


class GecoError(Exception):
    """Base of every error that is the user's input, not a bug."""


class ConfigError(GecoError, ValueError):
    """A configuration key or value is wrong; the message names it."""


class DataError(GecoError, FileNotFoundError):
    """Dataset files are missing or unreadable; the message says which files go where."""


class CheckpointError(GecoError):
    """A checkpoint or run folder cannot be read (missing, truncated, or from an incompatible run)."""


class RunFolderError(GecoError):
    """A run folder cannot be made, opened or locked (a missing folder, a file in the way, a second
    process training in it); the message names the path."""


class NonFiniteConstraintError(GecoError, FloatingPointError):
    """A constraint value was NaN or infinite and GECO runs in strict mode."""
