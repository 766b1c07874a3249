"""The errors a user can cause. The CLI prints these as one line; anything else keeps its traceback.

Every user-facing error subclasses ``SteermoeError``. Nothing else is caught: a shape bug or an
out-of-memory is a programming or capacity problem whose traceback the user (or we) need.
This module imports nothing from the package, so every layer can raise these.
"""

from __future__ import annotations


class SteermoeError(Exception):
    """Bad input: a one-line message that names the file, key or option and what is wrong."""


class UsageError(SteermoeError):
    """A command-line combination that cannot work."""


class TrainingError(SteermoeError):
    """A run that cannot go on (e.g. too many non-finite losses); its last good checkpoint is kept."""


class RecipeError(SteermoeError):
    """A recipe problem, phrased as one line that names the offending key."""


class DataError(SteermoeError):
    """A dataset problem, phrased as one line naming the folder or file."""


class AudioError(SteermoeError):
    """One line naming the audio file and what is wrong with it."""


class SourceError(SteermoeError):
    """A corpus folder for `steermoe prep` that is not laid out as expected."""


class CheckpointError(SteermoeError):
    """One line naming the checkpoint and what is wrong with it."""


class BackboneError(SteermoeError):
    """A backbone (encoder or LLM) that cannot be found or read."""


class DeviceError(SteermoeError):
    """A device or precision the machine cannot provide."""


class ModelNotFound(SteermoeError):
    """No --model, no STEERMOE_MODEL and no demo checkpoint: says how to get one."""


class MissingDependency(SteermoeError):
    """An optional package a feature needs is not installed: says which extra to install."""
