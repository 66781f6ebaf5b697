"""Compile every CUDA kernel as `mx.fast.cuda_kernel` assembles it, without a GPU: nvcc for sm_90a,
registers and spills per kernel at every case of SPECS (gpt-oss shapes and a few odd ones); `--ptx
DIR` also writes each case's PTX, to show that a refactor changed no instruction (compare two DIRs
with `--compare`; files are named by kernel, dtypes and template, so two checkouts' runs line up).

Needs nvcc (CUDA 12.x or 13) and MLX's CUDA headers: the `mlx/backend/cuda/device/*.cuh` of an MLX
source checkout (`--mlx-src`, e.g. a clone of ml-explore/mlx at the wheel's version) and the
`mlx/include` folder of the `mlx-cuda-*` wheel (`--mlx-include`, for cccl). Not part of CI: a GPU
run (tests/test_kernels.py) is what proves a kernel right; this only catches compile errors and
register growth before spending device time.

    python benchmarks/compile_cuda_kernels.py --mlx-src ~/mlx --mlx-include ~/mlx_cuda/mlx/include
    python benchmarks/compile_cuda_kernels.py ... --only route norm_route --ptx /tmp/before
    python benchmarks/compile_cuda_kernels.py --nvrtc .../nvidia/cu13/lib/libnvrtc.so.13 \
        --cuda-include .../nvidia/cu13/include --mlx-src DIR --mlx-include DIR   # no nvcc, no GPU

With --nvrtc, --mlx-src needs only mlx/backend/cuda/device/{utils,complex}.cuh and config.h.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from oss_mlx import kernels  # noqa: E402
from oss_mlx.kernels import cuda_cache  # noqa: E402
from oss_mlx.kernels.sources import Case  # noqa: E402

DTYPE = {
    "bf16": mx.bfloat16,
    "f16": mx.float16,
    "f32": mx.float32,
    "u32": mx.uint32,
    "u8": mx.uint8,
    "i32": mx.int32,
}


def cases():
    """(kernel name, case) for every case in SPECS, the one table of the kernels' interfaces."""
    for name, spec in kernels.SPECS.items():
        for case in spec.cases:
            yield name, case


def case_key(name: str, case: Case) -> str:
    """A file name for one case, the same in any checkout whose SPECS lists it (for --compare)."""
    args = "-".join(f"{k}{v}" for k, v in case.template.items())
    return f"{name}-{'.'.join(case.inputs)}-{args}"


def translation_unit(name: str, case: Case) -> tuple[str, str]:
    """(the kernel's name, its source) as MLX's custom_kernel.cpp builds them (cuda_cache.kernel_source:
    every input an array, its shapes and strides where the body names them)."""
    header, body = kernels.kernel_sources("cuda")[name]
    header = cuda_cache.included_header(header)  # as MLX is given it (dispatch._texts)
    spec = kernels.SPECS[name]
    template = [(k, DTYPE[v] if isinstance(v, str) else v) for k, v in case.template.items()]
    func = cuda_cache.kernel_name(f"oss_{name}", template)
    inputs = [(DTYPE[d.removesuffix("c")], 1) for d in case.inputs]
    outputs = [DTYPE[d] for d in case.outputs]
    source = cuda_cache.kernel_source(
        func, header, body, list(spec.inputs), inputs, list(spec.outputs), outputs, template
    )
    return func, source


def compile_one(src: str, path: Path, includes: list[str], ptx: bool) -> tuple[int, str]:
    path.write_text(src)
    out = path.with_suffix(".ptx" if ptx else ".o")
    flags = ["-ptx"] if ptx else ["-c", "-Xptxas", "-v"]
    arch = "-gencode=arch=compute_90a,code=sm_90a"
    cmd = ["nvcc", "-std=c++17", arch, *flags, *includes, "-o", str(out), str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    keep = [ln.strip() for ln in r.stderr.splitlines() if re.search(r"error|registers|spill", ln)]
    return r.returncode, "\n    ".join(keep)


def compile_nvrtc(src: str, func: str, lib: str, includes: list[str]) -> tuple[int, str]:
    """The same translation unit through NVRTC as MLX calls it (cuda_cache.nvrtc_compile; no GPU
    needed: the `nvidia-cuda-nvrtc` wheel's libnvrtc.so runs anywhere), with ptxas's register report."""
    try:
        _, _, log = cuda_cache.nvrtc_compile(
            src,
            f"mlx::core::cu::{func}",
            "sm_90a",
            {},
            lib,
            [i.removeprefix("-I") for i in includes],
            ("--std=c++17", "--ptxas-options=-v"),
        )
        rc = 0
    except RuntimeError as e:
        rc, log = 1, str(e)
    keep = [ln.strip() for ln in log.splitlines() if re.search(r"error|registers|spill", ln)]
    return rc, "\n    ".join(keep)


def _ptx_code(path: Path) -> list[str]:
    """A PTX file without comments and the per-file symbol hashes of unused globals."""
    lines = path.read_text().splitlines()
    return [ln for ln in lines if not ln.startswith("//") and ".global .align 1 .b8" not in ln]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlx-src", help="MLX source checkout (has mlx/backend/cuda/device/*.cuh)")
    p.add_argument("--mlx-include", help="the mlx-cuda wheel's mlx/include folder")
    p.add_argument("--only", nargs="*", help="kernel names")
    p.add_argument("--ptx", help="write PTX here instead of reporting registers")
    p.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"), help="compare two --ptx folders")
    p.add_argument("--nvrtc", metavar="LIBNVRTC", help="compile with this libnvrtc.so instead of nvcc")
    p.add_argument("--cuda-include", help="CUDA's headers (cuda_bf16.h ...), for --nvrtc")
    a = p.parse_args()
    if a.compare:
        left, right = Path(a.compare[0]), Path(a.compare[1])
        same = True
        for f in sorted(left.glob("*.ptx")):
            if not (right / f.name).is_file():
                print(f"{f.name}: only in {left}")
                continue
            eq = _ptx_code(f) == _ptx_code(right / f.name)
            same &= eq
            print(f"{f.name}: {'identical' if eq else 'DIFFERENT'}")
        return 0 if same else 1
    if not (a.mlx_src and a.mlx_include):
        p.error("--mlx-src and --mlx-include are needed to compile")
    inc = [f"-I{a.mlx_src}", f"-I{a.mlx_include}", f"-I{Path(a.mlx_include) / 'cccl'}"]
    if a.cuda_include:
        inc.append(f"-I{a.cuda_include}")
    work = Path(a.ptx) if a.ptx else Path(tempfile.mkdtemp(prefix="oss-mlx-nvcc-"))
    work.mkdir(parents=True, exist_ok=True)
    ok = True
    for name, case in cases():
        if a.only and name not in a.only:
            continue
        func, source = translation_unit(name, case)
        if a.nvrtc:
            rc, report = compile_nvrtc(source, func, a.nvrtc, inc)
        else:
            rc, report = compile_one(source, work / f"{case_key(name, case)}.cu", inc, bool(a.ptx))
        ok &= rc == 0
        print(f"{name} {case.template}: {'ok' if rc == 0 else 'FAILED'}\n    {report}".rstrip())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
