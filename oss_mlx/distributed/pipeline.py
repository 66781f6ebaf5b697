"""Pipeline mode: each rank holds a contiguous range of layers (plan.py sizes them by memory).

Rank 0 holds the first layers and the two ends (embedding; final norm and unembedding). A call goes
round the ring once: rank 0 embeds and runs its layers, sends the hidden state [B, T, H] to rank 1,
..., the last rank runs the last layers and sends it back to rank 0, which computes the logits. So
each token crosses each boundary once, in the activation dtype, and the logits (and sampling) stay on
rank 0. Everything else is the model's own code: `Transformer` runs the held range of layers, and
only where the hidden state comes from (`embed`) and where it goes (`head`) change.

The hand-off is a send and a recv where the backend has them (ring, JACCL, MPI). MLX's NCCL backend
has neither (0.32: "Send not supported"), so there each boundary is an all_sum to which only the
sending stage adds its hidden state (x + 0 is exact): N all_sums a token, every rank taking part in
each (OSS_MLX_PIPELINE_HANDOFF=collective forces this on any backend; the tests run it on the ring).
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..config import ModelConfig
from ..model import Transformer
from .group import Group
from .plan import Share
from .protocol import AnnouncedCalls

P2P_BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi")


def handoff(backend: str) -> str:
    """ "p2p" (send/recv) or "collective" (all_sum) for this backend (module docstring)."""
    forced = os.environ.get("OSS_MLX_PIPELINE_HANDOFF")
    if forced in ("p2p", "collective"):
        return forced
    return "p2p" if backend in P2P_BACKENDS else "collective"


class PipelineStage(AnnouncedCalls, Transformer):
    def __init__(
        self,
        config: ModelConfig,
        share: Share,
        group: Group,
        activation_dtype: mx.Dtype,
        quantized_experts=True,
    ):
        super().__init__(config, quantized_experts, layers=share.layers)
        self.share = share
        self.group, self.rank, self.world = group.group, group.rank, group.size
        self.activation_dtype = activation_dtype
        self.p2p = handoff(group.backend) == "p2p"
        if not share.ends:
            del self.embedding, self.norm, self.unembedding

    def canonical_name(self, name: str) -> str:
        """This stage's parameter name -> the checkpoint's (blocks are numbered from layers.start)."""
        if name.startswith("blocks."):
            _, j, rest = name.split(".", 2)
            return f"blocks.{self.layer_range.start + int(j)}.{rest}"
        return name

    def embed(self, tokens: mx.array) -> mx.array:
        if self.share.ends:
            return self.embedding(tokens)
        shape = (*tokens.shape, self.config.hidden_size)
        if self.p2p:
            return mx.distributed.recv(shape, self.activation_dtype, self.rank - 1, group=self.group)
        x = None  # boundaries 0 .. rank-1 (the stages before this one), the last bringing its input
        for _ in range(self.rank):
            x = self._boundary(None, shape, self.activation_dtype, x)
        return x

    def head(self, x: mx.array, last_logits_only: bool = False) -> mx.array:
        """Rank 0: send x on, receive the last stage's output, logits. Others: send x on (the
        returned array is what to evaluate)."""
        B, T, H = x.shape
        if self.p2p:
            if not self.share.ends:
                return mx.distributed.send(x, (self.rank + 1) % self.world, group=self.group)
            sent = mx.distributed.send(x, 1, group=self.group)
            back = mx.distributed.recv(
                (B, 1 if last_logits_only else T, H), x.dtype, self.world - 1, group=self.group
            )
            (back,) = mx.depends([back], [sent])  # on one stream: receive only after sending
        else:  # this stage's boundary, then the ones after it; the last one brings rank 0 its input
            back = self._boundary(x, x.shape, x.dtype, None)
            for b in range(self.rank + 1, self.world):
                last = b == self.world - 1
                back = self._boundary(None, (B, 1 if last and last_logits_only else T, H), x.dtype, back)
            if not self.share.ends:
                return back
        return self.unembedding(self.norm(back))

    def _boundary(self, x: mx.array | None, shape, dtype, after: mx.array | None) -> mx.array:
        """One stage boundary as an all_sum: the sender adds x, the others zeros; after the previous."""
        value = x if x is not None else mx.zeros(shape, dtype)
        if after is not None:
            (value,) = mx.depends([value], [after])
        return mx.distributed.all_sum(value, group=self.group)

    @property
    def dtype(self) -> mx.Dtype:
        return self.activation_dtype
