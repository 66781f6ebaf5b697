"""The translation unit of a custom kernel, as mx.fast.metal_kernel writes it, and its C++ form.

MLX (mlx/backend/common/metal_kernel.cpp, v0.32: write_signature, write_template,
make_template_hash) builds a kernel from the header, a generated signature and the body: inputs as
`const device T*` (`const constant T*` under 8 elements, `const constant T&` for 0-d arrays), then
`{name}_shape` / `_strides` / `_ndim` where the body names them, outputs as `device T*`, the
thread-position attributes whose names appear in the body, and an explicit instantiation of the
template under a name that encodes the template arguments and the input and output types. It
prepends its Metal prelude (metal::utils()); here shim.h stands in for it.

`mlx_source` reproduces MLX's text; `cpp_source` is that text with the changes C++ needs, and only
those: the kernel-scope `threadgroup` arrays become statics in the section the runtime manages, the
`[[host_name]]` attributes leave the explicit instantiation, and an entry point (`oss_thread`) calls
the kernel with one thread's buffers and positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

# Inputs with fewer elements are passed in the constant address space (MLX's max_constant_array_size).
MAX_CONSTANT_ARRAY_SIZE = 8

TYPE_STRINGS = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float64: "double",
    mx.complex64: "complex64_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}

# The attributes MLX adds to the signature when their name occurs in the body, with their types.
ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


def type_string(dtype: mx.Dtype) -> str:
    """MLX's name for a dtype in Metal source (get_type_string)."""
    try:
        return TYPE_STRINGS[dtype]
    except KeyError:
        raise ValueError(f"metal_kernel: unsupported dtype {dtype}") from None


@dataclass(frozen=True)
class Input:
    """What the generated signature depends on for one input array."""

    dtype: str  # MLX's type string
    ndim: int
    size: int

    @property
    def space(self) -> str:
        return "constant" if self.size < MAX_CONSTANT_ARRAY_SIZE else "device"

    @property
    def suffix(self) -> str:  # the kernel name's mark for how the input is passed
        return "s" if self.ndim == 0 else "c" if self.size < MAX_CONSTANT_ARRAY_SIZE else ""


TemplateArg = tuple[str, "int | bool | mx.Dtype"]


def _template_value(value) -> tuple[str, str]:
    """(parameter kind, argument text) of a template argument (bool before int: bool is an int)."""
    if isinstance(value, bool):
        return "bool", str(int(value))  # MLX streams a bool as 1 / 0
    if isinstance(value, int):
        return "int", str(value)
    if isinstance(value, mx.Dtype):
        return "typename", type_string(value)
    raise ValueError(f"metal_kernel: a template argument is an int, a bool or a dtype (got {value!r})")


def _template_hash(template_def: str) -> str:
    """MLX's make_template_hash: '<' and '>' become '_', so do ', ', and the last character goes."""
    out, i = [], 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


def shape_infos(source: str, input_names: list[str]) -> list[tuple[bool, bool, bool]]:
    """Which of `{name}_shape`, `_strides`, `_ndim` the body names, per input."""
    return [tuple(f"{n}_{what}" in source for what in ("shape", "strides", "ndim")) for n in input_names]


def attributes(source: str) -> list[tuple[str, str]]:
    return [(name, t) for name, t in ATTRIBUTES if name in source]


@dataclass(frozen=True)
class Kernel:
    """One kernel as mx.fast.metal_kernel was asked for it (the factory's arguments)."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str
    atomic_outputs: bool = False


@dataclass(frozen=True)
class Instance:
    """A launch's part of the source: template arguments, inputs, output types."""

    template: tuple[TemplateArg, ...]
    inputs: tuple[Input, ...]
    output_types: tuple[str, ...]


def kernel_name(k: Kernel, inst: Instance) -> str:
    name = "custom_kernel_" + k.name
    if inst.template:
        name += "_" + _template_hash(_template_def(inst.template))
    for a in inst.inputs:
        name += "_" + a.dtype + a.suffix
    for t in inst.output_types:
        name += "_" + t
    return name


def _template_def(template) -> str:
    return "<" + ", ".join(_template_value(v)[1] for _, v in template) + ">"


