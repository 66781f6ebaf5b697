"""Our CUDA kernels compiled once per machine, not once per process (OSS_MLX_KERNEL_CACHE=0 turns it off).

MLX-CUDA looks up every JIT module in a disk cache before compiling it (`jit_module.cpp`:
`<MLX_PTX_CACHE_DIR, else $TMPDIR/mlx/<version>/ptx>/<module>.ptx`, with `<module>.txt` naming each
kernel's mangled symbol), custom kernels included, but it writes that cache only for its own kernels
(docs/UPSTREAM.md item 6): every process compiled ours with NVRTC again, ~45 s of the 20b's load-time
warm-up on the H200. Here, the first time a kernel specialization is launched, a background thread
compiles the source MLX builds for it (custom_kernel.cpp's `build_kernel`, rebuilt below byte for
byte, since the module's name is a hash of it) the way MLX compiles it (its NVRTC, its embedded device
headers, its options) and writes the two files under the module's name; the next process's MLX reads
them instead of compiling. A file is only ever read by MLX when its name matches the source MLX built,
so a mismatch costs nothing but the background compile.

On by default since a card ran it (an H100: MLX's printed source of all 40 specializations a 2-layer
20b launches equal to ours; a fresh process's first prompt 18.9 s writing the cache, 0.41 s reading
it, the same tokens; docs/PERFORMANCE.md). `benchmarks/probes/device_probes.sh` stage `kernelcache`
is the check.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx

ENV = "OSS_MLX_KERNEL_CACHE"

# MLX's names for dtypes: in a kernel's signature (cuda/utils.cpp dtype_to_cuda_type) and in its
# name's template suffix (common/compiled.cpp get_type_string).
_CUDA_TYPE = {
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.float32: "float",
    mx.float64: "double",
}
_TYPE_STRING = {**_CUDA_TYPE, mx.float16: "float16_t", mx.bfloat16: "bfloat16_t"}
_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
_MASK = (1 << 64) - 1


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def cxx_hash(data: bytes) -> int:
    """std::hash<std::string> of libstdc++ (64-bit: `_Hash_bytes` with seed 0xc70f6907), which names
    MLX's custom-kernel modules."""
    mul = (0xC6A4A793 << 32) + 0x5BD1E995

    def shift_mix(v: int) -> int:
        return v ^ (v >> 47)

    n = len(data)
    aligned = n & ~7
    h = (0xC70F6907 ^ (n * mul)) & _MASK
    for i in range(0, aligned, 8):
        word = int.from_bytes(data[i : i + 8], "little")
        h = ((h ^ ((shift_mix((word * mul) & _MASK) * mul) & _MASK)) * mul) & _MASK
    if n & 7:
        tail = 0
        for b in reversed(data[aligned:]):
            tail = (tail << 8) + b
        h = ((h ^ tail) * mul) & _MASK
    h = (shift_mix(h) * mul) & _MASK
    return shift_mix(h)


def kernel_name(name: str, template: list[tuple[str, object]]) -> str:
    """MLX's name for a specialization: custom_kernel_<name> and each template value."""
    suffix = ""
    for _, value in template:
        if isinstance(value, bool):
            suffix += "_t" if value else "_f"
        elif isinstance(value, int):
            suffix += f"_{value}"
        else:
            suffix += "_" + _TYPE_STRING[value]
    return f"custom_kernel_{name}{suffix}"


def kernel_source(
    func: str,
    header: str,
    body: str,
    input_names: list[str],
    inputs: list[tuple[mx.Dtype, int]],
    output_names: list[str],
    output_dtypes: list[mx.Dtype],
    template: list[tuple[str, object]],
) -> str:
    """The translation unit custom_kernel.cpp's build_kernel makes (inputs as (dtype, ndim))."""
    src = _DEFAULT_HEADER + header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    src += f"__global__ void {func}(\n"
    for name, (dtype, ndim) in zip(input_names, inputs):
        src += f"    const {_CUDA_TYPE[dtype]}* {name},\n"
        if ndim > 0:
            if f"{name}_shape" in body:
                src += f"    const __grid_constant__ Shape {name}_shape,\n"
            if f"{name}_strides" in body:
                src += f"    const __grid_constant__ Strides {name}_strides,\n"
            if f"{name}_ndim" in body:
                src += f"    const __grid_constant__ int {name}_ndim,\n"
    for i, (name, dtype) in enumerate(zip(output_names, output_dtypes)):
        src += f"    {_CUDA_TYPE[dtype]}* {name}" + (",\n" if i < len(output_names) - 1 else ") {\n")
    if template:
        for name, value in template:
            if isinstance(value, bool):
                src += f"  constexpr bool {name} = {'true' if value else 'false'};\n"
            elif isinstance(value, int):
                src += f"  constexpr int {name} = {value};\n"
            else:
                src += f"  using {name} = {_CUDA_TYPE[value]};\n"
        src += "\n"
    return src + body + "\n}\n\n} // namespace mlx::core::cu\n"


