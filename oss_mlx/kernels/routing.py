"""The router's kernels (kernels_shared/routing.gpu): route for any batch, norm_route as the decode
MoE block's first kernel (decode_moe.moe_block). The reference: moe.route_reference."""

from __future__ import annotations

import mlx.core as mx

from .dispatch import FLOATS, backend, const, launch, on_gpu, result_dtype


def route_ok(x: mx.array, weight: mx.array, k: int) -> bool:
    """Whether route takes x [..., H] against the router's weight [E, H] with top-k (GPU, float
    rows, E <= 256, k <= 8)."""
    H = x.shape[-1]
    N = x.size // H
    return (
        backend() != "reference"
        and on_gpu()
        and x.dtype in FLOATS
        and weight.dtype in FLOATS
        and H % 8 == 0
        and weight.shape[0] <= 256
        and k <= min(weight.shape[0], 8)
        and N <= 65535
    )


def route(x: mx.array, weight: mx.array, bias: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """x [N, H] -> (weights [N, k] float32, expert indices [N, k] uint32): logits, top-k, softmax
    over the k, in one kernel (route_ok first). The k experts come in descending logit order (the
    reference's are in argpartition's order: the same set and weights; the MoE sum ignores order)."""
    N, H = x.shape
    wts, ids = launch(
        "route",
        [x, weight, bias],
        [("LT", result_dtype(x.dtype, weight.dtype)), ("H", H), ("E", weight.shape[0]), ("K", k)],
        (256 * N, 1, 1),
        (256, 1, 1),
        [(N, k), (N, k)],
        [mx.float32, mx.uint32],
    )
    return wts, ids


def norm_route(
    x: mx.array, norm_weight: mx.array, eps: float, weight: mx.array, bias: mx.array, k: int
) -> tuple[mx.array, mx.array, mx.array]:
    """x [..., H] -> (h [N, H] = RMSNorm(x), weights [N * k] float32, indices [N * k] uint32): the MoE
    block's norm, then route, in one kernel; outputs shaped for the experts' kernels."""
    H = x.shape[-1]
    N = x.size // H
    h, wts, ids = launch(
        "norm_route",
        [x, norm_weight, weight, bias, const(eps)],
        [
            ("T", x.dtype),
            ("LT", result_dtype(x.dtype, weight.dtype)),
            ("H", H),
            ("E", weight.shape[0]),
            ("K", k),
        ],
        (512 * N, 1, 1),
        (512, 1, 1),
        [(N, H), (N * k,), (N * k,)],
        [x.dtype, mx.float32, mx.uint32],
    )
    return h, wts, ids
