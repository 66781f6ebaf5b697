"""The cross-process cache of our CUDA kernels (oss_mlx/kernels/cuda_cache.py), the parts a CPU can
check: the module name MLX looks up (libstdc++'s std::hash of the source custom_kernel.cpp builds),
the source itself, and the files it writes. That MLX reads them, and what it saves, is checked on the
GPU machine (benchmarks/probes/kernel_cache_probe.py: MLX's own printed source against ours, two
processes timed)."""

from __future__ import annotations

import random
import shutil
import subprocess

import mlx.core as mx
import pytest

from oss_mlx.kernels import cuda_cache

# std::hash<std::string> of these, printed by a program built with g++ (libstdc++), as MLX's wheels are
GOLDEN = {
    b"": 0x553E93901E462A6E,
    b"abcdefg": 0xDEEE6830A3AF82AF,
    b"abcdefgh": 0x783DB3E38DB898BB,
    b"abcdefghi": 0xB4EC9257851C8AAF,
    b"__global__ void custom_kernel_oss_x(const float* a) {}\n": 0x1BC344B08BD5BE18,
}


def test_the_module_hash_is_libstdcxx_std_hash():
    for data, want in GOLDEN.items():
        assert cuda_cache.cxx_hash(data) == want, data


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here")
def test_the_module_hash_matches_a_compiled_std_hash_on_any_length(tmp_path):
    program = tmp_path / "h.cpp"
    program.write_text(
        "#include <fstream>\n#include <iostream>\n#include <sstream>\n#include <string>\n"
        "int main(int c, char** v) { for (int i = 1; i < c; ++i) { std::ifstream f(v[i], std::ios::binary);"
        " std::stringstream s; s << f.rdbuf(); std::cout << std::hash<std::string>{}(s.str()) << '\\n'; } }\n"
    )
    subprocess.run(["g++", "-O1", "-o", str(tmp_path / "h"), str(program)], check=True)
    rng = random.Random(7)
    samples = [bytes(rng.randrange(256) for _ in range(n)) for n in (1, 5, 8, 15, 16, 17, 63, 1000, 4099)]
    files = []
    for i, data in enumerate(samples):
        files.append(tmp_path / f"s{i}")
        files[-1].write_bytes(data)
    out = subprocess.run([str(tmp_path / "h"), *map(str, files)], capture_output=True, text=True, check=True)
    assert [int(v) for v in out.stdout.split()] == [cuda_cache.cxx_hash(d) for d in samples]


def test_the_source_is_what_custom_kernel_cpp_builds():
    """build_kernel's layout: MLX's header and ours, the signature (shapes / strides / ndim only for
    inputs the body names and that are not scalars), the template as constants, the body."""
    template = [("T", mx.bfloat16), ("N", 3), ("FLAG", True)]
    func = cuda_cache.kernel_name("oss_k", template)
    assert func == "custom_kernel_oss_k_bfloat16_t_3_t"
    body = "  out[0] = a[a_strides[0]] + b_shape[0] + s[0];"
    src = cuda_cache.kernel_source(
        func,
        "// ours\n",
        body,
        ["a", "b", "s"],
        [(mx.bfloat16, 2), (mx.uint32, 1), (mx.float32, 0)],
        ["out"],
        [mx.float32],
        template,
    )
    assert src == (
        '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
        "// ours\n"
        "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        "__global__ void custom_kernel_oss_k_bfloat16_t_3_t(\n"
        "    const __nv_bfloat16* a,\n"
        "    const __grid_constant__ Strides a_strides,\n"
        "    const uint32_t* b,\n"
        "    const __grid_constant__ Shape b_shape,\n"
        "    const float* s,\n"
        "    float* out) {\n"
        "  using T = __nv_bfloat16;\n  constexpr int N = 3;\n  constexpr bool FLAG = true;\n\n"
        + body
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )
    assert cuda_cache.module_name(func, src) == f"{func}_{cuda_cache.cxx_hash(src.encode()):x}"


def test_a_noted_kernel_is_compiled_once_and_written_as_mlx_reads_it(tmp_path, monkeypatch):
    """The symbol table and the binary under the module's name (the table first: MLX takes the module
    from the binary); a specialization already in the cache, or a second launch, compiles nothing;
    without MLX's folder (another version's name) nothing is written."""
    compiled = []

    def fake_compile(source, kernel, arch, headers, lib):
        compiled.append(kernel)
        return b"\x7fELF binary", "_Z6mangled"

    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_cache, "compile_cubin", fake_compile)
    cache = cuda_cache.KernelCache()
    cache._setup = ("sm_90a", {}, "libnvrtc")
    cache.note(("k", 1), lambda: ("custom_kernel_oss_k_1", "source one"))
    cache.note(("k", 1), lambda: ("custom_kernel_oss_k_1", "source one"))
    cache.wait()
    module = cuda_cache.module_name("custom_kernel_oss_k_1", "source one")
    assert compiled == ["mlx::core::cu::custom_kernel_oss_k_1"] and cache.written == [module]
    assert (tmp_path / f"{module}.ptx").read_bytes() == b"\x7fELF binary"
    assert (tmp_path / f"{module}.txt").read_text() == "mlx::core::cu::custom_kernel_oss_k_1\t_Z6mangled\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again = cuda_cache.KernelCache()
    again._setup = cache._setup
    again.note(("k", 1), lambda: ("custom_kernel_oss_k_1", "source one"))  # in the cache already
    again.wait()
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "missing"))
    again.note(("k", 2), lambda: ("custom_kernel_oss_k_2", "source two"))
    again.wait()
    assert compiled == ["mlx::core::cu::custom_kernel_oss_k_1"] and again.written == []


