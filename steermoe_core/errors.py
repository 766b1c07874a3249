"""The errors a user can cause, which the CLI prints as one line instead of a traceback."""

from __future__ import annotations


class UsageError(ValueError):
    """A command-line combination that cannot work."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .audio import AudioError
    from .checkpoint import CheckpointError
    from .config import RecipeError
    from .data import DataError
    from .prep.sources import SourceError

    return (UsageError, RecipeError, DataError, CheckpointError, AudioError, SourceError, FileNotFoundError, NotImplementedError, RuntimeError, ValueError)


USER_ERRORS = _user_errors()
