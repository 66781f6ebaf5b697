"""Load one rank's part of a checkpoint (any layout the loader reads), reading only that part.

Pipeline stages read their layers' tensors whole (lazily, as the loader does: only the tensors asked
for are ever read). Tensor-parallel ranks read rows straight from the files (partial_read.py): their
experts (axis 0 of every expert tensor, in every layout), their heads' qkv rows, their vocabulary
rows; the out projection's columns are strided on disk, so that tensor (H x Hq*D, 24 MB for the 20b)
is read whole and its columns copied out. Everything then goes through the loader's checks
(weights.iter_canonical: shapes against this rank's model, dtypes, MXFP4 quantization of float
experts), so a rank's part is held exactly as the whole model would hold it.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import safetensors_file as st
from .. import weights as W
from ..loader import Checkpoint, finish_loading, quantize_dense
from ..memory import DEFAULT_CONTEXT
from ..partial_read import Headers, read_rows
from .group import Group
from .pipeline import PipelineStage
from .plan import Plan
from .tensor_parallel import Cut, TensorParallelRank, apply_cut, cut

# Recipes whose output rows are the source's rows (axis 0 kept): a row range can be read from the source.
_ROW_WISE = (W.identity, W.blocks_to_uint32)


def activation_dtype(ckpt: Checkpoint, dtype: mx.Dtype | None) -> mx.Dtype:
    """The hidden states' dtype: the float dtype of the stored embedding (its scales' if quantized),
    or the dtype the weights are cast to. Read from the header: every rank knows it, with or without
    the embedding."""
    if dtype is not None:
        return dtype
    for name in ("embedding.scales", "embedding.weight"):
        srcs, _ = ckpt.recipes.get(name, ([], None))
        if srcs and srcs[0] in ckpt.tensors:
            return st.MLX_DTYPES[ckpt.tensors.dtype_of[srcs[0]]]
    raise W.CheckpointError(f"{ckpt.folder}: no embedding tensor to take the activation dtype from")


class _ShareTensors:
    """What weights.iter_canonical reads, for one rank: canonical name -> this rank's part of it,
    described (shape, dtype) as the part it returns. The checkpoint itself is checked whole first
    (build_rank_model), so these checks are of the parts."""

    def __init__(self, ckpt: Checkpoint, cuts: dict[str, Cut | None], expected: dict):
        self.ckpt, self.cuts, self.expected = ckpt, cuts, expected
        self.headers: Headers = {}
        self.file_of, self.shape_of, self.dtype_of = {}, {}, {}
        for n, (shape, dtype) in expected.items():
            if n not in ckpt.recipes:
                continue
            if ckpt.quantize_float_experts and W.EXPERT_WEIGHT.search(n):
                shape, dtype = (*shape[:-1], shape[-1] * 8), mx.float32  # quantized after reading
            self.file_of[n] = ckpt.tensors.file_of[ckpt.recipes[n][0][0]]
            self.shape_of[n], self.dtype_of[n] = tuple(shape), st.NAME_OF[dtype]

    def __contains__(self, name: str) -> bool:
        return name in self.shape_of

    def names(self) -> list[str]:
        return list(self.shape_of)

    def __getitem__(self, name: str) -> mx.array:
        srcs, build = self.ckpt.recipes[name]
        part = self.cuts[name]
        tensors = self.ckpt.tensors
        if part is None:
            return build(*(tensors[s] for s in srcs))  # lazy: read when evaluated
        if part.zeros:
            shape, dtype = self.expected[name]
            return mx.zeros(shape, dtype)
        if part.rows is not None:
            if build in _ROW_WISE or (build is W.transpose_last and len(tensors.shape_of[srcs[0]]) >= 3):
                return build(read_rows(tensors.file_of[srcs[0]], srcs[0], list(part.rows), self.headers))
            if isinstance(build, W.ConcatRows):  # the hub's q, k and v: each range in its own source
                pieces, base = [], 0
                for s in srcs:
                    n = tensors.shape_of[s][0]
                    ranges = [
                        range(max(r.start, base) - base, min(r.stop, base + n) - base) for r in part.rows
                    ]
                    ranges = [r for r in ranges if len(r) > 0]
                    pieces.append(read_rows(tensors.file_of[s], s, ranges, self.headers))
                    base += n
                return mx.concatenate(pieces, axis=0)
        out = apply_cut(build(*(tensors[s] for s in srcs)), part)
        mx.eval(out)  # now, so that the whole tensor is released before the next one is read
        return out


def _check_whole(ckpt: Checkpoint, quantization: dict | None) -> None:
    """The loader's checks of the whole checkpoint against the whole model, from the headers (every
    rank: each reads its own copy), before any part is read."""
    from ..model import Transformer

    whole = Transformer(ckpt.config, quantized_experts=not ckpt.float_experts)  # never evaluated
    quantize_dense(whole, quantization)
    expected = {k: (v.shape, v.dtype) for k, v in tree_flatten(whole.parameters())}
    W.check_checkpoint(
        ckpt.tensors,
        ckpt.recipes,
        expected,
        quantize_float_experts=ckpt.quantize_float_experts,
        folder=ckpt.folder,
        config=ckpt.config,
    )


def build_rank_model(ckpt: Checkpoint, plan: Plan, group: Group, dtype: mx.Dtype | None = None):
    """This rank's model, filled with its part of the checkpoint, ready to run."""
    share = plan.shares[group.rank]
    config = ckpt.config
    if plan.mode == "pipeline":
        model = PipelineStage(config, share, group, activation_dtype(ckpt, dtype), not ckpt.float_experts)
    else:
        model = TensorParallelRank(config, share, group, not ckpt.float_experts)
    quantization = ckpt.raw.get("oss_mlx", {}).get("quantization")
    quantize_dense(model, quantization)
    _check_whole(ckpt, quantization)
    local = {k: (v.shape, v.dtype) for k, v in tree_flatten(model.parameters())}
    names = {model.canonical_name(k): k for k in local}
    expected = {name: local[k] for name, k in names.items()}
    if plan.mode == "tensor":
        shape_of = {
            n: tuple(ckpt.tensors.shape_of[ckpt.recipes[n][0][0]]) for n in expected if n in ckpt.recipes
        }
        cuts = {n: cut(n, shape_of.get(n, ()), config, share, group.rank) for n in expected}
    else:
        cuts = dict.fromkeys(expected)
    tensors = _ShareTensors(ckpt, cuts, expected)
    weights = W.iter_canonical(
        tensors,
        {n: ([n], W.identity) for n in expected if n in ckpt.recipes},
        expected,
        dtype=dtype,
        quantize_float_experts=ckpt.quantize_float_experts,
        folder=ckpt.folder,
        config=config,
    )
    filled = []
    for name, array in weights:
        mx.eval(array)  # one tensor at a time: the peak is this rank's part plus one tensor
        filled.append((names[name], array))
    model.load_weights(filled, strict=True)
    kv = share.kv_bytes * DEFAULT_CONTEXT // max(plan.context, 1)
    return finish_loading(model, ckpt, kv=kv)
