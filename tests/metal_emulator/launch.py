"""mx.fast.metal_kernel on the CPU: the factory, the launch, the arrays in and out.

A launch runs eagerly: the inputs are evaluated, copied into buffers with guard pages (made
row-contiguous first where the kernel asks for it, as MLX copies them; otherwise with their own
strides, only the span the view covers), the outputs are filled with init_value or a garbage pattern
(MLX leaves them uninitialised), the kernel runs to completion (runtime.cpp), and the outputs come
back as new arrays. So it cannot run inside mx.compile (there is no primitive to trace).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import zlib
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from . import build, source

# What a threadgroup gets on Apple GPUs (M1-M4): 32 KB of threadgroup memory, 1,024 threads (MLX
# checks maxTotalThreadsPerThreadgroup, which the real compiler may lower for a register-heavy kernel).
THREADGROUP_MEMORY = 32 * 1024
MAX_THREADS = 1024
GARBAGE = 0x7FFFFFFF  # as a float: NaN; as an int: huge
SCHEDULES = {"forward": 0, "reverse": 1, "shuffle": 2}

# Every launch through any emulator in this process, by kernel name (the tests' summary reads it).
LAUNCHES: collections.Counter = collections.Counter()


class MetalEmulatorError(RuntimeError):
    """A kernel failed in the emulator: a Metal rule broken, an invalid access, a timeout."""


class _Launch(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_int64 * 3),
        ("threadgroup", ctypes.c_int64 * 3),
        ("schedule", ctypes.c_int64),
        ("seed", ctypes.c_uint64),
        ("cpu_seconds", ctypes.c_double),
        ("max_threads", ctypes.c_int64),
        ("threadgroup_memory", ctypes.c_int64),
        ("garbage", ctypes.c_uint32),
        ("stacks", ctypes.c_void_p),
    ]


class _Result(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_int32),
        ("signal", ctypes.c_int32),
        ("fault_address", ctypes.c_uint64),
        ("where", ctypes.c_int32 * 6),
        ("threadgroup_memory", ctypes.c_int64),
        ("message", ctypes.c_char * 2048),
    ]


_SIGNALS = {
    4: "SIGILL (illegal instruction)",
    7: "SIGBUS",
    8: "SIGFPE (integer division by zero?)",
    11: "SIGSEGV",
}


@functools.cache
def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.oss_launch.argtypes = [
        ctypes.POINTER(_Launch),
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(_Result),
    ]
    lib.oss_launch.restype = None
    lib.oss_alloc.argtypes = [
        ctypes.c_uint64,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_uint64),
    ]
    lib.oss_alloc.restype = ctypes.c_void_p
    lib.oss_free.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.oss_free.restype = None
    lib.oss_threadgroup_bytes.argtypes = []
    lib.oss_threadgroup_bytes.restype = ctypes.c_int64
    lib.oss_make_stacks.argtypes = []
    lib.oss_make_stacks.restype = ctypes.c_void_p
    return lib


_stacks: list[int] = []  # the fibers' stacks, one set for every library of the process


def _stacks_from(lib: ctypes.CDLL) -> int:
    if not _stacks:
        ptr = lib.oss_make_stacks()
        if not ptr:
            raise MemoryError("metal emulator: no memory for the fibers' stacks")
        _stacks.append(ptr)
    return _stacks[0]


def _host(a: mx.array) -> np.ndarray:
    """A zero-copy NumPy view of an evaluated array, with its strides (bfloat16 as its bits)."""
    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


class _Buffers:
    """Guarded buffers for one launch, freed together; labels for fault messages."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib, self.pointers, self.regions, self.labels = lib, [], [], []

    def add(self, nbytes: int, label: str, data: np.ndarray | None = None, offset: int = 0) -> int:
        base, size = ctypes.c_void_p(), ctypes.c_uint64()
        ptr = self.lib.oss_alloc(max(nbytes, 0), ctypes.byref(base), ctypes.byref(size))
        if not ptr:
            raise MemoryError(f"metal emulator: no memory for {label} ({nbytes} bytes)")
        self.regions.append((base.value, size.value))
        if data is not None and nbytes:
            ctypes.memmove(ptr, data.ctypes.data + offset, nbytes)
        self.pointers.append(ptr + (-offset if data is not None else 0))
        self.labels.append((label, ptr, nbytes))
        return ptr

    def describe(self, address: int) -> str:
        for label, start, nbytes in self.labels:
            if start - 4096 <= address < start:
                return f"{start - address} bytes before the start of {label} ({nbytes} bytes)"
            if start + nbytes <= address < start + nbytes + 4096 + 16:
                return f"{address - start - nbytes} bytes past the end of {label} ({nbytes} bytes)"
        return "not in or next to any buffer (a wild index, or a thread's stack overflowed)"

    def free(self) -> None:
        for base, size in self.regions:
            self.lib.oss_free(base, size)
        self.regions.clear()


