"""The error types a command prints as one line: a model that cannot be loaded (config, checkpoint,
tokenizer), a memory budget that cannot hold it, an adapter or LoRA setting that does not fit it.

Its message names what is wrong, where (file, tensor or key) and the fix, in one line, so a command
prints it as is, without a traceback: `except LoadError as e: print(e)`.
"""

from __future__ import annotations


class LoadError(Exception):
    """A model folder, hub id, config.json, checkpoint or vocabulary that cannot be loaded."""


class CheckpointError(LoadError, ValueError):
    """A checkpoint folder that cannot be loaded; the message says what and how to fix it."""


class ConvertError(RuntimeError):
    """A conversion (`oss-mlx convert`) that cannot proceed; the message says why and what to do."""


class MemoryBudgetError(ValueError):
    """A memory budget that cannot hold the model even when streaming its experts."""


class LoRAError(ValueError):
    """A LoRA setting or adapter that does not fit the model; the message says what and how to fix it."""
