"""The custom kernels: fused GPU ops for the decode step and the prefill experts, below the model.

Every fused op has a pure-MLX reference in the model files (the CPU / CI path, and what the kernels
are tested against). The kernels are source text compiled by MLX at first use
(`mx.fast.metal_kernel` / `mx.fast.cuda_kernel`); sources.py says where each lives and holds each
kernel's interface (SPECS).

  kernel           launcher (this package)          source (family)     reference (model side)
  route            routing.route                    routing             moe.route_reference
  norm_route       routing.norm_route               routing             moe.MLPBlock: norm, router
  gate_up_swiglu   decode_moe.moe_block, moe_decode decode_moe          moe.Experts
  down_combine     decode_moe.moe_block, moe_decode decode_moe          moe.MLPBlock: weighted sum
  moe_group        prefill_moe.moe_prefill          prefill_moe         moe.Experts: sorted rows
  moe_gemm         prefill_moe.moe_prefill          prefill_moe (*)     moe.Experts: gather_qmm_mxfp4
  norm_qkv_rope    decode_attention.norm_qkv_rope   decode_attention    attention.AttentionBlock
  sdpa_decode      decode_attention.sdpa_decode     decode_attention    attention.sdpa_with_sinks
  sdpa_decode_mma  decode_attention.sdpa_decode     decode_attention (*) attention.sdpa_with_sinks
  sdpa_combine     decode_attention.sdpa_decode     decode_attention
  out_residual     decode_attention.out_residual    decode_attention    attention.AttentionBlock
A family's source is kernels_shared/<family>.gpu, one text for both dialects; (*): written per
dialect for the matrix units, kernels_metal/<family>.metal and kernels_cuda/<family>.cu.

Modules: dispatch (which backend runs: metal | cuda | reference, OSS_MLX_KERNELS; emulated; the
launch), sources (SPECS, kernel_sources), weights (the named tuples of arrays the launchers take),
and one per stage. The convention for every fused op: its predicate `*_ok(...)` says whether the
kernels take these arrays here (backend, GPU stream, shapes); the model calls the launcher only
then, its reference otherwise. Nothing in this package imports the model.

At batch 1 the decode step is bound by the number of ops more than by their size (each MLX op costs
microseconds of dispatch), so a decode step on the kernels is ~10 ops per layer instead of ~47.
"""

from . import decode_attention, decode_moe, prefill_moe, routing
from .dispatch import (
    BACKENDS,
    ENV,
    KERNEL_MAX_HIDDEN,
    available_backend,
    backend,
    disable,
    disabled,
    emulated,
    poison_outputs,
    position_array,
    ring_slot,
    use_backend,
)
from .sources import SPECS, kernel_sources
from .weights import AttentionWeights, ExpertWeights

__all__ = [
    "AttentionWeights",
    "BACKENDS",
    "ENV",
    "ExpertWeights",
    "KERNEL_MAX_HIDDEN",
    "SPECS",
    "available_backend",
    "backend",
    "decode_attention",
    "decode_moe",
    "disable",
    "disabled",
    "emulated",
    "kernel_sources",
    "poison_outputs",
    "position_array",
    "prefill_moe",
    "ring_slot",
    "routing",
    "use_backend",
]