class EmulatedKernel:
    """What mx.fast.metal_kernel returns, run on the CPU."""

    def __init__(self, emulator: Emulator, kernel: source.Kernel, ensure_row_contiguous: bool):
        self.emulator, self.kernel, self.ensure_row_contiguous = emulator, kernel, ensure_row_contiguous

    def __call__(
        self,
        *,
        inputs: Sequence,
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        template: Sequence[source.TemplateArg] | None = None,
        init_value: float | None = None,
        verbose: bool = False,
        stream=None,  # accepted as MLX does; the emulator runs on the CPU, eagerly
    ) -> list[mx.array]:
        k = self.kernel
        for what, got, want in (
            ("inputs", len(inputs), len(k.input_names)),
            ("output_shapes", len(output_shapes), len(k.output_names)),
            ("output_dtypes", len(output_dtypes), len(k.output_names)),
        ):
            if got != want:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {want} but got size {got}.")
        arrays = [a if isinstance(a, mx.array) else mx.array(a) for a in inputs]
        mx.eval(*arrays)
        inst = source.Instance(
            template=tuple((n, v) for n, v in (template or ())),
            inputs=tuple(source.Input(source.type_string(a.dtype), a.ndim, a.size) for a in arrays),
            output_types=tuple(source.type_string(d) for d in output_dtypes),
        )
        if verbose:
            print(f"Generated source code for `{k.name}`:\n```\n{source.mlx_source(k, inst)}\n```")
        lib = load(str(build.library(source.cpp_source(k, inst))))
        outputs = self.emulator._run(lib, k, inst, arrays, output_shapes, output_dtypes, grid, threadgroup,
                                     init_value, self.ensure_row_contiguous)  # fmt: skip
        LAUNCHES[k.name] += 1
        self.emulator.launches[k.name] += 1
        return outputs


