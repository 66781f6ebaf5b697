"""The one error type of a model that cannot be loaded (config, checkpoint, tokenizer), and LoRAError
(an adapter or LoRA setting that does not fit the model; lora.py, adapters.py).

Its message names what is wrong, where (file, tensor or key) and the fix, in one line, so a command
prints it as is, without a traceback: `except LoadError as e: print(e)`.
"""

from __future__ import annotations


class LoadError(Exception):
    """A model folder, hub id, config.json, checkpoint or vocabulary that cannot be loaded."""


class LoRAError(ValueError):
    """A LoRA setting or adapter that does not fit the model; the message says what and how to fix it."""
