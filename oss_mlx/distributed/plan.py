"""The split of one model over several machines: which layers, heads, experts and vocabulary rows each
rank holds, the memory that takes per rank, and which of the two modes to use.

pipeline  each rank holds a contiguous range of layers, sized by its memory budget; rank 0 also holds
          the embedding, the final norm and the unembedding, so the hidden state goes once round the
          ring (0 -> 1 -> ... -> N-1 -> 0) and the logits never cross a link. Rank 0 holds a layer of
          every attention kind (sliding and full): it answers the cache's rewind questions for all.
tensor    every rank holds every layer, 1/N of it: a slice of the query heads (and the KV heads they
          read; shared KV heads are held by each rank that needs them), a contiguous slice of the
          experts (the router is whole, it is small) and of the vocabulary rows of the embedding and
          unembedding. Partial outputs meet in an all_sum after each attention and MoE block.

Which one: pipeline when tensor parallel does not fit (unequal machines) or the link is slow; tensor
when both fit and the all_sums per token (2 per layer + 2) cost less than the compute tensor parallel
saves, estimated from the weights a token reads and ASSUMED_BANDWIDTH (see `choose_mode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..config import ModelConfig
from ..memory import (
    DEFAULT_CONTEXT,
    PREFILL_CHUNK,
    activation_bytes,
    expert_bytes,
    kv_bytes_per_layer,
    weight_bytes,
)

MODES = ("pipeline", "tensor")
# Memory a decode step is assumed to read per second, to weigh tensor parallel's all_sums against the
# compute it splits (Apple M-series Max/Ultra: 400-800 GB/s; the estimate only has to rank the modes).
ASSUMED_BANDWIDTH = 200e9
# all_sum latency assumed per backend when it has not been measured (`oss-mlx plan --hosts`): the ring
# over TCP (Ethernet, Thunderbolt bridge) ~ 100-300 us per small all_sum; RDMA and NVLink ~ 10 us.
ASSUMED_LATENCY = {"ring": 200e-6, "jaccl": 10e-6, "jaccl-ring": 10e-6, "nccl": 10e-6, "mpi": 100e-6}
# Beyond weights, KV cache and activations: MLX's buffers, the Python runtime, the control link.
RESERVE = 512 * 2**20


class PlanError(ValueError):
    """The model cannot be split over these machines; the message says why and what to do."""


def split_evenly(n: int, parts: int) -> list[range]:
    """0..n-1 in `parts` contiguous ranges whose sizes differ by at most one (larger first)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        out.append(range(start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class Share:
    """What one rank holds. Ranges are global indices."""

    rank: int
    layers: range
    ends: bool = False  # pipeline: embedding, final norm, unembedding (rank 0)
    heads: range | None = None  # tensor: query heads
    kv_heads: range | None = None  # tensor: the KV heads those query heads read
    experts: range | None = None  # tensor: experts held (of every layer)
    vocab: range | None = None  # tensor: rows of the embedding and the unembedding
    weight_bytes: int = 0
    kv_bytes: int = 0  # at the plan's context
    activation_bytes: int = 0

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + RESERVE

    def describe(self, config: ModelConfig) -> str:
        if self.heads is None:
            ends = " + embedding, norm, unembedding" if self.ends else ""
            return f"layers {_span(self.layers)} ({len(self.layers)} of {config.num_layers}){ends}"
        return (
            f"heads {_span(self.heads)}, KV heads {_span(self.kv_heads)}, experts {_span(self.experts)}, "
            f"vocabulary rows {_span(self.vocab)}"
        )


def _span(r: range | None) -> str:
    if r is None or len(r) == 0:
        return "-"
    return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"


@dataclass(frozen=True)
class Plan:
    mode: str
    shares: tuple[Share, ...]
    context: int
    why: str = ""
    budgets: tuple[int, ...] = field(default=())

    @property
    def world(self) -> int:
        return len(self.shares)

    def as_dict(self) -> dict:
        """A plain description (compared across ranks at start-up, shown by `oss-mlx plan`)."""

        def r(x: range | None):
            return None if x is None else [x.start, x.stop]

        return {
            "mode": self.mode,
            "context": self.context,
            "shares": [
                {
                    "rank": s.rank,
                    "layers": r(s.layers),
                    "ends": s.ends,
                    "heads": r(s.heads),
                    "kv_heads": r(s.kv_heads),
                    "experts": r(s.experts),
                    "vocab": r(s.vocab),
                }
                for s in self.shares
            ],
        }


# ---- bytes ----------------------------------------------------------------------------------------


def _layer_kv(config: ModelConfig, context: int, kv_heads: int | None = None) -> list[int]:
    """KV cache bytes per layer at `context` tokens (kv_heads: a tensor-parallel rank's count)."""
    heads = kv_heads or config.num_key_value_heads
    return [b * heads // config.num_key_value_heads for b in kv_bytes_per_layer(config, context)]


def _layer_weights(config: ModelConfig, quantization: dict | None, dtype_bytes: int) -> int:
    w = weight_bytes(config, quantization, dtype_bytes)
    return (
        w["experts"] + w["attention"] + w["other"] - config.hidden_size * dtype_bytes
    ) // config.num_layers


def _ends_bytes(config: ModelConfig, quantization: dict | None, dtype_bytes: int) -> int:
    w = weight_bytes(config, quantization, dtype_bytes)
    return w["embedding"] + w["unembedding"] + config.hidden_size * dtype_bytes


# ---- tensor parallel ------------------------------------------------------------------------------


def tensor_problems(config: ModelConfig, world: int, quantization: dict | None = None) -> list[str]:
    """Why `world` ranks cannot split this model's heads and experts evenly ([] when they can)."""
    hq, hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    problems = []
    if hq % world:
        problems.append(f"{hq} query heads do not split over {world} ranks")
    else:
        local, group = hq // world, hq // hkv
        if local % group and group % local:
            problems.append(f"{local} query heads per rank do not match KV groups of {group}")
        q = (quantization or {}).get("attention")
        if q and (local * D) % q["group_size"]:
            problems.append(
                f"the quantized out projection's groups of {q['group_size']} columns do not split at "
                f"{local} heads of {D}"
            )
    if config.num_experts < world:
        problems.append(f"{config.num_experts} experts for {world} ranks")
    if config.vocab_size < world:
        problems.append(f"a vocabulary of {config.vocab_size} for {world} ranks")
    return problems


def tensor_shares(
    config: ModelConfig,
    world: int,
    context: int = DEFAULT_CONTEXT,
    quantization: dict | None = None,
    dtype_bytes: int = 2,
) -> list[Share]:
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    group = hq // hkv
    shares = []
    for rank, (experts, vocab) in enumerate(
        zip(split_evenly(config.num_experts, world), split_evenly(config.vocab_size, world))
    ):
        per = hq // world
        heads = range(rank * per, (rank + 1) * per)
        kv = range(heads.start // group, (heads.stop - 1) // group + 1)
        local = replace(
            config,
            num_attention_heads=per,
            num_key_value_heads=len(kv),
            num_experts=len(experts),
            experts_per_token=min(config.experts_per_token, len(experts)),
            vocab_size=len(vocab),
        )
        w = weight_bytes(local, quantization, dtype_bytes)
        router = (config.num_experts - len(experts)) * (config.hidden_size + 1) * dtype_bytes
        shares.append(
            Share(
                rank,
                range(config.num_layers),
                heads=heads,
                kv_heads=kv,
                experts=experts,
                vocab=vocab,
                weight_bytes=sum(w.values()) + config.num_layers * router,
                kv_bytes=sum(_layer_kv(config, context, len(kv))),
                activation_bytes=activation_bytes(config, PREFILL_CHUNK),
            )
        )
    return shares


# ---- pipeline -------------------------------------------------------------------------------------


def pipeline_shares(
    config: ModelConfig,
    budgets: list[int],
    context: int = DEFAULT_CONTEXT,
    quantization: dict | None = None,
    dtype_bytes: int = 2,
) -> list[Share]:
    """Contiguous layers per rank in proportion to what each budget has room for; raises PlanError
    when no split fits."""
    world, L = len(budgets), config.num_layers
    if world > L:
        raise PlanError(f"{world} ranks for {L} layers: pipeline mode needs at least one layer per rank")
    layer_w = _layer_weights(config, quantization, dtype_bytes)
    kv = _layer_kv(config, context)
    cost = [layer_w + k for k in kv]
    act = activation_bytes(config, PREFILL_CHUNK)
    ends = _ends_bytes(config, quantization, dtype_bytes)
    room = [b - act - RESERVE - (ends if r == 0 else 0) for r, b in enumerate(budgets)]
    kinds = len(set(config.layer_types))
    first_min = next(i + 1 for i in range(L) if len(set(config.layer_types[: i + 1])) == kinds)

    def fits(bounds: list[int]) -> bool:
        return all(sum(cost[bounds[r] : bounds[r + 1]]) <= room[r] for r in range(world))

    def valid(bounds: list[int]) -> bool:
        return bounds[1] >= first_min and all(bounds[r + 1] > bounds[r] for r in range(world))

    if world > L - first_min + 1:
        raise PlanError(
            f"{world} ranks for {L} layers: rank 0 holds at least {first_min} (one of each attention kind) "
            "and every other rank at least one"
        )
    # Proportional to room: each boundary where the cumulative cost is nearest the ranks' share so far.
    cum = [0]
    for c in cost:
        cum.append(cum[-1] + c)
    positive = [max(x, 0) for x in room]
    bounds, acc = [0], 0
    for r in range(world - 1):
        acc += positive[r]
        target = cum[-1] * acc / (sum(positive) or 1)
        nearest = min(range(L + 1), key=lambda j: abs(cum[j] - target))
        lo, hi = max(bounds[-1] + 1, first_min if r == 0 else 0), L - (world - 1 - r)
        bounds.append(min(max(nearest, lo), hi))
    bounds.append(L)
    if not (valid(bounds) and fits(bounds)):
        # Greedy fill: each rank takes as many layers as fit, leaving one for each rank after it.
        bounds = [0]
        for r in range(world - 1):
            i, used = bounds[-1], 0
            while i < L - (world - 1 - r) and used + cost[i] <= room[r]:
                used += cost[i]
                i += 1
            bounds.append(max(i, bounds[-1] + 1, first_min if r == 0 else 0))
        bounds.append(L)
    if not (valid(bounds) and fits(bounds)):
        need = sum(cost) + ends + world * (act + RESERVE)
        raise PlanError(
            f"the model does not fit these {world} machines in pipeline mode: it needs about "
            f"{need / 2**30:.1f} GiB at {context:,} tokens of context, they have "
            f"{sum(budgets) / 2**30:.1f} GiB together (per machine: "
            f"{', '.join(f'{b / 2**30:.1f}' for b in budgets)} GiB). Add a machine, use a smaller "
            "quality preset (oss-mlx convert --quality small) or plan a shorter context (--plan-context)."
        )
    return [
        Share(
            r,
            range(bounds[r], bounds[r + 1]),
            ends=r == 0,
            weight_bytes=layer_w * (bounds[r + 1] - bounds[r]) + (ends if r == 0 else 0),
            kv_bytes=sum(kv[bounds[r] : bounds[r + 1]]),
            activation_bytes=act,
        )
        for r in range(world)
    ]


# ---- choosing -------------------------------------------------------------------------------------


def decode_bytes(config: ModelConfig, quantization: dict | None = None, dtype_bytes: int = 2) -> int:
    """Weight bytes one decode step reads: attention, top-k experts per layer, the unembedding."""
    w = weight_bytes(config, quantization, dtype_bytes)
    experts = config.num_layers * config.experts_per_token * expert_bytes(config, dtype_bytes)
    return w["attention"] + w["other"] + experts + w["unembedding"]


def choose_mode(
    config: ModelConfig, world: int, latency: float, quantization: dict | None = None, dtype_bytes: int = 2
) -> tuple[str, str]:
    """(mode, why) when both fit: tensor when its all_sums cost less than the compute it splits."""
    step = decode_bytes(config, quantization, dtype_bytes) / ASSUMED_BANDWIDTH
    saved = step * (1 - 1 / world)
    spent = (2 * config.num_layers + 2) * latency
    verdict = "tensor" if spent < saved else "pipeline"
    why = (
        f"both fit; a decode step reads ~{step * 1e3:.1f} ms of weights at "
        f"{ASSUMED_BANDWIDTH / 1e9:.0f} GB/s: "
        f"tensor parallel saves ~{saved * 1e3:.1f} ms of it and spends "
        f"{2 * config.num_layers + 2} all_sums x {latency * 1e6:.0f} us = {spent * 1e3:.1f} ms"
    )
    return verdict, why


def make_plan(
    config: ModelConfig,
    budgets: list[int],
    *,
    mode: str | None = None,
    latency: float | None = None,
    backend: str = "ring",
    context: int = DEFAULT_CONTEXT,
    quantization: dict | None = None,
    dtype_bytes: int = 2,
) -> Plan:
    """The plan for ranks with these memory budgets (bytes, rank order). mode: force one (else
    chosen); latency: a measured all_sum latency in seconds (else assumed for `backend`)."""
    world = len(budgets)
    if world < 2:
        raise PlanError("a distributed plan needs at least two ranks")
    if mode is not None and mode not in MODES:
        raise PlanError(f"unknown mode {mode!r}; choose pipeline or tensor")
    tensor_err = tensor_problems(config, world, quantization)
    tensor = None
    if not tensor_err:
        tensor = tensor_shares(config, world, context, quantization, dtype_bytes)
        short = [s.rank for s, b in zip(tensor, budgets) if s.total > b]
        if short:
            tensor_err = [
                f"rank(s) {', '.join(map(str, short))} cannot hold 1/{world} of the model "
                f"({tensor[short[0]].total / 2**30:.1f} GiB)"
            ]
            tensor = None if mode != "tensor" else tensor
    try:
        pipeline = pipeline_shares(config, budgets, context, quantization, dtype_bytes)
        pipeline_err = None
    except PlanError as e:
        pipeline, pipeline_err = None, str(e)
    kw = dict(context=context, budgets=tuple(budgets))
    if mode == "tensor":
        if tensor is None:
            raise PlanError(f"tensor parallel over {world} ranks is not possible: {'; '.join(tensor_err)}")
        return Plan("tensor", tuple(tensor), why="asked for (--distributed tensor)", **kw)
    if mode == "pipeline":
        if pipeline is None:
            raise PlanError(pipeline_err)
        return Plan("pipeline", tuple(pipeline), why="asked for (--distributed pipeline)", **kw)
    if tensor is None and pipeline is None:
        raise PlanError(pipeline_err)
    if tensor is None:
        return Plan("pipeline", tuple(pipeline), why=f"tensor parallel: {'; '.join(tensor_err)}", **kw)
    if pipeline is None:
        return Plan("tensor", tuple(tensor), why="only tensor parallel fits", **kw)
    measured = latency is not None
    latency = latency if measured else ASSUMED_LATENCY.get(backend, ASSUMED_LATENCY["ring"])
    chosen, why = choose_mode(config, world, latency, quantization, dtype_bytes)
    how = "measured" if measured else f"assumed for the {backend} backend"
    why += f" (all_sum latency {how})"
    return Plan(chosen, tuple(tensor if chosen == "tensor" else pipeline), why=why, **kw)
