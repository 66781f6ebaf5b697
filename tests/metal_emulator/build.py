"""Compiling a kernel's C++ translation unit into a shared library, cached by content.

clang comes from the `ziglang` package (the test extra). A kernel is compiled with the shim
(shim.h, included first as MLX's prelude is) and linked with the runtime (runtime.cpp, compiled
once); libraries are cached under a directory named by the hash of everything that goes into them
(the source, the shim, the runtime, the flags, the compiler), so a test run compiles each distinct
kernel instantiation once, and later runs none.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM, ABI, RUNTIME = HERE / "shim.h", HERE / "abi.h", HERE / "runtime.cpp"
CACHE_ENV = "OSS_MLX_METAL_EMULATOR_CACHE"

FLAGS = [
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-mcpu=x86_64_v2",  # the same code on every machine (native AVX-512 BF16 conversions flush denormals)
    "-fvisibility=hidden",
    "-fno-exceptions",
    "-fno-rtti",
    "-nostdlib++",  # nothing of the C++ library is used: zig need not build it
    # 16-bit floats round after every operation, as Metal's half and bfloat do
    "-Xclang",
    "-ffloat16-excess-precision=none",
    "-Xclang",
    "-fbfloat16-excess-precision=none",
    "-ffp-contract=off",  # a * b + c stays two roundings unless the source says fma
    "-Werror",
    "-Wno-unknown-attributes",  # [[kernel]], [[buffer(i)]], [[thread_position_in_grid]], ...
    "-Wno-unused-command-line-argument",
]


class BuildError(RuntimeError):
    """The kernel did not compile (the message holds the compiler's diagnostics)."""


def unavailable() -> str | None:
    """Why kernels cannot be emulated on this machine (None: they can)."""
    if importlib.util.find_spec("ziglang") is None:
        return "clang comes from the `ziglang` package (the test extra)"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"the emulator's fibers are written for x86-64 Linux (not {sys.platform} {platform.machine()})"
    return None


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "oss-mlx", "metal-emulator"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def _compiler_id() -> str:
    import ziglang

    return f"ziglang {getattr(ziglang, '__version__', '?')} {Path(ziglang.__file__).parent}"


def _zig(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ziglang", "c++", *FLAGS, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in (*parts, *FLAGS, _compiler_id()):
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _publish(tmp: Path, final: Path) -> Path:
    os.replace(tmp, final)  # atomic: a concurrent run sees the old file or the whole new one
    return final


@functools.cache
def runtime_object() -> Path:
    """runtime.cpp compiled once (cached like the kernels)."""
    key = _digest(RUNTIME.read_text(), ABI.read_text())
    out = cache_dir() / f"runtime-{key}.o"
    if not out.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            obj = Path(tmp) / "runtime.o"
            result = _zig(["-c", "-I", str(HERE), str(RUNTIME), "-o", str(obj)])
            if result.returncode != 0:
                raise BuildError(f"the emulator's runtime did not compile:\n{result.stderr[-6000:]}")
            _publish(obj, out)
    return out


@functools.cache
def _inputs_text() -> tuple[str, str]:
    return SHIM.read_text(), ABI.read_text()


@functools.cache
def library(cpp: str) -> Path:
    """The shared library of one translation unit (compiled now, or from the cache)."""
    runtime = runtime_object()
    key = _digest(cpp, *_inputs_text(), runtime.name)
    out = cache_dir() / f"kernel-{key}.so"
    if out.exists():
        library_counts["cached"] += 1
        return out
    library_counts["compiled"] += 1
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        src = Path(tmp) / "kernel.cpp"
        src.write_text(cpp)
        so = Path(tmp) / "kernel.so"
        args = ["-shared", "-I", str(HERE), "-include", str(SHIM), str(src), str(runtime), "-o", str(so)]
        result = _zig(args + ["-Wl,-Bsymbolic", "-lm"])
        if result.returncode != 0:
            raise BuildError(f"Unable to build the kernel (clang, Metal shim):\n{result.stderr[-6000:]}")
        return _publish(so, out)


library_counts = {"compiled": 0, "cached": 0}  # distinct libraries this process


def compile_errors(cpp: str) -> str | None:
    """The compiler's diagnostics for a translation unit that must not build, or None if it builds."""
    try:
        library(cpp)
    except BuildError as e:
        return str(e)
    return None
