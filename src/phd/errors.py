"""The one error family of phd: bad input or state that a user can fix, reported as one line (never a traceback).

Every command catches PHDError and prints its message; the subclasses (ConfigError, DataError, CheckpointError,
TrainConfigError, OutputError...) also derive from ValueError or RuntimeError for callers that catch those.
"""

from __future__ import annotations


class PHDError(Exception):
    """A problem the message explains, naming the file, field or value and the fix."""


class InputError(PHDError, ValueError):
    """Bad input to the API or a command (token ids, devices, numbers); the message names value and range."""