def test_a_failed_compile_turns_the_cache_off(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no NVRTC")

    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_cache, "compile_cubin", broken)
    cache = cuda_cache.KernelCache()
    cache._setup = ("sm_90a", {}, "libnvrtc")
    cache.note(("k", 1), lambda: ("custom_kernel_oss_k_1", "one"))
    cache.wait()
    assert "no NVRTC" in cache.failed and not list(tmp_path.iterdir())
    cache.note(("k", 2), lambda: ("custom_kernel_oss_k_2", "two"))  # off: not even the source is built
    assert ("k", 2) not in cache.seen


def test_the_launch_and_the_offline_compile_check_build_one_source():
    """dispatch.cuda_source (what the cache names and compiles at a launch) and the offline compile
    check's translation unit are the same text for every case of SPECS."""
    import importlib.util
    from pathlib import Path

    from oss_mlx.kernels import dispatch

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_cuda_kernels.py"
    spec = importlib.util.spec_from_file_location("compile_cuda_kernels", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name, case in tool.cases():
        inputs = [mx.zeros((2,), dtype=tool.DTYPE[d.removesuffix("c")]) for d in case.inputs]
        template = [(k, tool.DTYPE[v] if isinstance(v, str) else v) for k, v in case.template.items()]
        outputs = [tool.DTYPE[d] for d in case.outputs]
        assert dispatch.cuda_source(name, inputs, template, outputs) == tool.translation_unit(name, case)


def test_the_helpers_go_to_a_file_named_by_their_text(tmp_path, monkeypatch):
    """MLX-CUDA hashes a custom kernel's whole source at every launch, so the helpers are a file the
    source includes: written once, whole, named by the text's hash (other helpers, another name); the
    text itself where the folder cannot be written or OSS_MLX_HEADER_FILES=0."""
    header = "// helpers\n__device__ float twice(float x) { return 2 * x; }\n"
    line = cuda_cache.included_header(header, tmp_path / "h")
    (path,) = (tmp_path / "h").iterdir()
    assert line == f'#include "{path}"\n' and path.read_text() == header and path.is_absolute()
    before = path.stat().st_mtime_ns
    assert cuda_cache.included_header(header, tmp_path / "h") == line and path.stat().st_mtime_ns == before
    with monkeypatch.context() as m:  # checked once: a stat, not a read, answers again
        m.setattr(type(path), "read_text", lambda *a, **k: pytest.fail("read again"))
        assert cuda_cache.included_header(header, tmp_path / "h") == line
    other = cuda_cache.included_header(header + "// more\n", tmp_path / "h")
    assert other != line and len(list((tmp_path / "h").iterdir())) == 2
    path.write_text("damaged")  # rewritten whole
    assert cuda_cache.included_header(header, tmp_path / "h") == line and path.read_text() == header
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert cuda_cache.included_header(header, blocked / "h") == header  # a file where the folder goes
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # others may write there: their text could be compiled in
    assert cuda_cache.included_header(header, shared) == header and not list(shared.iterdir())
    monkeypatch.setenv(cuda_cache.HEADERS_ENV, "0")
    assert cuda_cache.included_header(header, tmp_path / "h") == header


def test_the_compiled_source_includes_the_helpers_and_nvcc_compiles_it(tmp_path):
    """The source MLX is given for a kernel includes its helpers' file, and the file and the inline
    text compile to the same code (nvcc here, where present; NVRTC on the card)."""
    from oss_mlx.kernels import dispatch

    inputs = [mx.zeros((2, 64), dtype=mx.float32), mx.zeros((64,), dtype=mx.float32)]
    func, source = dispatch.cuda_source(
        "moe_combine", inputs, [("T", mx.float32), ("H", 64), ("K", 2)], [mx.float32]
    )
    header, body = dispatch.kernel_sources("cuda")["moe_combine"]
    assert '#include "' in source and header not in source and body in source
    if shutil.which("nvcc") is None:
        return
    inline = source.replace(cuda_cache.included_header(header), header)
    ptx = []
    for i, text in enumerate((source, inline)):
        unit = tmp_path / f"k{i}.cu"
        unit.write_text(
            text.replace('#include "mlx/backend/cuda/device/utils.cuh"', "typedef unsigned int uint32_t;")
        )
        out = subprocess.run(
            ["nvcc", "-std=c++17", "-ptx", "-o", str(unit.with_suffix(".ptx")), str(unit)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            pytest.skip(f"nvcc cannot compile the unit here: {out.stderr[:200]}")
        ptx.append(unit.with_suffix(".ptx").read_text().split("\n", 10)[-1])
    assert ptx[0] == ptx[1]
