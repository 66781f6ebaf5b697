"""Tensor / expert parallel mode: every rank holds every layer, 1/N of each (plan.py says which part).

attention  a slice of the query heads, the KV heads they read (a KV head shared by two ranks' heads is
           held by both), their sinks, the qkv rows and the out projection's columns of those heads;
           each rank's out projection gives a partial sum of the output, all_summed.
experts    a contiguous slice of the experts; the router (small) is whole, so every rank makes the
           same choices; a rank computes the chosen experts it holds (the others weigh 0) and the
           partial outputs are all_summed.
vocabulary the embedding's and unembedding's rows: a token's row is looked up where it lives (an
           all_sum of one non-zero row), the logits' slices are all_gathered.

The residual is added by rank 0 only, inside the all_sum (`RankShard.residual`), so the fused decode
kernels, which add it themselves, still apply; the out projection's bias is held by rank 0 only, for
the same reason. The sums run in another order than on one machine, so logits agree to rounding
(float32: ~1e-6 relative), not bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import mlx.core as mx

from ..config import ModelConfig
from ..model import Transformer
from ..moe import Router
from .group import Group
from .plan import Share
from .protocol import AnnouncedCalls


class RankShard:
    """One rank's part of a block's output: summed over the group, the residual counted once."""

    def __init__(self, group: Group):
        self.group, self.rank = group.group, group.rank

    def residual(self, x: mx.array) -> mx.array:
        return x if self.rank == 0 else mx.zeros_like(x)

    def all_sum(self, y: mx.array) -> mx.array:
        return mx.distributed.all_sum(y, group=self.group)


class ExpertShard(RankShard):
    """... of an MoE block holding experts [first, first + count)."""

    def __init__(self, group: Group, experts: range):
        super().__init__(group)
        self.first, self.stop = experts.start, experts.stop

    def local(self, weights: mx.array, indices: mx.array) -> tuple[mx.array, mx.array]:
        """The router's choices as this rank's experts: chosen ones held elsewhere weigh 0 (and point
        at the first expert held, whose output they then multiply by 0)."""
        held = (indices >= self.first) & (indices < self.stop)
        return mx.where(held, weights, 0), mx.where(held, indices - self.first, 0).astype(indices.dtype)


class TensorParallelRank(AnnouncedCalls, Transformer):
    def __init__(self, config: ModelConfig, share: Share, group: Group, quantized_experts: bool = True):
        local = replace(
            config,
            num_attention_heads=len(share.heads),
            num_key_value_heads=len(share.kv_heads),
            num_experts=len(share.experts),
            experts_per_token=min(config.experts_per_token, len(share.experts)),
            vocab_size=len(share.vocab),
        )
        super().__init__(local, quantized_experts)
        self.config = config  # the whole model's (layer count, context limit); `local` sized the parts
        self.share = share
        self.group, self.rank, self.world = group.group, group.rank, group.size
        self.widest_vocab = max(len(v) for v in _vocab_slices(config, group.size))
        for block in self.blocks:
            block.attn.shard = RankShard(group)
            block.mlp.router = Router(config.hidden_size, config.num_experts, config.experts_per_token)
            block.mlp.shard = ExpertShard(group, share.experts)

    def canonical_name(self, name: str) -> str:
        return name

    def embed(self, tokens: mx.array) -> mx.array:
        first, stop = self.share.vocab.start, self.share.vocab.stop
        held = (tokens >= first) & (tokens < stop)
        x = self.embedding(mx.where(held, tokens - first, 0))
        return mx.distributed.all_sum(mx.where(held[..., None], x, 0), group=self.group)

    def head(self, x: mx.array, last_logits_only: bool = False) -> mx.array:
        logits = self.unembedding(self.norm(x))  # [B, T, this rank's rows]
        pad = self.widest_vocab - logits.shape[-1]
        if pad:  # all_gather takes equal shapes: slices of an uneven split are padded, then cut
            logits = mx.pad(logits, [(0, 0), (0, 0), (0, pad)])
        B, T, W = logits.shape
        every = mx.distributed.all_gather(logits, group=self.group)  # [world * B, T, W]
        every = every.reshape(self.world, B, T, W).transpose(1, 2, 0, 3)
        if self.widest_vocab * self.world == self.config.vocab_size:
            return every.reshape(B, T, self.config.vocab_size)
        return mx.concatenate(
            [every[:, :, r, : len(v)] for r, v in enumerate(_vocab_slices(self.config, self.world))], -1
        )


def _vocab_slices(config: ModelConfig, world: int) -> list[range]:
    from .plan import split_evenly

    return split_evenly(config.vocab_size, world)


# ---- which part of each checkpoint tensor a rank reads -----------------------------------------------


@dataclass(frozen=True)
class Cut:
    """A rank's part of a canonical tensor: rows (axis 0, concatenated), columns [lo, hi) of axis 1,
    or zeros (a bias only rank 0 adds)."""

    rows: tuple[range, ...] | None = None
    cols: tuple[int, int] | None = None
    zeros: bool = False


def apply_cut(whole: mx.array, part: Cut | None) -> mx.array:
    """This rank's part of a whole tensor (a copy: the whole can then be released)."""
    if part is None:
        return whole
    if part.zeros:
        return mx.zeros_like(whole)
    if part.rows is not None:
        return mx.concatenate([whole[r.start : r.stop] for r in part.rows], axis=0)
    lo, hi = part.cols
    return mx.contiguous(whole[:, lo:hi])


_LAYER = re.compile(r"^blocks\.\d+\.(attn|mlp)\.(.+)$")


def cut(name: str, full_shape: tuple[int, ...], config: ModelConfig, share: Share, rank: int) -> Cut | None:
    """What `share` holds of canonical tensor `name` (None: the whole tensor)."""
    if name.split(".")[0] in ("embedding", "unembedding"):
        return Cut(rows=(share.vocab,))
    m = _LAYER.match(name)
    if m is None:
        return None
    part, rest = m.groups()
    if part == "mlp":
        return Cut(rows=(share.experts,)) if rest.startswith("experts.") else None
    D, hq, hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    h, k = share.heads, share.kv_heads
    if rest.startswith("qkv."):
        return Cut(
            rows=(
                range(h.start * D, h.stop * D),
                range((hq + k.start) * D, (hq + k.stop) * D),
                range((hq + hkv + k.start) * D, (hq + hkv + k.stop) * D),
            )
        )
    if rest == "sinks":
        return Cut(rows=(h,))
    if rest == "out.bias":
        return None if rank == 0 else Cut(zeros=True)
    if rest.startswith("out."):  # weight [H, Hq*D] (packed or grouped proportionally when quantized)
        cols = full_shape[1]
        return Cut(cols=(cols * h.start // hq, cols * h.stop // hq))
    return None
