"""Which kernel backend runs (metal | cuda | reference), and the launch of a compiled kernel.

Backend: Metal when `mx.metal.is_available()`, CUDA when `mx.cuda.is_available()`, else the
reference; `OSS_MLX_KERNELS=reference` forces the reference (also `metal` / `cuda` / `auto`),
`use_backend` does the same inside a process, and `disable` (the start-up self-test's verdict,
oss_mlx/kernel_selftest.py) turns every kernel off. A kernel runs only on the GPU stream and for the
shapes it was written for; each stage module says which (`*_ok`), and the model takes its reference
path everywhere else.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from . import cuda_cache
from .sources import SPECS, kernel_sources

ENV = "OSS_MLX_KERNELS"
BACKENDS = ("metal", "cuda", "reference")
FLOATS = (mx.float32, mx.float16, mx.bfloat16)
# Largest hidden size for the kernels that stage a whole row in threadgroup memory (norm_route,
# norm_qkv_rope): Apple GPUs give a threadgroup 32 KB, i.e. 4 H + the router's 4 E (E <= 256) + 64.
KERNEL_MAX_HIDDEN = 7680


def _machine_backend() -> str:
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "reference"


@dataclass
class KernelRuntime:
    """The kernel layer's state in this process."""

    machine: str  # the dialect this machine's MLX runs (or the emulated one)
    forced: str | None = None  # use_backend()
    disabled: str | None = None  # why the kernels are off (the self-test's verdict)
    make_kernel: Callable | None = None  # emulated(): builds kernels instead of mx.fast.*_kernel
    gpu: bool | None = None  # emulated(): the current device counts as the GPU
    poison: float | None = None  # poison_outputs()
    compiled: dict[tuple[str, str], object] = field(default_factory=dict)
    consts: dict[tuple, mx.array] = field(default_factory=dict)
    position: tuple[tuple[int, int], mx.array] | None = None  # ((position, rows), the step's array)
    disk_cache: cuda_cache.KernelCache = field(default_factory=cuda_cache.KernelCache)  # OSS_MLX_KERNEL_CACHE
    specializations: set[tuple] = field(default_factory=set)  # launched so far (MLX compiles each once)


RUNTIME = KernelRuntime(_machine_backend())


def available_backend() -> str:
    """The kernel dialect this machine's MLX can run: metal, cuda or reference."""
    return RUNTIME.machine


def backend() -> str:
    """The backend in use now: `OSS_MLX_KERNELS` (or `use_backend`) over what is available."""
    want = (RUNTIME.forced or os.environ.get(ENV, "auto")).strip().lower()
    if want in ("reference", "ref", "off", "none", "0"):
        return "reference"
    if want in ("auto", "", "on", "1") or want == RUNTIME.machine:
        return "reference" if RUNTIME.disabled is not None else RUNTIME.machine
    if want not in BACKENDS and want not in _WARNED:  # a typo must not silently turn the kernels off
        _WARNED.add(want)
        warnings.warn(
            f"{ENV}={want!r} is not one of auto, metal, cuda, reference (or off): the reference path runs",
            stacklevel=2,
        )
    return "reference"  # asked for a dialect this machine cannot run


_WARNED: set[str] = set()  # the unknown OSS_MLX_KERNELS values already warned about


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Temporarily force `reference` (or `auto`); None restores the environment's choice."""
    before, RUNTIME.forced = RUNTIME.forced, name
    try:
        yield
    finally:
        RUNTIME.forced = before


def disable(reason: str) -> None:
    """Every kernel off for the rest of the process (the self-test found one failing here)."""
    RUNTIME.disabled = reason


def disabled() -> str | None:
    """Why the kernels are off on this machine (None: they are not)."""
    return RUNTIME.disabled


@contextlib.contextmanager
def emulated(dialect: str, make_kernel: Callable) -> Iterator[None]:
    """For its duration the kernel layer believes `dialect` is this machine's and the current device
    is the GPU (for the shape predicates), and builds kernels with `make_kernel` (the signature of
    mx.fast.metal_kernel) instead of MLX's factory. The compiled-kernel cache is cleared on entry
    and on exit. For running the kernels' launch path off their GPU: CPU emulation of the Metal
    text, or fakes that record the launches."""
    if dialect not in ("metal", "cuda"):
        raise ValueError(f"emulated: a kernel dialect, metal or cuda (not {dialect!r})")
    saved = (RUNTIME.machine, RUNTIME.make_kernel, RUNTIME.gpu, RUNTIME.disabled)
    RUNTIME.compiled.clear()
    RUNTIME.machine, RUNTIME.make_kernel, RUNTIME.gpu, RUNTIME.disabled = dialect, make_kernel, True, None
    try:
        yield
    finally:
        RUNTIME.machine, RUNTIME.make_kernel, RUNTIME.gpu, RUNTIME.disabled = saved
        RUNTIME.compiled.clear()


def on_gpu() -> bool:
    """Whether new work goes to the GPU (kernels never run on the CPU stream)."""
    return RUNTIME.gpu if RUNTIME.gpu is not None else mx.default_device() == mx.gpu


@contextlib.contextmanager
def poison_outputs(value: float = float("nan")) -> Iterator[None]:
    """Outputs are pre-filled with `value` (tests: NaN shows any element a kernel left unwritten)."""
    before, RUNTIME.poison = RUNTIME.poison, value
    try:
        yield
    finally:
        RUNTIME.poison = before