class Emulator:
    """A stand-in for mx.fast.metal_kernel (`metal_kernel`, same signature) that runs kernels on the
    CPU. schedule: the order threads start and resume in (shuffle: seeded per launch and threadgroup;
    forward; reverse). cpu_seconds: a launch's budget (an endless loop becomes an error)."""

    def __init__(self, schedule: str = "shuffle", seed: int = 0, cpu_seconds: float = 300.0):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: one of {sorted(SCHEDULES)} (not {schedule!r})")
        self.schedule, self.seed, self.cpu_seconds = schedule, seed, cpu_seconds
        self.launches: collections.Counter = collections.Counter()

    def metal_kernel(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        compile_options: dict | None = None,  # math mode: the emulator's math is the same in all three
    ) -> EmulatedKernel:
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        k = _kernel(name, tuple(input_names), tuple(output_names), source, header, atomic_outputs)
        return EmulatedKernel(self, k, ensure_row_contiguous)

    def _run(
        self, lib, k, inst, arrays, output_shapes, output_dtypes, grid, threadgroup, init_value, contiguous
    ):
        buffers = _Buffers(lib)
        try:
            keep = []  # host views must outlive the copies
            for name, info, a in zip(
                k.input_names, source.shape_infos(k.source, list(k.input_names)), arrays
            ):
                host = _host(a)
                if contiguous and not host.flags.c_contiguous:
                    host = np.ascontiguousarray(host)  # MLX copies such an input first
                keep.append(host)
                item = host.itemsize
                low = sum(min(0, (n - 1) * s) for n, s in zip(host.shape, host.strides)) if host.size else 0
                high = (
                    sum(max(0, (n - 1) * s) for n, s in zip(host.shape, host.strides)) + item
                    if host.size
                    else 0
                )
                buffers.add(high - low, f"input `{name}`", host, offset=low)
                if a.ndim > 0:
                    extras = (
                        (np.array(a.shape, np.int32), f"`{name}_shape`"),
                        (np.array([s // item for s in host.strides], np.int64), f"`{name}_strides`"),
                        (np.array([a.ndim], np.int32), f"`{name}_ndim`"),
                    )
                    for present, (data, label) in zip(info, extras):
                        if present:
                            keep.append(data)
                            buffers.add(data.nbytes, label, data)
            outs = []
            for name, shape, dtype in zip(k.output_names, output_shapes, output_dtypes):
                if init_value is not None:
                    init = _host(
                        mx.broadcast_to(mx.array(init_value, dtype=dtype), tuple(shape))
                    )  # as MLX fills
                else:
                    init = _host(mx.zeros(tuple(shape), dtype))
                    init = np.frombuffer(_garbage(init.nbytes), init.dtype).reshape(init.shape)
                init = np.ascontiguousarray(init)
                keep.append(init)
                outs.append((buffers.add(init.nbytes, f"output `{name}`", init), init))
            launch = _Launch(
                grid=(ctypes.c_int64 * 3)(*grid),
                threadgroup=(ctypes.c_int64 * 3)(*threadgroup),
                schedule=SCHEDULES[self.schedule],
                seed=self.seed ^ zlib.crc32(f"{k.name}{inst}{grid}{threadgroup}".encode()),
                cpu_seconds=self.cpu_seconds,
                max_threads=MAX_THREADS,
                threadgroup_memory=THREADGROUP_MEMORY,
                garbage=GARBAGE,
                stacks=_stacks_from(lib),
            )
            result = _Result()
            pointers = (ctypes.c_void_p * len(buffers.pointers))(*buffers.pointers)
            lib.oss_launch(ctypes.byref(launch), pointers, ctypes.byref(result))
            if result.code != 0:
                raise MetalEmulatorError(f"{k.name}: {_explain(result, buffers)}")
            results = []
            for (ptr, init), dtype in zip(outs, output_dtypes):
                host = np.empty_like(init)
                ctypes.memmove(host.ctypes.data, ptr, host.nbytes)
                out = mx.array(host)
                results.append(out.view(mx.bfloat16) if dtype == mx.bfloat16 else out)
            return results
        finally:
            buffers.free()


@functools.cache
def _kernel(*args) -> source.Kernel:
    return source.Kernel(*args)


def _garbage(nbytes: int) -> bytes:
    words = np.full(-(-nbytes // 4), GARBAGE, np.uint32)
    return words.tobytes()[:nbytes]


def _explain(r: _Result, buffers: _Buffers) -> str:
    where = ""
    if r.where[0] >= 0:
        where = f" (thread {tuple(r.where[3:])} of threadgroup {tuple(r.where[:3])})"
    message = r.message.decode(errors="replace")
    if r.code == 2:
        what = _SIGNALS.get(r.signal, f"signal {r.signal}")
        return f"{what} at {r.fault_address:#x}: {buffers.describe(r.fault_address)}{where}"
    if r.code == 3:
        return f"ran past its CPU-time budget (an endless loop?){where}"
    return message + where
