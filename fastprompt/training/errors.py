"""The errors `fastprompt train` and `fastprompt predict` raise for input they cannot use.

Each message names the argument (`--data`, `--max-length`, ...) and what was expected; the command
line prints it as one line and exits 2. They are raised before anything is written to `--out`.
"""

from __future__ import annotations


class TrainError(Exception):
    """A run cannot start: bad settings, data or model. The message is one line for the user."""


class SettingsError(TrainError, ValueError):
    """A setting (or a combination of settings) is out of range or does not apply."""


class DataError(TrainError, ValueError):
    """The data file cannot be used; the message names the file and the problem."""


class ModelLoadError(TrainError, OSError):
    """The model cannot be loaded, or is not the kind the task needs."""