def _kernel(name: str):
    # The machine's dialect: a launch only follows a predicate that found backend() != "reference",
    # and backend() is then this one (reading the environment again per launch cost ~1 µs, x 144 a step).
    dialect = RUNTIME.machine
    key = (dialect, name)
    if key not in RUNTIME.compiled:
        spec = SPECS[name]
        header, body = _texts(dialect, name)
        make = RUNTIME.make_kernel or (mx.fast.metal_kernel if dialect == "metal" else mx.fast.cuda_kernel)
        RUNTIME.compiled[key] = make(
            name=f"oss_{name}",
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            source=body,
            header=header,
            ensure_row_contiguous=spec.row_contiguous,
        )
    return RUNTIME.compiled[key]


def launch(name: str, inputs, template, grid, threadgroup, output_shapes, output_dtypes) -> list[mx.array]:
    """Kernel `name` (SPECS) on `inputs`, compiled at first use (on CUDA, with OSS_MLX_KERNEL_CACHE=1,
    also written to MLX's disk cache for the next process: cuda_cache.py)."""
    extra = {} if RUNTIME.poison is None else {"init_value": RUNTIME.poison}
    if RUNTIME.machine == "cuda" and RUNTIME.make_kernel is None:
        key = (name, tuple(template), tuple((a.dtype, a.ndim) for a in inputs), tuple(output_dtypes))
        if key not in RUNTIME.specializations:  # MLX compiles it at this launch's evaluation
            RUNTIME.specializations.add(key)
            _texts("cuda", name)  # the helpers' file again, should something have removed it
            if RUNTIME.disk_cache.on:
                RUNTIME.disk_cache.note(key, lambda: cuda_source(name, inputs, template, output_dtypes))
    return _kernel(name)(
        inputs=inputs,
        template=template,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=output_shapes,
        output_dtypes=output_dtypes,
        **extra,
    )


def _texts(dialect: str, name: str) -> tuple[str, str]:
    """(header, body) as MLX is given them: on MLX-CUDA the header is an `#include` of a file holding
    it (cuda_cache.included_header says why); emulated kernels get the text itself."""
    header, body = kernel_sources(dialect)[name]
    if dialect == "cuda" and RUNTIME.make_kernel is None:
        header = cuda_cache.included_header(header)
    return header, body


def cuda_source(name: str, inputs, template, output_dtypes) -> tuple[str, str]:
    """(MLX's name for this specialization of kernel `name`, the source MLX-CUDA compiles for it)."""
    spec, (header, body) = SPECS[name], _texts("cuda", name)
    func = cuda_cache.kernel_name(f"oss_{name}", list(template))
    shapes = [(a.dtype, a.ndim) for a in inputs]
    source = cuda_cache.kernel_source(
        func, header, body, list(spec.inputs), shapes, list(spec.outputs), list(output_dtypes), list(template)
    )
    return func, source


# ---- small inputs --------------------------------------------------------------------------------

# MLX-CUDA (0.32.4, allocator.cpp) serves every array of 8 bytes or less from a pool in host memory
# that the GPU reads over the bus, a round trip of microseconds for each warp that reads it: 44% of
# norm_qkv_rope's stall samples waited on its one eps load (Nsight Compute, H200). Larger
# arrays live on the card (made by a GPU op) or migrate there on first use (made on the host and
# never written again). So the kernels' small inputs are at least this many bytes.
MIN_DEVICE_BYTES = 16


def const(*values: float) -> mx.array:
    """A small float32 array of constants, made once (not a new upload per call), padded past the
    host-memory pool (MIN_DEVICE_BYTES)."""
    if values not in RUNTIME.consts:
        padded = list(values) + [0.0] * max(0, MIN_DEVICE_BYTES // 4 - len(values))
        RUNTIME.consts[values] = mx.array(padded, dtype=mx.float32)
    return RUNTIME.consts[values]


def position_array(offset: int, rows: int = 1) -> mx.array:
    """A decode position for the kernels, the same for `rows` rows: int32 [rows] on the card (filled
    by a GPU op, see MIN_DEVICE_BYTES), not in MLX's host-memory pool of small arrays."""
    return mx.full((max(rows, MIN_DEVICE_BYTES // 4),), offset, dtype=mx.int32)[:rows]


def device_ints(values: list[int]) -> mx.array:
    """int32 [len(values)], at least MIN_DEVICE_BYTES long underneath (a view of a padded array):
    the decode batch's per-row positions, kept padded as they advance (see MIN_DEVICE_BYTES)."""
    pad = max(0, MIN_DEVICE_BYTES // 4 - len(values))
    return mx.array(list(values) + [0] * pad, dtype=mx.int32)


def as_position(pos: int | mx.array, rows: int = 1) -> mx.array:
    """pos as the kernels' int32 [rows] (one position per row, each row reads its own): an array as
    it is; an int (the same position for every row) becomes an int32 [rows] made once and shared by
    every layer of the step (a template argument would compile a kernel per position)."""
    if isinstance(pos, mx.array):
        return pos
    if RUNTIME.position is None or RUNTIME.position[0] != (pos, rows):
        RUNTIME.position = ((pos, rows), position_array(pos, rows))
    return RUNTIME.position[1]


def ring_slots(positions: mx.array, window: int) -> mx.array:
    """positions % window (int32 [R]) for the rows' positions, on the card: computed at least
    MIN_DEVICE_BYTES wide and viewed back (see MIN_DEVICE_BYTES), since the cache-row scatter of
    every window layer reads it."""
    n = positions.shape[0]
    if n * 4 >= MIN_DEVICE_BYTES:
        return positions % window
    pad = mx.zeros((MIN_DEVICE_BYTES // 4 - n,), dtype=positions.dtype)
    return (mx.concatenate([positions, pad]) % window)[:n]


def result_dtype(a: mx.Dtype, b: mx.Dtype) -> mx.Dtype:
    """The dtype MLX gives a matmul of a and b (bf16 with f16 promotes to f32)."""
    return a if a == b else mx.float32