def module_name(func: str, source: str) -> str:
    return f"{func}_{cxx_hash(source.encode()):x}"


def cache_dir() -> Path:
    """Where MLX reads its PTX cache (jit_module.cpp ptx_cache_dir)."""
    if os.environ.get("MLX_PTX_CACHE_DIR"):
        return Path(os.environ["MLX_PTX_CACHE_DIR"])
    return Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx"


# ---- the header as a file ------------------------------------------------------------------------

# MLX-CUDA hashes a custom kernel's whole source at every launch (docs/UPSTREAM.md item 14), and a
# decode step launches ~144 of ours: so each kernel's helpers go to a file named by their hash and the
# source MLX holds includes it (NVRTC reads it from disk when it compiles). The name changes with the
# text, so a module cached on disk is never one of other helpers.
HEADERS_ENV = "OSS_MLX_HEADER_FILES"


def header_folder() -> Path:
    """Beside MLX's PTX cache, so a later process names the same files (and its modules hit); one
    folder per user, since what it holds is compiled into this process's kernels."""
    return cache_dir().parent / f"oss_mlx_headers-{os.getuid()}"


def included_header(header: str, folder: Path | None = None) -> str:
    """`#include` of a file holding `header` (written once, whole, then renamed), or the header itself
    where the folder cannot be written, is not this user's alone, or OSS_MLX_HEADER_FILES=0."""
    if os.environ.get(HEADERS_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        return header
    folder = folder or header_folder()
    path = folder / f"oss_{hashlib.sha256(header.encode()).hexdigest()[:20]}.cuh"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:  # another user could change the text
            return header
        stamp = _stamp(path)
        if stamp is None or _HEADER_SEEN.get(path) != stamp:  # read again only if changed since checked
            if not path.is_file() or path.read_text() != header:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(header)
                os.replace(tmp, path)
            _HEADER_SEEN[path] = _stamp(path)
    except OSError:
        return header
    return f'#include "{path}"\n'


# The header files this process has checked, by their stat: a new specialization asks again for
# its helpers' file (dispatch), and a stat answers whether it is still the text checked.
_HEADER_SEEN: dict[Path, tuple[int, int, int]] = {}


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


# ---- compiling as MLX does -----------------------------------------------------------------------

# MLX's device headers are embedded in libmlx.so (bin2h.cmake), not installed: the ones our kernels'
# translation units reach, found by a line each holds.
_EMBEDDED = {
    "mlx/backend/cuda/device/utils.cuh": b"using Shape = cuda::std::array<int32_t, MAX_NDIM>;",
    "mlx/backend/cuda/device/complex.cuh": b"#define LIBCUDACXX_ENABLE_SIMPLIFIED_COMPLEX_OPERATIONS",
}


def _mlx_root() -> Path:
    return Path(mx.__file__).resolve().parent  # .../site-packages/mlx


def embedded_headers(library: Path | None = None) -> dict[str, bytes]:
    """MLX's device headers as its NVRTC programs see them, cut out of libmlx.so."""
    data = (library or _mlx_root() / "lib" / "libmlx.so").read_bytes()
    found = {}
    for name, marker in _EMBEDDED.items():
        at = data.find(marker)
        if at < 0:
            raise LookupError(f"{name} is not in libmlx.so")
        start, end = data.rfind(b"\0", 0, at) + 1, data.find(b"\0", at)
        found[name] = data[start:end]
    for text in found.values():  # every MLX header they include must be here or on disk
        for inc in re.findall(rb'#include "(mlx/backend/cuda/device/[^"]+)"', text):
            on_disk = _mlx_root() / "include" / inc.decode()
            if inc.decode() not in found and not on_disk.is_file():
                raise LookupError(f"{inc.decode()} is neither embedded nor installed")
    return found


def include_paths() -> list[str]:
    """jit_module.cpp include_path_args: MLX's include folder, its CCCL, the CUDA wheel's headers or,
    without that wheel beside MLX, the toolkit's (CUDA_HOME, CUDA_PATH, else /usr/local/cuda)."""
    root = _mlx_root()
    cuda = root.parent / "nvidia" / "cu13" / "include"
    if not cuda.is_dir():
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        cuda = Path(home) / "include"
    paths = [root / "include", root / "include" / "cccl", cuda]
    return [str(p) for p in paths if p.is_dir()]


def nvrtc_library() -> str:
    """The NVRTC MLX loaded (the same compiler for the same output), else the wheel's."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            if "libnvrtc.so" in line and "builtins" not in line:
                return line.split()[-1]
    except OSError:
        pass
    for lib in sorted((_mlx_root().parent / "nvidia").glob("*/lib/libnvrtc.so*")):
        if "builtins" not in lib.name:
            return str(lib)
    raise LookupError("no libnvrtc")


def nvrtc_compile(
    source: str,
    kernel: str,
    arch: str,
    headers: dict[str, bytes],
    lib: str,
    includes: list[str],
    extra: tuple[str, ...] = (),
) -> tuple[bytes, str, str]:
    """(SASS for `arch`, the kernel's mangled name, NVRTC's log), as jit_module.cpp compile() makes
    them (`extra`: more options, e.g. ptxas's register report)."""
    nvrtc = ctypes.CDLL(lib)
    prog = ctypes.c_void_p()
    names = list(headers)
    texts = (ctypes.c_char_p * len(names))(*(headers[n] for n in names))
    incs = (ctypes.c_char_p * len(names))(*(n.encode() for n in names))
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"k.cu", len(names), texts, incs)
    _check(nvrtc, rc)
    try:
        _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, kernel.encode()))
        opts = ["--device-as-default-execution-space", f"--gpu-architecture={arch}", *extra]
        opts += [f"--include-path={p}" for p in includes]
        argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        compiled = nvrtc.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace")
        if compiled != 0:
            raise RuntimeError(text[:2000])
        mangled = ctypes.c_char_p()
        _check(nvrtc, nvrtc.nvrtcGetLoweredName(prog, kernel.encode(), ctypes.byref(mangled)))
        _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        out = ctypes.create_string_buffer(size.value)
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, out))
        return out.raw, mangled.value.decode(), text
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_cubin(
    source: str, kernel: str, arch: str, headers: dict[str, bytes], lib: str
) -> tuple[bytes, str]:
    """(SASS, mangled name) of one kernel with this process's MLX include folders."""
    binary, mangled, _ = nvrtc_compile(source, kernel, arch, headers, lib, include_paths())
    return binary, mangled


