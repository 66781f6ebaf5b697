"""On/off settings from the environment (OSS_MLX_COMPILE, OSS_MLX_WARMUP, OSS_MLX_FIXED_SHAPES,
OSS_MLX_HOST_HEAD), read one way. The kernel package reads its own (kernels/cuda_cache.py): it
imports nothing above it."""

from __future__ import annotations

import os

ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")


def env_switch(name: str) -> bool | None:
    """True or False where `name` says so (1/on/true/yes, 0/off/false/no, any case); None where it is
    unset or anything else ("auto"): the caller's own default."""
    value = os.environ.get(name, "").strip().lower()
    return True if value in ON else False if value in OFF else None
