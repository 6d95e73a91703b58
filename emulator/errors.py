"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class UserError(Exception):
    """Bad input or an impossible request: the message says what is wrong and how to fix it."""


class TraceError(UserError, ValueError):
    """A trace file is malformed; the message names the file, row and column."""


class LayoutError(UserError, ValueError):
    """A parallel layout does not fit the model or hardware; the message names the field and
    what would fit."""


class ConfigError(UserError, ValueError):
    """A run configuration is invalid."""


class RunError(Exception):
    """A run failed at execution time (a dead rank, a collective that timed out). Records of
    finished work are flushed before it is raised."""
