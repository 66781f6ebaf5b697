"""Metal kernels executed on the CPU: a drop-in for mx.fast.metal_kernel.

Nobody on this project has a Mac. This package runs the Metal text of a kernel (what
`kernel_sources("metal")` returns, assembled exactly as MLX's metal_kernel assembles it: source.py)
compiled by clang against a runnable Metal shim (shim.h) into a shared library (build.py), launched
over the grid with Metal's semantics (runtime.cpp): the threads of a threadgroup run as cooperative
fibers, so barriers wait for every thread, simdgroup functions exchange values among the 32 lanes,
simdgroup matrices use the lane layout of Apple GPUs, threadgroup memory starts as garbage, atomics
interleave. What it cannot model is in docs/KERNELS.md ("The Metal emulator").

    from metal_emulator import EMULATOR
    with kernels.emulated("metal", EMULATOR.metal_kernel):
        ...  # the kernel layer launches the Metal kernels here, on the CPU
"""

import os

from .build import BuildError, unavailable
from .launch import LAUNCHES, Emulator, MetalEmulatorError

# The tests' emulator. OSS_MLX_METAL_EMULATOR_SCHEDULE (shuffle | forward | reverse) and _SEED pick
# other interleavings of the same kernels (shuffle, seed 0 in CI).
EMULATOR = Emulator(
    schedule=os.environ.get("OSS_MLX_METAL_EMULATOR_SCHEDULE", "shuffle"),
    seed=int(os.environ.get("OSS_MLX_METAL_EMULATOR_SEED", "0")),
)

__all__ = ["BuildError", "EMULATOR", "Emulator", "LAUNCHES", "MetalEmulatorError", "unavailable"]