def _check(nvrtc, rc: int) -> None:
    if rc != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC: {nvrtc.nvrtcGetErrorString(rc).decode()}")


def write_module(folder: Path, module: str, kernel: str, mangled: str, binary: bytes) -> None:
    """The two files MLX reads, each written whole then renamed; the symbol table first, since MLX
    takes the module's presence from the binary (a binary without its table would load no kernel)."""
    for suffix, data in ((".txt", f"{kernel}\t{mangled}\n".encode()), (".ptx", binary)):
        path = folder / f"{module}{suffix}"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


class KernelCache:
    """This process's writer of the cache: the specializations seen, the background compiles."""

    def __init__(self) -> None:
        self.on = enabled()  # read once (a launch's host time counts: the prefill is not compiled)
        self.seen: set[tuple] = set()
        self.written: list[str] = []
        self.failed: str | None = None  # why it stopped (the first failure turns it off)
        self._pool: ThreadPoolExecutor | None = None
        self._setup: tuple | None = None
        self._lock = threading.Lock()

    def note(self, key: tuple, make_source) -> None:
        """A launch of specialization `key`: its module compiled in the background if MLX's cache
        does not hold it (make_source() -> (MLX's kernel name, source), called once per key)."""
        if key in self.seen or self.failed is not None:
            return
        self.seen.add(key)
        kernel, source = make_source()
        module = module_name(kernel, source)
        folder = cache_dir()
        if not folder.is_dir() or (folder / f"{module}.ptx").exists():
            return  # (no folder: MLX has not made one here, or its version names it otherwise)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="oss-mlx-kernel-cache")
        self._pool.submit(self._compile, folder, module, "mlx::core::cu::" + kernel, source)

    def _compile(self, folder: Path, module: str, kernel: str, source: str) -> None:
        try:
            with self._lock:
                if self._setup is None:
                    arch = str(mx.device_info().get("architecture", "sm_90"))
                    major = int(re.match(r"sm_(\d+?)(\d)$", arch).group(1))
                    self._setup = (arch + ("a" if major >= 9 else ""), embedded_headers(), nvrtc_library())
            arch, headers, lib = self._setup
            binary, mangled = compile_cubin(source, kernel, arch, headers, lib)
            write_module(folder, module, kernel, mangled, binary)
            self.written.append(module)
        except Exception as e:  # the cache is an optimisation: any failure only turns it off
            self.failed = f"{type(e).__name__}: {e}"

    def wait(self) -> None:
        """Until every queued compile is done (tests, the device check)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