_SHAPE_PARAMS = (
    "const constant int* {}_shape",
    "const constant int64_t* {}_strides",
    "const constant int& {}_ndim",
)


def _signature(k: Kernel, inst: Instance, name: str) -> str:
    text = ""
    if inst.template:
        text += "template <" + ", ".join(f"{_template_value(v)[0]} {n}" for n, v in inst.template) + ">\n"
    text += f"[[kernel]] void {name}(\n"
    params, index = [], 0
    for arg, info, a in zip(k.input_names, shape_infos(k.source, list(k.input_names)), inst.inputs):
        params.append(f"  const {a.space} {a.dtype}{'&' if a.ndim == 0 else '*'} {arg} [[buffer({index})]]")
        index += 1
        if a.ndim > 0:
            for present, decl in zip(info, _SHAPE_PARAMS):
                if present:
                    params.append(f"  {decl.format(arg)} [[buffer({index})]]")
                    index += 1
    for arg, t in zip(k.output_names, inst.output_types):
        t = f"atomic<{t}>" if k.atomic_outputs else t
        params.append(f"  device {t}* {arg} [[buffer({index})]]")
        index += 1
    params += [f"  {t} {attr} [[{attr}]]" for attr, t in attributes(k.source)]
    return text + ",\n".join(params) + ") {\n"


def mlx_source(k: Kernel, inst: Instance) -> str:
    """The kernel's source exactly as MLX writes it (without MLX's prelude)."""
    name = kernel_name(k, inst)
    text = k.header + _signature(k, inst, name) + k.source + "\n}\n"
    if inst.template:
        d = name + _template_def(inst.template)
        text += f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({d}) {d};\n'
    return text


def _threadgroup_words(header: str) -> list[str]:
    """`threadgroup` and the header's macros that stand for it (e.g. `#define OSS_SHARED threadgroup`)."""
    return ["threadgroup"] + re.findall(r"(?m)^\s*#define\s+(\w+)\s+threadgroup\s*$", header)


def cpp_source(k: Kernel, inst: Instance) -> str:
    """The C++ translation unit the emulator compiles (shim.h is included before it)."""
    name = kernel_name(k, inst)
    words = "|".join(_threadgroup_words(k.header))
    # Kernel-scope threadgroup arrays (a statement starting with the address space) become statics
    # in the runtime's section; parameters and casts keep their address space.
    body = re.sub(rf"(?m)^([ \t]*)(?=(?:{words})\s)", r"\1static OSS_THREADGROUP_STORAGE ", k.source)
    text = k.header + _signature(k, inst, name) + body + "\n}\n"
    call = name
    if inst.template:
        call = name + _template_def(inst.template)
        text += f"\ntemplate decltype({call}) {call};\n"
    return text + _entry(k, inst, call)


def _entry(k: Kernel, inst: Instance, call: str) -> str:
    """oss_thread(buffers, ids): the kernel called for one thread (runtime.cpp runs it)."""
    args, index = [], 0

    def buffer(ctype: str, space: str, ref: bool) -> str:
        nonlocal index
        ptr = f"({ctype} {space}*)(uintptr_t)oss_b[{index}]"
        index += 1
        return f"*{ptr}" if ref else ptr

    for info, a in zip(shape_infos(k.source, list(k.input_names)), inst.inputs):
        args.append(
            buffer(f"const {a.dtype}", "constant" if a.space == "constant" else "device", a.ndim == 0)
        )
        if a.ndim > 0:
            for present, ctype, ref in zip(
                info, ("const int", "const int64_t", "const int"), (False, False, True)
            ):
                if present:
                    args.append(buffer(ctype, "constant", ref))
    for t in inst.output_types:
        args.append(buffer(f"atomic<{t}>" if k.atomic_outputs else t, "device", False))
    for attr, t in attributes(k.source):
        f = f"oss_t->{attr}"
        args.append(f"uint3({f}.x, {f}.y, {f}.z)" if t == "uint3" else f)
    return (
        '\nextern "C" void oss_thread(void** oss_b, const OssThreadIds* oss_t) {\n  '
        + call
        + "(\n    "
        + ",\n    ".join(args)
        + ");\n}\n"
    )
