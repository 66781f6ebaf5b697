"""The machine a model runs on: its GPU memory budget, and the run-time settings that follow from it
(the Metal wired limit, the prefill chunk).

A machine's budget is the GPU working set: on a Mac, Metal's recommended working set (read from MLX
when it runs there; otherwise ~2/3 of RAM up to 36 GB and ~3/4 above: an approximation), which
`sudo sysctl iogpu.wired_limit_mb=N` raises; on Linux the total RAM.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

GiB = 1 << 30
MiB = 1 << 20


def mac_working_set(ram_bytes: int) -> int:
    """Approximate Metal recommended working set of a Mac with this much RAM (no Mac at hand).

    ~2/3 of RAM up to 36 GB, ~3/4 above: an approximation of what macOS reports (Apple does not
    document the rule); `Machine.detect()` reads the real value from MLX on a Mac.
    """
    return ram_bytes * 2 // 3 if ram_bytes <= 36 * GiB else ram_bytes * 3 // 4


def wired_limit_cap(ram_bytes: int) -> int:
    """The most we suggest wiring for the GPU: leave max(3 GiB, 1/8 of RAM) to macOS."""
    return ram_bytes - max(3 * GiB, ram_bytes // 8)


@dataclass(frozen=True)
class Machine:
    ram_bytes: int
    working_set_bytes: int
    platform: str  # "mac" | "linux" | "other"
    how: str  # where the working set comes from, in words

    @classmethod
    def of_size(cls, gib: float, platform: str = "mac") -> Machine:
        ram = int(gib * GiB)
        if platform == "mac":
            ws = mac_working_set(ram)
            frac = "2/3" if ram <= 36 * GiB else "3/4"
            return cls(ram, ws, "mac", f"a {gib:g} GB Mac: working set ~{frac} of RAM (approximation)")
        return cls(ram, ram, platform, f"a {gib:g} GB {platform} machine: all RAM")

    @classmethod
    def detect(cls) -> Machine:
        override = os.environ.get("OSS_MLX_MEMORY_GB", "").strip()
        if override:  # plan as if the GPU budget were this size (a smaller share, or another machine)
            from .cli_args import MEMORY_GB, env_number

            b = int(env_number("OSS_MLX_MEMORY_GB", MEMORY_GB, hint="GB, e.g. 16") * 1e9)
            return cls(b, b, "mac" if sys.platform == "darwin" else "linux", f"OSS_MLX_MEMORY_GB={override}")
        ram = _total_ram()
        if sys.platform == "darwin":
            ws = _metal_working_set()
            if ws:
                return cls(ram, ws, "mac", "this Mac: Metal's recommended working set")
            return cls(ram, mac_working_set(ram), "mac", "this Mac: ~2/3-3/4 of RAM (Metal not available)")
        if sys.platform.startswith("linux"):
            return cls(ram, ram, "linux", "this machine: MemTotal in /proc/meminfo")
        return cls(ram, ram, "other", "this machine: total RAM")


# What a prefill chunk of this many tokens transiently takes beyond weights and KV cache: far above the
# intermediates' arithmetic (activation_bytes), for library workspaces and the MoE's gathered rows.
# Measured on MLX-CUDA and assumed the same on Metal (docs/MEMORY.md, "Measured on the GPU machine").
PREFILL_TRANSIENT = {2048: 9 * 10**9, 512: 4 * 10**9}


def prefill_chunk_for(resident_bytes: int, kv: int, working_set: int) -> int:
    """The prefill chunk to use: 2,048 tokens (fastest) when the machine has room for its transient
    memory beside the weights and the KV cache (8k context), else 512: a lower peak for a slower long
    prefill (the trade, measured: docs/MEMORY.md)."""
    for step in sorted(PREFILL_TRANSIENT, reverse=True):
        if resident_bytes + kv + PREFILL_TRANSIENT[step] <= working_set:
            return step
    return min(PREFILL_TRANSIENT)


def wire_weights(weight_bytes: int) -> int | None:
    """On Metal, keep the weights wired (resident, never paged out) up to the recommended working
    set: macOS otherwise may evict and re-read GPU buffers mid-generation. Returns the limit set,
    or None where there is no such limit (CPU, CUDA)."""
    import mlx.core as mx

    ws = _metal_working_set()
    if not ws:
        return None
    limit = min(weight_bytes + GiB, ws)
    mx.set_wired_limit(limit)
    return limit


def _total_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _metal_working_set() -> int | None:
    try:
        import mlx.core as mx

        metal = getattr(mx, "metal", None)
        if metal is None or not metal.is_available():
            return None
        info = mx.device_info() if hasattr(mx, "device_info") else metal.device_info()
        return int(info["max_recommended_working_set_size"]) or None
    except Exception:  # any MLX build or API difference: fall back to the approximation
        return None
