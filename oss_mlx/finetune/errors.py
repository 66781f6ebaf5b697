"""Fine-tuning's error types (no imports: the CLI's error list reads them without loading the trainer)."""

from __future__ import annotations


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, the line and the fix."""


class TrainError(RuntimeError):
    """A run that cannot start or resume; the message says why and what to do."""
