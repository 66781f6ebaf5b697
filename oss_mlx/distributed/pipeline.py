"""Pipeline mode: each rank holds a contiguous range of layers (plan.py sizes them by memory).

Rank 0 holds the first layers and the two ends (embedding; final norm and unembedding). A call goes
round the ring once: rank 0 embeds and runs its layers, sends the hidden state [B, T, H] to rank 1,
..., the last rank runs the last layers and sends it back to rank 0, which computes the logits. So
each token crosses each boundary once, in the activation dtype, and the logits (and sampling) stay on
rank 0. Everything else is the model's own code: `Transformer` runs the held range of layers, and
only where the hidden state comes from (`embed`) and where it goes (`head`) change.
"""

from __future__ import annotations

import mlx.core as mx

from ..config import ModelConfig
from ..model import Transformer
from .group import Group
from .plan import Share
from .protocol import AnnouncedCalls


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
        return mx.distributed.recv(shape, self.activation_dtype, self.rank - 1, group=self.group)

    def head(self, x: mx.array, last_logits_only: bool = False) -> mx.array:
        """Rank 0: send x on, receive the last stage's output, logits. Others: send x on (the
        returned array is what to evaluate)."""
        if not self.share.ends:
            return mx.distributed.send(x, (self.rank + 1) % self.world, group=self.group)
        sent = mx.distributed.send(x, 1, group=self.group)
        B, T, H = x.shape
        back = mx.distributed.recv(
            (B, 1 if last_logits_only else T, H), x.dtype, self.world - 1, group=self.group
        )
        (back,) = mx.depends([back], [sent])  # on one stream: receive only after sending
        return self.unembedding(self.norm(back))

    @property
    def dtype(self) -> mx.Dtype:
        return self.activation_dtype
